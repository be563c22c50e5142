"""Stopping safely: at a NaN loss before any checkpoint holds it, the DDP ranks when their launcher
fails, and a second process that would write into the same run folder."""

from __future__ import annotations

import fcntl
import math
import os
from pathlib import Path
from typing import IO, Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import Tensor

from cifar_resnet.atomic import special_file_kind
from cifar_resnet.compat import kill_launched_processes
from cifar_resnet.errors import UserError


class StopOnNonFiniteLoss(Callback):
    """Stops training at the first NaN or infinite loss; no checkpoint ever holds what it did.

    Each step only copies its loss into a small buffer on the device: reading it every step would
    make the host wait for the device every step, which slows a GPU down. The buffer is read every
    ``check_every_n_steps`` steps, before each validation and before any checkpoint is written, so
    the checkpoints written so far stay those of good steps, and the run can resume from ``last.ckpt``.
    """

    def __init__(self, check_every_n_steps: int = 50) -> None:
        """
        Args:
            check_every_n_steps: How often to look at the losses (each look waits for the device).
        """
        if check_every_n_steps < 1:
            raise UserError(f"check_every_n_steps must be positive, got {check_every_n_steps}.")
        self.check_every_n_steps = check_every_n_steps
        self._losses: Tensor | None = None  # the losses since the last look, by step % check_every_n_steps
        self._positions: dict[int, tuple[int, int]] = {}  # step -> (epoch, batch), since the last look

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        # After the step (a captured step runs no hook in between); global_step already counts it.
        step, loss = trainer.global_step - 1, outputs["loss"].detach()
        if self._losses is None or self._losses.device != loss.device:
            self._losses = torch.zeros(self.check_every_n_steps, device=loss.device)
        self._losses[step % self.check_every_n_steps].copy_(loss)
        self._positions[step] = (trainer.current_epoch, batch_idx)
        if len(self._positions) == self.check_every_n_steps:
            self.check()

    def check(self) -> None:
        """Raise if a loss since the last look was not finite (waits for the device)."""
        if self._losses is None or not self._positions:
            return
        losses = self._losses.tolist()
        for step in sorted(self._positions):
            loss = losses[step % self.check_every_n_steps]
            if not math.isfinite(loss):
                epoch, batch = self._positions[step]
                raise UserError(
                    f"The training loss became {loss} at step {step} (epoch {epoch}, batch {batch}); training stopped, "
                    "and the checkpoints written so far (all from before that step) are kept. Start again with a "
                    "lower learning rate (or 32-true precision), or resume from last.ckpt with `--ckpt_path last` "
                    "if the cause was a passing fault."
                )
        self._positions.clear()

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.check()

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.check()

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        self.check()

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.check()


class StopChildProcessesOnError(Callback):
    """When the process that launched the DDP ranks fails, kill the ranks it started.

    Lightning already ends the job when a started rank dies; the other way round, the started
    ranks would wait in a collective until its timeout (NCCL: 10 minutes and more), holding GPUs.
    """

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        kill_launched_processes(trainer)


class RunFolderLock(Callback):
    """Locks the run's folder while a command writes into it, so that a second process (a second
    ``fit --ckpt_path last`` of the same run, say) stops with a clear error instead of mixing its logs
    and checkpoints in. The lock is an ``flock`` on ``<run folder>/.lock``, which the system releases
    however the process ends, so a crash never leaves a stale lock.
    """

    LOCK_NAME = ".lock"

    def __init__(self) -> None:
        self._file: IO[str] | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        log_dir = trainer.log_dir  # every process must ask: it broadcasts
        if not trainer.is_global_zero or log_dir is None or self._file is not None:
            return
        folder = Path(log_dir)
        folder.mkdir(parents=True, exist_ok=True)
        lock = open_lock_file(folder / self.LOCK_NAME)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise UserError(
                f"Another cifar-resnet process is writing into '{folder}'. Wait for it to finish (or stop it) "
                "before resuming this run; to train a separate run, leave out `--ckpt_path`."
            ) from None
        self._file = lock

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._release()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._release()

    def _release(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def open_lock_file(path: Path) -> IO[str]:
    """``path`` opened for appending, as a regular file: never through a link (which could create or lock a file
    elsewhere) and never blocking on a pipe (opening a FIFO waits for a reader)."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK
    fd = None
    try:
        fd = os.open(path, flags, 0o666)
    except OSError:
        kind = "a link" if path.is_symlink() else special_file_kind(path.lstat().st_mode) if path.exists() else None
        if kind is None:
            raise  # a folder that may not be written: the CLI's own message
    else:
        kind = special_file_kind(os.fstat(fd).st_mode)
    if kind is not None:
        if fd is not None:
            os.close(fd)
        raise UserError(
            f"Cannot lock the run folder: '{path}' is {kind}, where this program keeps an empty lock file. Delete it "
            "and run the command again."
        )
    os.set_blocking(fd, True)
    return os.fdopen(fd, "a")
