"""Lightning checkpoint IO: atomic local writes, ``weights_only`` reads, and writing in the background."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

from lightning.fabric.plugins import CheckpointIO
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch import Trainer
from lightning.pytorch.plugins.io import AsyncCheckpointIO
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor

from cifar_resnet.atomic import atomic_save
from cifar_resnet.checkpointing.compatibility import read_checkpoint


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO with atomic local saves and ``weights_only`` loads with clear errors.

    Lightning's own save stages the file in the system temp folder and moves it, which is a plain,
    interruptible copy when that folder is on another disk; this one writes beside the target.
    Remote paths (``s3://`` and the like) keep Lightning's behaviour.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None) -> None:
        """Write ``checkpoint`` to ``path`` atomically."""
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options.")
        atomic_save(checkpoint, path)

    def load_checkpoint(
        self, path: str | Path, map_location: Callable | None = lambda storage, loc: storage, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """Load ``path``; ``weights_only`` unless the caller explicitly says ``False``."""
        if "://" in str(path):
            return super().load_checkpoint(path, map_location, weights_only)
        return read_checkpoint(path, map_location, weights_only=weights_only is not False)


class BackgroundCheckpointIO(AsyncCheckpointIO):
    """Writes checkpoints on a background thread while training goes on, through ``checkpoint_io``
    (:class:`AtomicCheckpointIO` by default), so each write is still atomic.

    The checkpoint's tensors are copied on the training thread before it goes on, so a checkpoint holds
    the state of the moment it was asked for, bit for bit. Writes and removals run one at a time in the
    order asked: a best checkpoint that a newer one replaces is deleted only once the newer one is on
    disk, and never after a write failed. A failed write (a full disk, say) is raised on the training
    thread at the next checkpoint or at the end of the command, whichever comes first, as the same error.
    The end of the command (also on Ctrl-C and SIGTERM) waits for the write in flight. ``host_s`` adds
    up the seconds the training thread spent on checkpoints (copying, and waiting at the end).
    """

    def __init__(self, checkpoint_io: CheckpointIO | None = None) -> None:
        """
        Args:
            checkpoint_io: What writes each checkpoint (default: the atomic writer).
        """
        super().__init__(checkpoint_io if checkpoint_io is not None else AtomicCheckpointIO())
        self.host_s = 0.0
        self._raised = False

    def _raise_failure(self) -> None:
        """Raise (once) the error of a write that failed in the background; later jobs stay skipped."""
        if self._error is not None and not self._raised:
            self._raised = True
            raise self._error

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | Path, storage_options: Any | None = None) -> None:
        """Copy ``checkpoint``'s tensors now; write them to ``path`` in the background."""
        start = time.perf_counter()
        self._raise_failure()
        copy = apply_to_collection(checkpoint, Tensor, lambda t: t.detach().clone())
        inner = self.checkpoint_io
        assert inner is not None
        self._in_background(lambda: inner.save_checkpoint(copy, path, storage_options))
        self.host_s += time.perf_counter() - start

    def remove_checkpoint(self, path: str | Path) -> None:
        """Delete ``path`` once the writes asked for before are done, unless one of them failed."""
        inner = self.checkpoint_io
        assert inner is not None
        self._in_background(lambda: inner.remove_checkpoint(path))

    def _in_background(self, job: Callable[[], None]) -> None:
        """Queue ``job`` behind the jobs queued before; it is skipped once a job has failed."""

        def run() -> None:
            if self._error is None:
                try:
                    job()
                except BaseException as err:  # noqa: BLE001 (raised on the training thread)
                    self._error = err

        self._ensure_setup()
        assert self._executor is not None
        self._executor.submit(run)

    def wait(self) -> None:
        """Block until the writes asked for so far are done; raise a failed write's error."""
        start = time.perf_counter()
        if self._executor is not None:
            self._executor.submit(lambda: None).result()
        self.host_s += time.perf_counter() - start
        self._raise_failure()

    def teardown(self) -> None:
        """Wait for the writes in flight; raise a failed write's error if it was not raised yet."""
        start = time.perf_counter()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        self.host_s += time.perf_counter() - start
        error, raised = self._error, self._raised
        self._error, self._raised = None, False  # every job is done: the next command starts clean
        if error is not None and not raised:
            raise error


def wait_for_checkpoints(trainer: Trainer) -> None:
    """Block until the checkpoints asked for so far are on disk (with :class:`BackgroundCheckpointIO`);
    raise the error of one that failed."""
    checkpoint_io = trainer.strategy.checkpoint_io
    if isinstance(checkpoint_io, BackgroundCheckpointIO):
        checkpoint_io.wait()


def checkpoint_host_seconds(trainer: Trainer) -> float | None:
    """Seconds the training thread spent on background checkpoints so far (``None`` for another checkpoint IO)."""
    return getattr(trainer.strategy.checkpoint_io, "host_s", None)
