"""Files that a kill never tears: each is written beside its target, flushed to disk and renamed over it,
with one clear error (naming the file and the fix) when the disk is full or the folder not writable."""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from cifar_resnet.errors import UserError


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, flushed to disk, then renamed over ``path``.

    The rename is atomic within a folder, so a kill at any moment leaves either the old file or the
    new one, never a torn one; a stale ``.tmp`` file is all an interrupted save can leave behind.
    """
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` as :func:`atomic_write` does: never a torn file, clear errors."""
    atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def atomic_write(path: str | Path, write: Callable[[Any], None]) -> None:
    """Call ``write`` on a binary file beside ``path``, flush it to disk, then rename it over ``path``.

    The file gets the permissions the umask gives new files (``mkstemp`` alone would make it 0600).
    A full disk or a missing permission is a :class:`UserError` that names the file and says the
    previous file is intact.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise UserError(write_error_message(err, path)) from err
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError) and err.errno in WRITE_ERRORS:
            raise UserError(write_error_message(err, path)) from err
        raise
    _fsync_dir(path.parent)


# What stops a write, and what the user can do about it.
WRITE_ERRORS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is used up",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EROFS: "the file system is read-only",
}


def write_error_message(err: OSError, path: Path) -> str:
    """One paragraph for a write to ``path`` that failed with ``err``."""
    reason = WRITE_ERRORS.get(err.errno or 0, err.strerror or str(err))
    blocker = file_in_the_way(path) if err.errno in (errno.ENOTDIR, errno.EEXIST) else None
    if blocker is not None:
        reason = f"'{blocker}' is a file, not a folder"
    fix = "free some space" if err.errno in (errno.ENOSPC, errno.EDQUOT) else "choose a folder you may write to"
    return (
        f"Cannot write '{path}': {reason} (in the folder '{path.parent}'). Any earlier file of that name and the "
        f"checkpoints written before are intact; {fix} (or set `trainer.logger.init_args.save_dir`), then run the "
        "command again (`--ckpt_path last` resumes a fit)."
    )


def file_in_the_way(path: Path) -> Path | None:
    """The first of ``path``'s parent folders that exists but is not a folder (a file, a device), if any."""
    return next((folder for folder in reversed(path.parents) if folder.exists() and not folder.is_dir()), None)


def output_file_problem(path: Path) -> str | None:
    """Why a file cannot be written at ``path`` ("is a folder", "lies under '/x', which is a file"), or ``None``."""
    if path.is_dir():
        return "is a folder"
    blocker = file_in_the_way(path)
    return None if blocker is None else f"lies under '{blocker}', which is a file"


def _umask() -> int:
    """The process's umask (reading it means setting it; set it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a no-op where folders cannot be opened, as on Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
