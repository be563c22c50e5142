"""The ``cifar-resnet`` command: LightningCLI over the classifiers and the CIFAR-100 DataModule."""

from __future__ import annotations

import csv
import errno
import logging
import os
import re
import shlex
import shutil
import signal
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
from jsonargparse import ArgumentError, Namespace
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import DeviceStatsMonitor, LearningRateMonitor, ProgressBar
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException

from cifar_resnet import __version__
from cifar_resnet.atomic import WRITE_ERRORS, atomic_write, file_in_the_way, first_in_chain, write_error_message
from cifar_resnet.callbacks import FixedFormatProgressBar, HParamsSummary, RunFolderLock, StopChildProcessesOnError
from cifar_resnet.checkpointing import LastCheckpoint, RandomStates, find_last_checkpoint, newest_checkpoint, wait_for_checkpoints
from cifar_resnet.classifier import ImageClassifier
from cifar_resnet.compat import CLIInternals
from cifar_resnet.config_files import check_config_files
from cifar_resnet.data import CIFAR100DataModule
from cifar_resnet.data.archive import NUM_CLASSES
from cifar_resnet.errors import UserError
from cifar_resnet.folder_snapshot import FolderSnapshot, StepCounter
from cifar_resnet.launch_env import check_launcher_variables
from cifar_resnet.loggers import (
    RUN_IDS,
    RUN_RECORD,
    LoggerRunRecord,
    RunFolderTrainer,
    RunSettings,
    keep_logged_params,
    logger_configs,
    owns_its_folder,
    resume_logger_runs,
)
from cifar_resnet.loggers import user_message as logger_message
from cifar_resnet.predict import PredictionWriter
from cifar_resnet.tuning import TUNERS, FollowTuners, is_tuner

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
    # `test`/`validate`/`predict` with a recipe that averages weights: the checkpoint's weights already are the average.
    r".*You're using the WeightAveraging callback, but loading a checkpoint outside the 'fit' stage",
)


# Lightning's checks of Trainer settings that only the data can answer, made once training starts (a
# ValueError, not its MisconfigurationException); each a regular expression matched against the message.
LIGHTNING_SETTING_ERRORS = (r"\s*`val_check_interval` \(\d+\) must be less than or equal to the number of the training batches",)


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


MAX_SEED = 2**32 - 1


class Interrupted(Exception):
    """Ctrl-C or SIGTERM stopped a command; ``code`` is the conventional exit status (128 + signal)."""

    def __init__(
        self,
        signum: signal.Signals,
        subcommand: str | None,
        epoch: int | None,
        checkpoint: Path | None,
        quiet: bool = False,
        finished: bool = False,
    ) -> None:
        super().__init__(signum.name)
        self.signum, self.subcommand, self.epoch, self.checkpoint = signum, subcommand, epoch, checkpoint
        self.code = 128 + int(signum)
        self.quiet = quiet  # DDP ranks other than 0 leave the talking to rank 0
        self.finished = finished  # a fit stopped after its last epoch or step: nothing is left to train

    def message(self, argv: list[str]) -> str:
        """One line: what stopped, and the command that resumes (or repeats) it."""
        stopped = f"cifar-resnet: {self.subcommand or 'the command'} stopped by {self.signum.name}"
        if self.subcommand != "fit":
            return f"{stopped}; nothing to resume, run the command again."
        if self.finished:
            kept = f"; its newest checkpoint is {self.checkpoint}" if self.checkpoint is not None else ""
            return f"{stopped} after its last epoch: the run finished training{kept}. Nothing is left to resume."
        if self.checkpoint is None:
            return f"{stopped} in epoch {self.epoch} before any checkpoint was written; run the same command again to start over."
        command = shlex.join(["cifar-resnet", *_without_ckpt_path(argv), "--ckpt_path", str(self.checkpoint)])
        return f"{stopped} in epoch {self.epoch}, which starts again on resume. Resume from {self.checkpoint} with: {command}"


def _finished_training(trainer: Trainer) -> bool:
    """Whether a fit has done all its epochs or steps (the limits Lightning's fit loop stops at)."""
    max_epochs, max_steps = trainer.max_epochs, trainer.max_steps
    if trainer.state.fn != "fit":
        return False
    return (max_epochs is not None and 0 <= max_epochs <= trainer.current_epoch) or 0 <= max_steps <= trainer.global_step


