"""``last.ckpt``: written at the end of every epoch, and found again by ``--ckpt_path last``."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_info

from cifar_resnet.tensor_files import not_a_file

LAST = "last.ckpt"


def find_last_checkpoint(experiment_dir: str | Path) -> Path | None:
    """The newest complete checkpoint in ``<version>/checkpoints/`` of a logger's experiment folder, if any.

    Usually a run's ``last.ckpt``; but if a kill lands while a ``last.ckpt`` is being written (after the
    epoch's best checkpoint), the best checkpoint is newer and holds the same training state. Writes are
    atomic, so every ``*.ckpt`` is complete.
    """
    return newest_checkpoint(Path(experiment_dir).glob("*/checkpoints/*.ckpt"))


def newest_checkpoint(candidates: Iterable[Path]) -> Path | None:
    """The most recently written of ``candidates``; on equal times ``last.ckpt`` (both hold the same step).

    A candidate that is no file (a folder, a link to nothing or in a loop, a pipe) is skipped with one line.
    """
    files = []
    for path in candidates:
        problem = not_a_file(path)
        if problem is None:
            files.append((path.stat().st_mtime_ns, path.name == LAST, path))
        else:
            rank_zero_info(f"Looking for the newest checkpoint: '{path}' {problem}, so it was skipped.")
    return max(files, key=lambda found: found[:2])[2] if files else None


class LastCheckpoint(ModelCheckpoint):
    """Writes ``checkpoints/last.ckpt`` at the end of every epoch, whatever the monitored metric does.

    Lightning 2.6's ``ModelCheckpoint(monitor=..., save_last=True)`` refreshes ``last.ckpt`` only in
    epochs where the metric improved, so a run whose metric stalls would resume from an old epoch.
    The CLI adds this callback to every run; it turns ``save_last`` off on the other checkpoint
    callbacks, so that ``last.ckpt`` has one writer.
    """

    def __init__(self) -> None:
        super().__init__(filename=LAST.removesuffix(".ckpt"), save_top_k=1, enable_version_counter=False)

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Find the checkpoint folder, and be the only writer of ``last.ckpt``."""
        super().setup(trainer, pl_module, stage)
        for callback in trainer.checkpoint_callbacks:
            if callback is not self:
                callback.save_last = False
