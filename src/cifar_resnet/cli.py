"""The ``cifar-resnet`` command: LightningCLI over the classifiers and the CIFAR-100 DataModule."""

from __future__ import annotations

import logging
import sys
import warnings
from typing import Any

from lightning.pytorch.cli import ArgsType, LightningArgumentParser, LightningCLI

from cifar_resnet.classifier import ImageClassifier
from cifar_resnet.data import CIFAR100DataModule
from cifar_resnet.errors import UserError

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


class CifarCLI(LightningCLI):
    """LightningCLI whose ``test`` prints only the TestReport, not also Lightning's metric table."""

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any) -> LightningArgumentParser:
        """The subcommand's parser, with ``--verbose false`` as the default of ``test``."""
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        if subcommand == "test":
            parser.set_defaults(verbose=False)
        return parser


def run(args: ArgsType = None) -> LightningCLI:
    """Run ``fit``, ``validate``, ``test`` or ``predict`` as the config and arguments say; returns the CLI."""
    silence_known_warnings()
    return CifarCLI(
        model_class=ImageClassifier,
        datamodule_class=CIFAR100DataModule,
        subclass_mode_model=True,
        seed_everything_default=0,
        save_config_kwargs={"overwrite": True},
        args=args,
    )


def main(args: ArgsType = None) -> None:
    """Entry point of ``cifar-resnet``: :func:`run`, with user mistakes reported as one clear paragraph."""
    try:
        run(args)
    except UserError as err:
        print(f"cifar-resnet: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