def _without_ckpt_path(argv: list[str]) -> list[str]:
    """``argv`` less any ``--ckpt_path X`` or ``--ckpt_path=X``."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--ckpt_path":
            skip = True
        elif not arg.startswith("--ckpt_path="):
            kept.append(arg)
    return kept


class SaveConfigSafely(SaveConfigCallback):
    """Writes the run's ``config.yaml`` atomically, and never lets a failed ``fit`` replace a run's config.

    ``test``, ``validate`` and ``predict`` write theirs at setup, into their own new version folder.
    A ``fit`` writes it when training starts in a new folder; when resuming into a folder that has one,
    only once an epoch has been checkpointed, so a resume that fails (a checkpoint that does not fit,
    a full disk) leaves the run's ``config.yaml`` as it was.
    """

    _first_epoch = 0  # the epoch this command's training started in

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            self._save(trainer)

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._first_epoch = trainer.current_epoch
        path = self._path(trainer)
        exists = trainer.is_global_zero and path.is_file()
        if not trainer.strategy.broadcast(exists):
            self._save(trainer)

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # Checkpoints are written at the end of an epoch, after every other callback's hook.
        if trainer.current_epoch > self._first_epoch:
            self._save(trainer)

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._save(trainer)

    def _path(self, trainer: Trainer) -> Path:
        """``config.yaml`` in the run's folder (every process must call this: it broadcasts)."""
        return Path(trainer.log_dir or ".") / self.config_filename

    def _save(self, trainer: Trainer) -> None:
        """Write the config once, by rank 0, to a temporary file renamed over ``config.yaml``."""
        if self.already_saved:
            return
        path = self._path(trainer)
        if trainer.is_global_zero:
            wait_for_checkpoints(trainer)  # a checkpoint that failed in the background keeps the old config
            text = self.parser.dump(_as_trained(self.config, trainer), skip_none=False)
            atomic_write(path, lambda f: f.write(text.encode()))
        self.already_saved = True


def _as_trained(config: Namespace, trainer: Trainer) -> Namespace:
    """``config`` with the learning rate and batch size a tuner chose in place of the given ones, and without
    the tuners, so that a resume with the run's ``config.yaml`` trains on with them instead of tuning again."""
    callbacks = config.trainer.get("callbacks") or []
    callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
    if trainer.lightning_module is None or not any(is_tuner(c.get("class_path")) for c in callbacks if isinstance(c, Namespace)):
        return config
    config = config.clone()
    config.trainer.callbacks = [c for c in callbacks if not (isinstance(c, Namespace) and is_tuner(c.get("class_path")))]
    optimizer = config.model.init_args.get("optimizer") if config.get("model") else None
    lr = getattr(trainer.lightning_module, "lr", None)
    if isinstance(optimizer, Namespace) and isinstance(optimizer.get("init_args"), Namespace) and lr is not None:
        optimizer.init_args.lr = lr
    if trainer.datamodule is not None and config.get("data") and "batch_size" in trainer.datamodule.hparams:
        config.data.batch_size = trainer.datamodule.hparams.batch_size
    return config


# The recipes in configs/, and what each is.
RECIPE_FILES = {
    "configs/scratch.yaml": "the seed's ResNet from scratch",
    "configs/finetune.yaml": "the seed's fine-tuning of ImageNet ResNet18",
    "configs/fast.yaml": "a modern recipe for the seed's ResNet",
    "configs/finetune_fast.yaml": "a modern fine-tuning of ResNet18",
}
DEBUG_OVERLAY = "configs/debug.yaml"
RECIPE_LIST = "; ".join(f"{path} ({what})" for path, what in RECIPE_FILES.items())
DESCRIPTION = (
    "cifar-resnet trains and evaluates ResNets on CIFAR-100 with PyTorch Lightning. A YAML config is the "
    f"experiment: {RECIPE_LIST}. Any setting can be overridden on the command line; add --config "
    f"{DEBUG_OVERLAY} after a recipe for a quick run on the CPU. Runs, checkpoints and TensorBoard logs go to "
    "runs/<name>/version_N/. See README.md."
)
SUBCOMMANDS = {
    "fit": "Train a model as the config says, or resume a run with --ckpt_path last.",
    "validate": "Evaluate a checkpoint on the validation images and print a report.",
    "test": "Evaluate a checkpoint on the CIFAR-100 test split, print a report and save it as JSON.",
    "predict": "Give the top-5 classes of your own images (--data.predict_path) from a checkpoint, as a CSV.",
}
RECIPES = (
    f" Start from a recipe: --config {', '.join(RECIPE_FILES)} (README.md, \"The four recipes\"); add --config "
    f"{DEBUG_OVERLAY} after it for a quick CPU run. Each model's own settings: --model.help ScratchResNet or "
    "--model.help FineTunedResNet18."
)
OPTION_HELP = {
    "ckpt_path": (
        "Checkpoint to start from: a .ckpt file, or 'last' for the newest runs/<name>/*/checkpoints/last.ckpt. "
        "fit resumes that run in its own folder (weights, optimizer, schedule, epoch, random state; with no "
        "checkpoint yet, 'last' starts from scratch); validate, test and predict use its weights and write a "
        "new version folder. Its class names and input settings come with it, so predict on image files "
        "needs no CIFAR-100 archive."
    ),
    "optimizer": "The model's optimizer (the same as --model.init_args.optimizer): class and arguments, e.g. "
    "--optimizer torch.optim.SGD --optimizer.lr 0.1. The recipe's LR schedule and parameter groups stay.",
    "lr_scheduler": "The model's LR scheduler (the same as --model.init_args.lr_scheduler); see --model.help for when it steps.",
    "weights_only": (
        "Load checkpoints with torch.load(weights_only=True) (the default here): tensors and plain values only, "
        "so a checkpoint cannot run code. Use false only for a checkpoint you trust that needs it."
    ),
}


