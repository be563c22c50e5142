"""Callbacks that log what plain metrics do not: speed."""

from __future__ import annotations

import time
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer


class SpeedMonitor(Callback):
    """Logs ``train/epoch_time`` (s) and ``train/images_per_sec`` (all devices together) each epoch."""

    def __init__(self) -> None:
        self._start = 0.0
        self._images = 0

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._start, self._images = time.perf_counter(), 0

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._images += len(batch[1])

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - self._start
        pl_module.log("train/epoch_time", elapsed, sync_dist=True, reduce_fx="max")
        pl_module.log("train/images_per_sec", self._images * trainer.world_size / elapsed, sync_dist=True, reduce_fx="min")
