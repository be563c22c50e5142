"""The ``cifar-resnet`` command: LightningCLI over the classifiers and the CIFAR-100 DataModule."""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path
from typing import Any

from jsonargparse import ArgumentError, Namespace
from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities.exceptions import MisconfigurationException

from cifar_resnet import __version__
from cifar_resnet.callbacks import FixedFormatProgressBar, StopChildProcessesOnError
from cifar_resnet.checkpointing import find_last_checkpoint, read_checkpoint
from cifar_resnet.classifier import ImageClassifier
from cifar_resnet.data import CIFAR100DataModule
from cifar_resnet.errors import UserError
from cifar_resnet.predict import PredictionWriter

# Lightning messages that do not apply to this program or that a user cannot act on. Each is a
# regular expression matched against the start of the message.
IGNORED_WARNINGS = (
    # Batches are slices of in-memory tensors; worker processes would only add copies.
    r".*does not have many workers",
    # Training loss is logged per process on purpose (a sync per step costs time); val/test use sync_dist.
    r".*when logging on epoch level in distributed setting",
    # Short runs (tests, smoke runs) have fewer batches than the logging interval.
    r".*is smaller than the logging interval",
    # Lightning's own use of a torch API deprecated in newer torch.
    r".*isinstance\(treespec, LeafSpec\)",
    # Only the estimated model size in the summary is affected.
    r".*Precision .* is not supported by the model summary",
    # `test`/`validate` log into a new version folder, so the checkpoint's folder always differs.
    r".*The dirpath has changed from",
)


class _DropLitLoggerTip(logging.Filter):
    """Drops Lightning's advertisement for its cloud logger."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "litlogger" not in record.getMessage()


def silence_known_warnings() -> None:
    """Ignore the warnings in :data:`IGNORED_WARNINGS` and Lightning's cloud-logger tip."""
    for pattern in IGNORED_WARNINGS:
        warnings.filterwarnings("ignore", message=pattern)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropLitLoggerTip) for f in logger.filters):
            logger.addFilter(_DropLitLoggerTip())


# Loggers whose folders are <save_dir>/<name>/<version>/ and whose ``version`` may be a folder name.
VERSIONED_LOGGERS = ("lightning.pytorch.loggers.TensorBoardLogger", "lightning.pytorch.loggers.CSVLogger")


DESCRIPTION = (
    "cifar-resnet trains and evaluates ResNets on CIFAR-100 with PyTorch Lightning. A YAML config is the "
    "experiment: configs/scratch.yaml (the seed's ResNet from scratch) and configs/finetune.yaml (ImageNet "
    "ResNet18, fine-tuned); any setting can be overridden on the command line. Runs, checkpoints and "
    "TensorBoard logs go to runs/<name>/version_N/. See README.md."
)
SUBCOMMANDS = {
    "fit": "Train a model as the config says, or resume a run with --ckpt_path last.",
    "validate": "Evaluate a checkpoint on the validation images and print a report.",
    "test": "Evaluate a checkpoint on the CIFAR-100 test split, print a report and save it as JSON.",
    "predict": "Give the top-5 classes of your own images (--data.predict_path) from a checkpoint, as a CSV.",
}
RECIPES = (
    " Start from a recipe: --config configs/scratch.yaml or configs/finetune.yaml (README.md, \"The two "
    "experiments\"). Each model's own settings: --model.help ScratchResNet or --model.help FineTunedResNet18."
)
OPTION_HELP = {
    "ckpt_path": (
        "Checkpoint to start from: a .ckpt file, or 'last' for the newest runs/<name>/*/checkpoints/last.ckpt. "
        "fit resumes that run in its own folder (weights, optimizer, schedule, epoch, random state; with no "
        "checkpoint yet, 'last' starts from scratch); validate, test and predict use its weights and write a "
        "new version folder. Its class names and input settings come with it, so predict on image files "
        "needs no CIFAR-100 archive."
    ),
    "weights_only": (
        "Load checkpoints with torch.load(weights_only=True) (the default here): tensors and plain values only, "
        "so a checkpoint cannot run code. Use false only for a checkpoint you trust that needs it."
    ),
}