class CifarCLI(CLIInternals):
    """LightningCLI that resumes a run in its own folder, reports bad input as one short error, ends
    Ctrl-C and SIGTERM with the command that resumes, and whose ``test`` prints only the TestReport."""

    subcommand_help = SUBCOMMANDS
    option_help = OPTION_HELP
    # The report replaces Lightning's table of results.
    subcommand_defaults = {"test": {"verbose": False}, "validate": {"verbose": False}}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        try:
            super().__init__(*args, **kwargs)
        except KeyboardInterrupt:  # before or after the Trainer ran
            raise self._interrupted(signal.SIGINT) from None
        except SystemExit as exit_:
            # Lightning 2.6 ends a run on SIGTERM with SIGTERMException, a SystemExit with code 0, and
            # one on Ctrl-C with sys.exit(1) inside its KeyboardInterrupt handler.
            if isinstance(exit_, SIGTERMException):
                raise self._interrupted(signal.SIGTERM) from None
            if isinstance(exit_.__context__, KeyboardInterrupt):
                raise self._interrupted(signal.SIGINT) from None
            raise
        except Exception as err:
            # Ctrl-C inside a library's write (TensorBoard's, a checkpoint's) can surface as the library's own error.
            if first_in_chain(err, lambda e: isinstance(e, KeyboardInterrupt)) is not None:
                raise self._interrupted(signal.SIGINT) from None
            self._drop_unused_run_folder()
            self._undo_failed_resume()
            if isinstance(err, ValueError) and any(re.match(p, str(err)) for p in LIGHTNING_SETTING_ERRORS):
                raise UserError(f"Invalid trainer settings: {str(err).strip()}") from err
            raise

    def _drop_unused_run_folder(self) -> None:
        """After a command failed: remove the version folder it made if nothing but its lock and settings
        went in (no checkpoint, log or report), so that failed commands leave no empty runs behind."""
        trainer = getattr(self, "trainer", None)
        if trainer is None or not getattr(self, "_new_run_folder", False) or not trainer.is_global_zero:
            return
        # Not trainer.log_dir: it broadcasts, which a failed DDP job must not do.
        folder = Path(trainer.loggers[0].log_dir if trainer.loggers and trainer.loggers[0].log_dir else trainer.default_root_dir)
        if not folder.is_dir() or folder.resolve() == Path.cwd().resolve():
            return
        files = [p for p in folder.rglob("*") if not p.is_dir()]
        if all(p.name in UNUSED_RUN_FILES for p in files):
            shutil.rmtree(folder, ignore_errors=True)

    def _undo_failed_resume(self) -> None:
        """After a resume failed before it trained a step or wrote a checkpoint (a checkpoint that does not fit,
        say): leave its run folder as it was, without the event files and settings the loggers began."""
        snapshot = getattr(self, "_resume_snapshot", None)
        trainer = getattr(self, "trainer", None)
        if snapshot is None or trainer is None or not trainer.is_global_zero or self._steps.steps:
            return
        if not snapshot.wrote_checkpoint():
            snapshot.restore()

    def _interrupted(self, signum: signal.Signals) -> Interrupted:
        """What to tell the user: the epoch that stopped and the newest checkpoint of the run."""
        trainer = getattr(self, "trainer", None)
        subcommand = getattr(self, "subcommand", None)
        if trainer is None:
            return Interrupted(signum, subcommand, None, None)
        folders = {Path(c.dirpath) for c in trainer.checkpoint_callbacks if c.dirpath}
        newest = newest_checkpoint(p for folder in folders for p in folder.glob("*.ckpt"))
        quiet = not trainer.is_global_zero
        return Interrupted(signum, subcommand, trainer.current_epoch, newest, quiet, finished=_finished_training(trainer))

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        """A parser that raises on bad arguments (``main`` prints them) instead of printing a page of usage."""
        kwargs.setdefault("exit_on_error", False)
        return super().init_parser(**kwargs)

    def parse_arguments(self, parser: LightningArgumentParser, args: ArgsType) -> None:
        """Parse, let ``deterministic`` win over ``benchmark``, check values Lightning would take badly,
        and decide the run folder."""
        check_config_files(args)
        super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        if subcommand:
            config = self.config[subcommand]
            _check_groups(config, subcommand)
            check_launcher_variables(os.environ)
            trainer = config.trainer
            if trainer.get("deterministic") and trainer.get("benchmark"):
                # The recipes autotune cuDNN, which would make `deterministic: true` silently non-deterministic.
                trainer.benchmark = False
            _check_values(config)
            _optimizer_flags_to_model(config)
            self._resolve_run(subcommand, config)

    def _resolve_run(self, subcommand: str, config: Namespace) -> None:
        """Turn ``last`` into the run's newest checkpoint and continue that run's folder; any other
        command writes a new version folder, never into an existing one. Without a logger
        (``--trainer.logger false``) or with one that keeps no version folders (MLflow, W&B), the program's
        run folder is ``<default_root_dir or runs>/<recipe>/version_N`` all the same (:mod:`cifar_resnet.loggers`)."""
        if config.get("weights_only") is None:
            config.weights_only = True
        self._run_dir: Path | None = None
        self._new_run_folder = True  # until it turns out to resume a run in its folder
        self._resume_snapshot: FolderSnapshot | None = None
        self._steps = StepCounter()
        logger = config.trainer.get("logger")
        if logger is False or (logger_configs(logger) and not owns_its_folder(logger)):
            experiment = Path(config.trainer.get("default_root_dir") or "runs") / _recipe_name(config)
            self._run_dir = experiment / f"version_{_next_version(experiment)}"
            init_args = None
        else:
            experiment = _experiment_dir(logger)
            if experiment is None:
                return
            init_args = logger.init_args
            pinned = init_args.get("version")
            if pinned is not None and (experiment / str(pinned)).exists():
                # A run's config.yaml pins its version: a new command must not write into that run.
                init_args.version = None
        ckpt_path = config.get("ckpt_path")
        if ckpt_path == "last":
            found = find_last_checkpoint(experiment)
            if found is None:
                if subcommand != "fit":
                    raise UserError(f"`--ckpt_path last`: no {experiment}/*/checkpoints/*.ckpt to {subcommand}.")
                config.ckpt_path = None  # as Lightning does: a first run with `--ckpt_path last` starts from scratch
                rank_zero_info(f"`--ckpt_path last`: no checkpoint in {experiment}/*/checkpoints/ yet, so this fit starts from scratch.")
                return
            config.ckpt_path = ckpt_path = str(found)
        if subcommand != "fit":
            # Its own folder, named after what it evaluates: runs/scratch/version_0-test for version_0's checkpoint.
            name = _evaluation_folder(experiment, ckpt_path, subcommand)
            if init_args is None:
                self._run_dir = experiment / name
            elif init_args.get("version") is None:
                init_args.version = name
            return
        if not ckpt_path or ckpt_path in ("best", "hpc"):
            return
        run_dir = Path(ckpt_path).resolve().parent.parent
        if run_dir.parent == experiment.resolve():
            # Resuming: write logs and checkpoints into the run's own folder, not in a new version_N+1.
            if init_args is not None:
                init_args.version = run_dir.name
            else:
                self._run_dir = run_dir
                resume_logger_runs(logger, run_dir)  # the same MLflow run, the same W&B run
            self._new_run_folder = False
            self._resume_snapshot = FolderSnapshot.take(run_dir)
            # ... so its checkpoint folder is not empty, which is the point, not a mistake to warn about.
            warnings.filterwarnings("ignore", message=r".*Checkpoint directory .* exists and is not empty")

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        """The Trainer, with Lightning's complaints about its settings turned into a short error."""
        trainer_config = self.config_init[self.subcommand]["trainer"] if self.subcommand else self.config_init["trainer"]
        with_fixed_format_bar(trainer_config, kwargs)
        callbacks = kwargs.get("callbacks", trainer_config.get("callbacks")) or []
        callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
        if any(isinstance(callback, TUNERS) for callback in callbacks):
            # Lightning runs the tuners first; FollowTuners must come next, before anything records the settings.
            kwargs["callbacks"] = [FollowTuners(), *callbacks]
        if getattr(self, "_run_dir", None) is not None:
            kwargs["default_root_dir"] = str(self._run_dir)  # not in config.yaml: a later command decides its own
        try:
            trainer = super().instantiate_trainer(**kwargs)
        except MisconfigurationException as err:
            raise UserError(f"Invalid trainer settings: {err}") from err
        if not trainer.loggers:
            _without_logger_callbacks(trainer)
        elif getattr(self, "_run_dir", None) is not None:
            _into_program_run_folder(trainer, self._run_dir)
            if not self._new_run_folder:
                keep_logged_params(trainer)
        if not getattr(self, "_new_run_folder", True):
            _keep_csv_rows(trainer)
        if getattr(self, "_resume_snapshot", None) is not None:
            trainer.callbacks.append(self._steps)
        return trainer

    def after_instantiate_classes(self) -> None:
        """Check what only the built model and data can tell, before any work starts."""
        if self.subcommand is None:
            return
        num_classes = self.model.hparams.get("num_classes")
        if isinstance(self.datamodule, CIFAR100DataModule) and num_classes != NUM_CLASSES:
            raise UserError(
                f"model.init_args.num_classes is {num_classes}, but CIFAR-100 has {NUM_CLASSES} classes. "
                f"Set `--model.init_args.num_classes {NUM_CLASSES}`."
            )
        optimizer, scheduler = getattr(self.model, "optimizer", None), getattr(self.model, "lr_scheduler", None)
        if callable(optimizer):
            try:  # on a stand-in parameter: torch checks the values when the optimizer is built
                probe = optimizer([torch.nn.Parameter(torch.zeros(1))])
                if callable(scheduler):
                    scheduler(probe)
            except (ValueError, TypeError) as err:
                raise UserError(f"Invalid optimizer or LR scheduler settings: {err}") from err

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        """``--prediction.*``: where ``predict`` writes its CSV (a callback that every subcommand has)."""
        parser.add_lightning_class_args(PredictionWriter, "prediction")


