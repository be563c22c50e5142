"""Lightning's tuners on the command line: the learning rate and batch size they choose are what trains and
what the run records."""

from __future__ import annotations

import importlib
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import BatchSizeFinder, LearningRateFinder
from lightning.pytorch.utilities import rank_zero_info
from cifar_resnet.compat import record_hyperparameters

TUNERS = (LearningRateFinder, BatchSizeFinder)


def is_tuner(class_path: Any) -> bool:
    """Whether a config's callback ``class_path`` names Lightning's ``LearningRateFinder`` or ``BatchSizeFinder`` (or a subclass)."""
    module, _, name = str(class_path).rpartition(".")
    try:
        found = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError, ValueError):
        return False
    return isinstance(found, type) and issubclass(found, TUNERS)


class FollowTuners(Callback):
    """After ``LearningRateFinder`` or ``BatchSizeFinder`` has run, trains with and records what they chose.

    Both tuners work in ``on_fit_start``, before every other callback (Lightning puts them first). The
    finder then sets the module's ``lr`` (and the current optimizer's groups) and the DataModule's
    ``batch_size``, but the LR schedule was built for the old LR (``base_lrs``) and the old number of
    steps, and the hyper-parameters that hparams.yaml and the HPARAMS tab show are the ones the module
    was built with. This callback, placed right after the tuners (the CLI adds it when a tuner is
    configured), rebuilds the optimizer and schedule from the module's settings and makes the tuned
    values the recorded ones. ``config.yaml`` records them too (``cli.SaveConfigSafely``).
    """

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not any(isinstance(callback, TUNERS) for callback in trainer.callbacks):
            return
        trainer.strategy.setup_optimizers(trainer)
        # What loggers record is each object's `hparams_initial`, a copy taken when it was built; the tuners
        # set `hparams` (the module's `lr` setter, Lightning's setattr for the batch size).
        holders = [pl_module, trainer.datamodule] if trainer.datamodule is not None else [pl_module]
        for holder in holders:
            record_hyperparameters(holder)
        batch_size = trainer.datamodule.hparams.get("batch_size") if trainer.datamodule is not None else None
        rank_zero_info(f"Training with lr={getattr(pl_module, 'lr', None)} and batch_size={batch_size}, the tuned values; the run records them.")
