"""The ``cifar-resnet`` command: LightningCLI over the classifiers and the CIFAR-100 DataModule."""

from __future__ import annotations

import sys

from lightning.pytorch.cli import ArgsType, LightningCLI

from cifar_resnet.classifier import ImageClassifier
from cifar_resnet.data import CIFAR100DataModule
from cifar_resnet.errors import UserError


def run(args: ArgsType = None) -> LightningCLI:
    """Run ``fit``, ``validate``, ``test`` or ``predict`` as the config and arguments say; returns the CLI."""
    return LightningCLI(
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