def _optimizer_flags_to_model(config: Namespace) -> None:
    """Make Lightning's top-level ``--optimizer`` and ``--lr_scheduler`` set the model's own ``optimizer`` and
    ``lr_scheduler``: the recipe's parameter groups and (for ``--optimizer``) its LR schedule stay, and
    ``config.yaml``, hparams.yaml and the HPARAMS tab record what trains (Lightning would replace the model's
    ``configure_optimizers`` behind the recorded settings' back)."""
    model = config.get("model")
    for key in ("optimizer", "lr_scheduler"):
        given = config.get(key)
        if given is None:
            continue
        if not isinstance(model, Namespace) or not isinstance(model.get("init_args"), Namespace):
            raise UserError(f"`--{key}` sets the model's {key}, but the config names no model. Give `--model` (or a recipe with --config).")
        model.init_args[key] = given
        config[key] = None


def _check_values(config: Namespace) -> None:
    """Refuse values that Lightning or torch would only trip over later, with a traceback."""
    seed = config.get("seed_everything")
    if not isinstance(seed, bool) and isinstance(seed, int) and not 0 <= seed <= MAX_SEED:
        raise UserError(f"seed_everything must lie in [0, {MAX_SEED}] (2^32 - 1), got {seed}.")
    _check_int_sizes(config)
    devices = config.trainer.get("devices")
    if isinstance(devices, str) and devices.strip().isdigit():  # Lightning reads "8" as 8 devices
        _check_int_sizes(int(devices), "trainer.devices")
    for key, (low, what) in TRAINER_MINIMUMS.items():
        value = config.trainer.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and value < low:
            raise UserError(f"trainer.{key} must be {what}, got {value}.")
    interval = config.trainer.get("val_check_interval")
    if isinstance(interval, float) and not 0 < interval <= 1 or isinstance(interval, int) and interval < 1:
        raise UserError(
            "trainer.val_check_interval must be a number of training batches (1 or more) or a share of the epoch "
            f"in (0, 1], got {interval}."
        )
    model = config.get("model")
    init_args = model.get("init_args") if isinstance(model, Namespace) else None
    num_classes = init_args.get("num_classes") if isinstance(init_args, Namespace) else None
    if isinstance(num_classes, int) and num_classes != NUM_CLASSES:  # before a head of that size is built
        raise UserError(
            f"model.init_args.num_classes is {num_classes}, but CIFAR-100 has {NUM_CLASSES} classes. "
            f"Set `--model.init_args.num_classes {NUM_CLASSES}`."
        )
    _check_ckpt_path(config)
    logger = config.trainer.get("logger")
    save_dir = logger.get("init_args", Namespace()).get("save_dir") if isinstance(logger, Namespace) else None
    blocker = file_in_the_way(Path(save_dir) / "run") if save_dir else None  # save_dir itself or a parent
    if blocker is not None:
        raise UserError(f"trainer.logger.init_args.save_dir is '{save_dir}', but '{blocker}' is a file. Give a folder.")


