"""Test-only callbacks that inject faults; the CLI imports them by class path (``faults.RaiseOnRank``)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer


class RaiseOnRank(Callback):
    """Raises in one process at one training step, as a crashing GPU or a bug on one rank would."""

    def __init__(self, rank: int = 1, step: int = 1) -> None:
        self.rank = rank
        self.step = step

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            raise RuntimeError(f"injected fault on rank {self.rank} at step {self.step}")


class PoisonWeights(Callback):
    """Sets the network's weights to NaN before one training step, as a diverging run would."""

    def __init__(self, step: int = 1) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                for p in pl_module.parameters():
                    p.fill_(float("nan"))


class HangOnRank(Callback):
    """Writes its process id to ``pid_file``, then blocks forever in one process at one step (a hung rank)."""

    def __init__(self, pid_file: str, rank: int = 1, step: int = 1) -> None:
        self.pid_file = pid_file
        self.rank = rank
        self.step = step

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.global_rank == self.rank:
            Path(self.pid_file).write_text(str(os.getpid()))

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            while True:
                time.sleep(1)


class SlowDown(Callback):
    """Sleeps before every training batch, to give a test time to kill the run mid-epoch."""

    def __init__(self, seconds: float = 0.5) -> None:
        self.seconds = seconds

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        time.sleep(self.seconds)