class CifarCLI(LightningCLI):
    """LightningCLI that resumes a run in its own folder, reports bad input as one short error, and
    whose ``test`` prints only the TestReport (not also Lightning's metric table)."""

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        """A parser that raises on bad arguments (``main`` prints them) instead of printing a page of usage."""
        kwargs.setdefault("exit_on_error", False)
        return super().init_parser(**kwargs)

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        """Parse, let ``deterministic`` win over ``benchmark``, and check ``--ckpt_path`` before Lightning reads it."""
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        if subcommand:
            trainer = self.config[subcommand].trainer
            if trainer.get("deterministic") and trainer.get("benchmark"):
                # The recipes autotune cuDNN, which would make `deterministic: true` silently non-deterministic.
                trainer.benchmark = False
            self._resolve_checkpoint(subcommand, self.config[subcommand])

    def _resolve_checkpoint(self, subcommand: str, config: Namespace) -> None:
        """Turn ``last`` into the run's newest ``last.ckpt``, check the file, and continue its run's logs."""
        if config.get("weights_only") is None:
            config.weights_only = True
        ckpt_path = config.get("ckpt_path")
        if not ckpt_path or ckpt_path in ("best", "hpc"):
            return
        experiment = _experiment_dir(config.trainer.get("logger"))
        if ckpt_path == "last":
            found = find_last_checkpoint(experiment) if experiment else None
            if found is None:
                if subcommand != "fit":
                    raise UserError(f"`--ckpt_path last`: no {experiment or 'run'}/*/checkpoints/last.ckpt to {subcommand}.")
                return  # as Lightning does: a first run with `--ckpt_path last` starts from scratch
            config.ckpt_path = ckpt_path = str(found)
        checkpoint = read_checkpoint(ckpt_path, weights_only=config.weights_only)
        wanted = config.get("model", {}).get("class_path")
        trained = checkpoint.get("hyper_parameters", {}).get("_class_path")
        if wanted and trained and wanted != trained:
            raise UserError(
                f"The checkpoint '{ckpt_path}' holds a {trained.rsplit('.', 1)[-1]}, but the config asks for a "
                f"{wanted.rsplit('.', 1)[-1]}. Use the config the checkpoint was trained with: config.yaml in its run "
                "folder, or the recipe in configs/ for that model."
            )
        run_dir = Path(ckpt_path).resolve().parent.parent
        if subcommand == "fit" and experiment and run_dir.parent == experiment.resolve():
            # Resuming: write logs and checkpoints into the run's own folder, not in a new version_N+1.
            config.trainer.logger.init_args.version = run_dir.name
            # ... so its checkpoint folder is not empty, which is the point, not a mistake to warn about.
            warnings.filterwarnings("ignore", message=r".*Checkpoint directory .* exists and is not empty")

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The Trainer, with Lightning's complaints about its settings turned into a short error."""
        with_fixed_format_bar(self.config_init[self.subcommand]["trainer"] if self.subcommand else self.config_init["trainer"], kwargs)
        try:
            return super().instantiate_trainer(**kwargs)
        except MisconfigurationException as err:
            raise UserError(f"Invalid trainer settings: {err}") from err

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """``--prediction.*``: where ``predict`` writes its CSV (a callback that every subcommand has)."""
        parser.add_lightning_class_args(PredictionWriter, "prediction")

    def _add_subcommands(self, parser: LightningArgumentParser, **kwargs: Any) -> None:
        """Lightning's subcommands, listed in ``--help`` with what they do in this program."""
        super()._add_subcommands(parser, **kwargs)
        for choice in parser._subcommands_action._choices_actions:
            choice.help = SUBCOMMANDS.get(choice.dest, choice.help)

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any) -> LightningArgumentParser:
        """The subcommand's parser: this program's help texts, and ``--verbose false`` for ``test`` and
        ``validate`` (the report replaces Lightning's table)."""
        kwargs["description"] = SUBCOMMANDS[subcommand] + RECIPES
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if subcommand in ("test", "validate"):
            parser.set_defaults(verbose=False)
        for action in parser._actions:
            action.help = OPTION_HELP.get(action.dest, action.help)
        return parser


def with_fixed_format_bar(trainer_config: Namespace, kwargs: dict[str, Any]) -> None:
    """Add :class:`FixedFormatProgressBar` to the Trainer's callbacks, unless the bar is off or another is set."""
    if trainer_config.get("enable_progress_bar") is False:
        return
    callbacks = trainer_config.get("callbacks") or []
    callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
    if not any(isinstance(callback, ProgressBar) for callback in callbacks):
        kwargs["callbacks"] = [*callbacks, FixedFormatProgressBar()]


def _experiment_dir(logger: Any) -> Path | None:
    """``<save_dir>/<name>`` of a TensorBoard or CSV logger config, else ``None``."""
    if not isinstance(logger, Namespace) or logger.get("class_path") not in VERSIONED_LOGGERS:
        return None
    init_args = logger.get("init_args") or Namespace()
    name = init_args.get("name", "lightning_logs")
    return Path(init_args.get("save_dir") or ".") / (name or "")


def run(args: ArgsType = None) -> LightningCLI:
    """Run ``fit``, ``validate``, ``test`` or ``predict`` as the config and arguments say; returns the CLI."""
    silence_known_warnings()
    return CifarCLI(
        model_class=ImageClassifier,
        datamodule_class=CIFAR100DataModule,
        subclass_mode_model=True,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"description": DESCRIPTION, "version": __version__},
        trainer_defaults={"callbacks": [StopChildProcessesOnError()]},
        args=args,
    )


def main(args: ArgsType = None) -> None:
    """Entry point of ``cifar-resnet``: :func:`run`, with user mistakes reported as one clear paragraph."""
    try:
        run(args)
    except ArgumentError as err:
        print(f"cifar-resnet: error: {err}\nSee `cifar-resnet <subcommand> --help` for the options.", file=sys.stderr)
        raise SystemExit(2) from None
    except Exception as err:
        user_error = _find_user_error(err)
        if user_error is None:
            raise
        print(f"cifar-resnet: error: {user_error}", file=sys.stderr)
        raise SystemExit(2) from None


def _find_user_error(err: BaseException | None) -> UserError | None:
    """``err`` or the :class:`UserError` it was raised from (jsonargparse wraps errors of the classes it builds)."""
    seen = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, UserError):
            return err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return None