# Trainer settings Lightning takes unchecked and then trips over (a division by zero, an overflow) or quietly
# misreads (a negative clipping value flips the gradients): the least value each may have, and its wording.
TRAINER_MINIMUMS: dict[str, tuple[int, str]] = {
    "log_every_n_steps": (1, "a positive number of steps"),
    "accumulate_grad_batches": (1, "a positive number of batches"),
    "num_nodes": (1, "a positive number of machines"),
    "check_val_every_n_epoch": (1, "a positive number of epochs (or null: validate by val_check_interval alone)"),
    "num_sanity_val_steps": (-1, "0 or more batches (-1: the whole validation set)"),
    "min_epochs": (0, "0 or more"),
    "min_steps": (0, "0 or more"),
    "gradient_clip_val": (0, "0 or more (0 or null: no clipping)"),
}
INT64_MAX = 2**63 - 1


def _check_int_sizes(value: Any, key: str = "") -> None:
    """Refuse any whole number in the config ``value`` that does not fit in 64 bits: torch and Lightning
    overflow on it with a traceback (``--data.split_seed 2**70``)."""
    if isinstance(value, Namespace):
        for name, item in value.items():
            _check_int_sizes(item, f"{key}.{name}" if key else name)
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_int_sizes(item, f"{key}[{index}]")
    elif isinstance(value, int) and not isinstance(value, bool) and not -INT64_MAX - 1 <= value <= INT64_MAX:
        raise UserError(f"{key} is {value}, which does not fit in 64 bits: it must lie in [-2^63, 2^63 - 1].")


