"""How fast a fit goes and where its wall time went: images/s, epoch and warm-up times, start-up,
validation and checkpoint seconds."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from cifar_resnet.checkpointing import checkpoint_host_seconds, damaged_part

IMPORTED_AT = time.time()


class SpeedMonitor(Callback):
    """Logs how fast training goes and how long a fit has taken.

    Each epoch: ``train/epoch_time`` (s) and ``train/images_per_sec`` (all devices together), and in
    the progress bar the running images/s of the epoch and the training loss. After each validation
    epoch (not the sanity check): ``time/elapsed_s``, wall seconds since the fit started, at the same
    step as ``val/top1``, so accuracy can be plotted against time; a resumed run's clock goes on from
    where its checkpoint left it (the checkpoint keeps it), so a run stopped and resumed reads as one. Once: ``time/warmup_s``, the wall
    seconds of the first training step plus the first validation batch, which is what compiling and
    cuDNN autotuning cost (fit time without them = last ``time/elapsed_s`` - ``time/warmup_s``). At
    the end of the fit, on CUDA: ``gpu/peak_memory_gib``. The clocks wait for the device only at
    these points, never in the steps between.
    """

    def __init__(self) -> None:
        self._start = 0.0
        self._images = 0
        self._fit_start = 0.0
        self._earlier_s = 0.0  # fit time of the commands before this one, for a resumed run
        self._warmup: dict[str, float] = {}
        self._batch_start: float | None = None

    @staticmethod
    def _now(pl_module: LightningModule) -> float:
        """Wall-clock seconds, once the device has finished the work queued so far."""
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        return time.perf_counter()

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)
        self._warmup, self._batch_start = {}, None
        self._fit_start = self._now(pl_module)

    def state_dict(self) -> dict[str, float]:
        """The run's fit time so far (saved in checkpoints)."""
        running = time.perf_counter() - self._fit_start if self._fit_start else 0.0
        return {"elapsed_s": self._earlier_s + running}

    def load_state_dict(self, state_dict: dict[str, float]) -> None:
        """Go on from a checkpoint's fit time (checkpoints are restored before ``on_fit_start``)."""
        elapsed = state_dict.get("elapsed_s", 0.0)
        if isinstance(elapsed, bool) or not isinstance(elapsed, (int, float)):
            raise damaged_part("fit time (SpeedMonitor's elapsed_s)", f"is {elapsed!r}, not a number of seconds")
        self._earlier_s = float(elapsed)

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start, self._images = self._now(pl_module), 0

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if "train" not in self._warmup:
            self._batch_start = self._now(pl_module)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._images += len(batch[1])
        if "train" not in self._warmup:
            self._warmup["train"] = self._now(pl_module) - self._batch_start
            self._log_warmup(trainer)
        # Showing a figure makes the host wait for the device, so the bar's figures change only every
        # `log_every_n_steps` steps (and at the end of the epoch), not every step.
        due = (batch_idx + 1) % trainer.log_every_n_steps == 0 or batch_idx + 1 == trainer.num_training_batches
        elapsed = time.perf_counter() - self._start
        if trainer.progress_bar_callback is not None and due and elapsed > 0:
            rate = self._images * trainer.world_size / elapsed
            pl_module.log("img/s", float(round(rate)), prog_bar=True, logger=False, on_step=True, on_epoch=False)
            pl_module.log("loss", outputs["loss"], prog_bar=True, logger=False, on_step=True, on_epoch=False)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        elapsed = self._now(pl_module) - self._start
        pl_module.log("train/epoch_time", elapsed, sync_dist=True, reduce_fx="max")
        pl_module.log("train/images_per_sec", self._images * trainer.world_size / elapsed, sync_dist=True, reduce_fx="min")

    def on_validation_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if trainer.state.fn == "fit" and "val" not in self._warmup:
            self._batch_start = self._now(pl_module)

    def on_validation_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if trainer.state.fn == "fit" and "val" not in self._warmup:
            self._warmup["val"] = self._now(pl_module) - self._batch_start
            self._log_warmup(trainer)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            pl_module.log("time/elapsed_s", self._earlier_s + self._now(pl_module) - self._fit_start, sync_dist=True, reduce_fx="max")

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if pl_module.device.type == "cuda":
            self._log_now(trainer, {"gpu/peak_memory_gib": torch.cuda.max_memory_allocated(pl_module.device) / 2**30})

    def _log_warmup(self, trainer: Trainer) -> None:
        """Log ``time/warmup_s`` when both the first training step and the first validation batch are timed."""
        if set(self._warmup) == {"train", "val"}:
            self._log_now(trainer, {"time/warmup_s": self._warmup["train"] + self._warmup["val"]})

    @staticmethod
    def _log_now(trainer: Trainer, metrics: dict[str, float]) -> None:
        """Write ``metrics`` to every logger at the current step (rank 0 only; outside Lightning's epoch bookkeeping)."""
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)


class WallClock(Callback):
    """Logs where a fit's wall time went, once, at its end, so that what keeps the device waiting shows:

    ``time/startup_s`` (from the start of the process to the first training step: imports, reading the
    archive, building the model, the sanity check), ``time/validation_s`` (all validation epochs of the
    fit), ``time/checkpoint_s`` (what writing checkpoints cost the training thread; with the recipes'
    :class:`~cifar_resnet.checkpointing.BackgroundCheckpointIO`, the copies and the final wait) beside
    ``time/warmup_s`` and ``train/epoch_time`` of :class:`SpeedMonitor` and ``time/figures_s`` of
    :class:`ClassFigures`. The clocks wait for the device only at the start and end of each validation.
    """

    def __init__(self) -> None:
        self._startup: float | None = None
        self._validation = 0.0
        self._validation_start = 0.0

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._startup, self._validation = None, 0.0

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self._startup is None:
            self._startup = time.time() - process_start_time()

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._validation_start = SpeedMonitor._now(pl_module)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._validation += SpeedMonitor._now(pl_module) - self._validation_start

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # After Lightning's teardown, which waited for the checkpoints written in the background.
        metrics = {"time/validation_s": self._validation}
        if self._startup is not None:
            metrics["time/startup_s"] = self._startup
        checkpoint_s = checkpoint_host_seconds(trainer)
        if checkpoint_s is not None:
            metrics["time/checkpoint_s"] = checkpoint_s
        SpeedMonitor._log_now(trainer, metrics)


def process_start_time() -> float:
    """When this process started (``time.time()`` scale): from ``/proc`` on Linux, else when this program was imported."""
    try:
        started = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return time.time() - (uptime - started)
    except (OSError, ValueError, IndexError):
        return IMPORTED_AT
