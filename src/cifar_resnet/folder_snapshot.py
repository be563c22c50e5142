"""A run folder as it was before a resume, so that a resume that fails before it trained a step or wrote a
checkpoint can leave the folder as it found it: no new event files, no rewritten ``hparams.yaml``."""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer

from cifar_resnet.atomic import atomic_write

KEPT_BYTES = 16 * 2**20  # the settings and CSV files a logger rewrites are kept up to this size
LOCK_NAME = ".lock"


def _files(folder: Path) -> dict[str, tuple[int, int]]:
    """Every regular file under ``folder`` (not following links), by relative path: (size, modification time);
    folders with a time of -1."""
    found = {}
    for root, folders, names in os.walk(folder):
        found.update({str((Path(root) / name).relative_to(folder)): (0, -1) for name in folders})
        for name in names:
            path = Path(root) / name
            try:
                info = path.lstat()
            except OSError:
                continue
            if not stat.S_ISREG(info.st_mode):
                continue  # links, pipes (reading a FIFO would wait forever)
            found[str(path.relative_to(folder))] = (info.st_size, info.st_mtime_ns)
    return found


@dataclass
class FolderSnapshot:
    """What was in a run folder: its files' sizes and times, and the bytes of the small files at its top."""

    folder: Path
    files: dict[str, tuple[int, int]] = field(default_factory=dict)
    kept: dict[str, bytes] = field(default_factory=dict)

    @classmethod
    def take(cls, folder: Path) -> FolderSnapshot:
        """The snapshot of ``folder`` now (empty if it does not exist)."""
        files = _files(folder) if folder.is_dir() else {}
        kept = {}
        for name, (size, _) in files.items():
            if "/" not in name and size <= KEPT_BYTES and not name.startswith("events.out.tfevents"):
                try:
                    kept[name] = (folder / name).read_bytes()
                except OSError:
                    pass
        return cls(folder, files, kept)

    def wrote_checkpoint(self) -> bool:
        """Whether a checkpoint was written or replaced in the folder since the snapshot."""
        now = _files(self.folder) if self.folder.is_dir() else {}
        return any(name.endswith(".ckpt") and self.files.get(name) != stamp for name, stamp in now.items())

    def restore(self) -> list[str]:
        """Remove the files added since the snapshot and put back the kept files that changed; returns what
        it removed or put back (relative paths)."""
        changed = []
        now = _files(self.folder)
        for name, stamp in sorted(now.items(), key=lambda item: -item[0].count("/")):  # a folder after its files
            if name in self.files and (stamp == self.files[name] or stamp[1] == -1):
                continue
            path = self.folder / name
            if stamp[1] == -1:
                if not any(os.scandir(path)):
                    path.rmdir()
                    changed.append(name)
                continue
            if name in self.kept:
                atomic_write(path, lambda f, data=self.kept[name]: f.write(data))
            elif name not in self.files and name != LOCK_NAME:
                path.unlink(missing_ok=True)
            else:
                continue
            changed.append(name)
        return changed


class StepCounter(Callback):
    """Counts the training steps this command completed (a failed resume that completed none is undone; one that
    did keeps its logs, which show what went wrong)."""

    def __init__(self) -> None:
        self.steps = 0

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.steps += 1