def _check_groups(config: Namespace, subcommand: str) -> None:
    """Refuse a config whose ``trainer``, ``data`` or ``prediction`` is not a mapping of settings (``data: [1, 2]``),
    which jsonargparse lets through to the constructors."""
    for key in ("trainer", "data", "prediction"):
        value = config.get(key)
        if key in config and not isinstance(value, Namespace):
            shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
            raise UserError(
                f"`{key}` in the config is {type(value).__name__} {shown}, but it must be a mapping of {key} settings "
                f"(`{key}:` then indented `name: value` lines, as in the recipes). See `cifar-resnet {subcommand} --help`."
            )


def _check_ckpt_path(config: Namespace) -> None:
    """Refuse the ``--ckpt_path`` values Lightning takes but this program's commands never have a checkpoint for."""
    ckpt_path = config.get("ckpt_path")
    if isinstance(ckpt_path, str) and not ckpt_path.strip():
        raise UserError("`--ckpt_path` is empty: give a .ckpt file, or 'last' (or leave it out to start from scratch).")
    if ckpt_path == "best":
        raise UserError(
            "`--ckpt_path best` means the best checkpoint of a Trainer that trained in the same process, and each "
            "cifar-resnet command starts a new one. Give the checkpoint's file (runs/<name>/version_N/checkpoints/"
            "best-*.ckpt) or 'last'."
        )
    if ckpt_path == "hpc":
        folder = Path(config.trainer.get("default_root_dir") or ".")
        if not any(folder.glob("hpc_ckpt_*.ckpt")):
            raise UserError(
                f"`--ckpt_path hpc`: no hpc_ckpt_*.ckpt (Lightning's SLURM requeue checkpoint) in '{folder}'. "
                "Give a .ckpt file, or 'last' for the run's newest checkpoint."
            )


def with_fixed_format_bar(trainer_config: Namespace, kwargs: dict[str, Any]) -> None:
    """Add :class:`FixedFormatProgressBar` to the Trainer's callbacks, unless the bar is off or another is set."""
    if trainer_config.get("enable_progress_bar") is False:
        return
    callbacks = trainer_config.get("callbacks") or []
    callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
    if not any(isinstance(callback, ProgressBar) for callback in callbacks):
        kwargs["callbacks"] = [*callbacks, FixedFormatProgressBar()]


# What a command writes into its new version folder before it does any work (RunFolderLock, SaveConfigSafely,
# the loggers' hyper-parameters).
UNUSED_RUN_FILES = {".lock", "config.yaml", "hparams.yaml", RUN_RECORD}
# Callbacks that only write to a logger (Lightning's raise an error without one).
NEEDS_LOGGER = (LearningRateMonitor, DeviceStatsMonitor, HParamsSummary)


def _without_logger_callbacks(trainer: Trainer) -> None:
    """Take the callbacks that only write to a logger out of a Trainer that has none, and say so in one line."""
    aside = [callback for callback in trainer.callbacks if isinstance(callback, NEEDS_LOGGER)]
    if aside:
        trainer.callbacks = [callback for callback in trainer.callbacks if callback not in aside]
        names = sorted({type(callback).__name__ for callback in aside})
        rank_zero_info(f"No logger (trainer.logger false): {', '.join(names)} {'step' if len(names) > 1 else 'steps'} aside (they only write to a logger).")


def _into_program_run_folder(trainer: Trainer, run_dir: Path) -> None:
    """Send what a Trainer whose loggers keep no version folder (MLflow, W&B) writes into the program's run
    folder: ``config.yaml``, the lock, reports and predictions (``trainer.log_dir``), checkpoints (Lightning
    would put them under the tracking store), and the record of the loggers' runs."""
    if isinstance(trainer, RunFolderTrainer):
        trainer.program_run_dir = str(run_dir)
    for callback in trainer.checkpoint_callbacks:
        if getattr(callback, "dirpath", None) is None:
            callback.dirpath = os.path.realpath(run_dir / "checkpoints")
    if any(type(logger).__name__ in RUN_IDS for logger in trainer.loggers):
        trainer.callbacks.extend([LoggerRunRecord(run_dir), RunSettings(run_dir.parent.name)])


def _keep_csv_rows(trainer: Trainer) -> None:
    """Keep the rows a resumed run's ``CSVLogger`` wrote before: Lightning's CSV writer deletes an existing
    ``metrics.csv`` when it starts (then appends to the file it writes). The file is moved aside while the
    writer starts, then put back, and the writer continues it under its header."""
    for logger in trainer.loggers:
        if not isinstance(logger, CSVLogger) or not trainer.is_global_zero:
            continue
        metrics = Path(logger.log_dir) / "metrics.csv"
        if not metrics.is_file():
            continue
        aside = metrics.with_name(".metrics.csv.resumed")
        os.replace(metrics, aside)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*Experiment logs directory .* exists and is not empty")
            writer = logger.experiment
        os.replace(aside, metrics)
        with metrics.open(newline="") as file:
            writer.metrics_keys = sorted(next(csv.reader(file), []))


def _recipe_name(config: Namespace) -> str:
    """The run's name without a logger: the first ``--config`` file's name (``configs/fast.yaml``: ``fast``; a run's
    own ``<name>/version_N/config.yaml``: ``<name>``), else the model's class."""
    files = config.get("config") or []
    if files:
        first = Path(str(files[0]))
        if first.parent.name.startswith("version_") and first.parent.parent.name:
            return first.parent.parent.name
        return first.stem
    model = config.get("model")
    class_path = model.get("class_path") if isinstance(model, Namespace) else None
    return str(class_path or "lightning_logs").rsplit(".", 1)[-1].lower()


def _evaluation_folder(experiment: Path, ckpt_path: str | None, subcommand: str) -> str:
    """The version folder of a ``test``, ``validate`` or ``predict``: ``<run>-<subcommand>`` for a checkpoint
    of a run of ``experiment`` (``version_0-test``), ``<checkpoint file>-<subcommand>`` for another checkpoint,
    then ``-2``, ``-3``, ... once taken. Lightning numbers the ``fit`` runs alone (``version_N``)."""
    if ckpt_path and ckpt_path not in ("best", "hpc"):
        path = Path(ckpt_path).resolve()
        run = path.parent.parent
        base = run.name if path.parent.name == "checkpoints" and run.parent == experiment.resolve() else path.stem
    else:
        base = ckpt_path or "untrained"
    name, n = f"{base}-{subcommand}", 2
    while (experiment / name).exists():
        name, n = f"{base}-{subcommand}-{n}", n + 1
    return name


def _next_version(experiment: Path) -> int:
    """The next free ``version_N`` in ``experiment``, as Lightning's loggers count."""
    taken = [int(p.name.split("_", 1)[1]) for p in experiment.glob("version_*") if p.is_dir() and p.name.split("_", 1)[1].isdigit()]
    return max(taken) + 1 if taken else 0


def _experiment_dir(logger: Any) -> Path | None:
    """``<save_dir>/<name>`` of a TensorBoard or CSV logger config, else ``None``."""
    if not isinstance(logger, Namespace) or not owns_its_folder(logger):
        return None
    init_args = logger.get("init_args") or Namespace()
    name = init_args.get("name", "lightning_logs")
    return Path(init_args.get("save_dir") or ".") / (name or "")


def run(args: ArgsType = None, subcommand: bool = True) -> LightningCLI:
    """Run ``fit``, ``validate``, ``test`` or ``predict`` as the config and arguments say; returns the CLI.

    With ``subcommand`` false, ``args`` are a ``fit``'s settings without the subcommand, and the model,
    DataModule and Trainer are built exactly as the command builds them, but not run (benchmarks use it).
    """
    silence_known_warnings()
    return CifarCLI(
        model_class=ImageClassifier,
        datamodule_class=CIFAR100DataModule,
        trainer_class=RunFolderTrainer,
        subclass_mode_model=True,
        seed_everything_default=0,
        save_config_callback=SaveConfigSafely,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={
            "callbacks": [LastCheckpoint(), RandomStates(), RunFolderLock(), StopChildProcessesOnError()],
        },
        parser_kwargs={
            "description": DESCRIPTION,
            "version": __version__,
            **{name: {"description": text + RECIPES} for name, text in SUBCOMMANDS.items()},
        },
        args=args,
        run=subcommand,
    )


def main(args: ArgsType = None) -> None:
    """Entry point of ``cifar-resnet``: :func:`run`, with user mistakes reported as one clear paragraph."""
    _drop_working_folder_from_path()
    try:
        run(args)
    except ArgumentError as err:
        no_model = re.search(r"arguments are required: (\w+)\.model\b", str(err))
        if no_model:
            print(
                f"cifar-resnet: error: no model or recipe given. Start from a recipe: cifar-resnet {no_model.group(1)} "
                f"--config configs/scratch.yaml; the recipes are {RECIPE_LIST}. Add --config {DEBUG_OVERLAY} after "
                "it for a quick CPU run.",
                file=sys.stderr,
            )
        else:
            print(f"cifar-resnet: error: {err}\nSee `cifar-resnet <subcommand> --help` for the options.", file=sys.stderr)
        raise SystemExit(2) from None
    except Interrupted as stop:
        argv = [str(a) for a in args] if isinstance(args, (list, tuple)) else sys.argv[1:]
        if not stop.quiet:
            print(stop.message(argv), file=sys.stderr, flush=True)
        raise SystemExit(stop.code) from None
    except Exception as err:
        try:
            message = _user_message(err)
        except Exception:  # the handler must never hide the error it handles
            message = None
        if message is None:
            raise
        print(f"cifar-resnet: error: {message}", file=sys.stderr)
        raise SystemExit(2) from None


def _drop_working_folder_from_path() -> None:
    """Keep modules in the working folder from being imported (a config's ``class_path`` could name
    one): ``python -m`` puts that folder first on ``sys.path``. ``PYTHONPATH=.`` still adds it on purpose."""
    cwd = os.getcwd()
    # An empty PYTHONPATH entry (`PYTHONPATH=:/opt/x`) also means the working folder, but nobody asks for it so.
    asked = any(os.path.abspath(p) == cwd for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p)
    if not asked:
        sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != cwd]


# Errors that can only come from a write, so a message can name them without a file name (a file object's
# write, as torch.save's or TensorBoard's, raises them without one).
FULL_OR_READ_ONLY = (errno.ENOSPC, errno.EDQUOT, errno.EROFS)


def _user_message(err: BaseException | None) -> str | None:
    """The message of the :class:`UserError` that ``err`` is or was raised from (jsonargparse wraps errors
    of the classes it builds), or of a file-system error a user can fix; ``None`` for anything else."""
    seen = set()
    os_error = None
    while err is not None and id(err) not in seen:
        if isinstance(err, UserError):
            return str(err)
        if logger_message(err) is not None:
            return logger_message(err)
        if isinstance(err, OSError) and os_error is None and (err.filename or err.errno in FULL_OR_READ_ONLY):
            os_error = err
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    if os_error is None:
        return None
    if not os_error.filename:
        return write_error_message(os_error, None)
    name = os.fsdecode(os_error.filename)  # TensorBoard's writer gives file names as bytes
    if os_error.errno in WRITE_ERRORS and os_error.errno not in (errno.EACCES, errno.EPERM):
        return write_error_message(os_error, Path(name))
    if os_error.errno in (errno.EACCES, errno.EPERM):
        return (
            f"Permission denied: '{name}'. Check that you may read the data (`data.data_dir`) and write into "
            "the runs folder (`trainer.logger.init_args.save_dir`)."
        )
    if os_error.errno in (errno.ENOTDIR, errno.EEXIST, errno.EISDIR):
        return f"'{name}': {os_error.strerror}. A file stands where a folder is expected, or the other way round."
    return None
