"""Files that a kill never tears: each is written beside its target, flushed to disk and renamed over it,
with one clear error (naming the file and the fix) when the disk is full or the folder not writable."""

from __future__ import annotations

import errno
import os
import stat
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
    A ``path`` that is a link to a file is written through (the link stays); one that is a device, a pipe,
    a folder or a link to one of them, or a dangling link, is refused (:func:`replaceable_target`). A full
    disk or a missing permission is a :class:`UserError` that names the file and says the previous file is
    intact; Ctrl-C in the middle of a write is the ``KeyboardInterrupt`` it was, not the error of the half
    file that the writer raises on its way out.
    """
    path = replaceable_target(Path(path))
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
        # torch.save's zip writer answers a failed write with its own RuntimeError ("unexpected pos"),
        # raised while the real reason (a Ctrl-C, a full disk) is still being handled.
        reason = first_in_chain(err, lambda e: isinstance(e, KeyboardInterrupt) or (isinstance(e, OSError) and e.errno in WRITE_ERRORS))
        if isinstance(reason, KeyboardInterrupt):
            raise reason from None
        if isinstance(reason, OSError):
            raise UserError(write_error_message(reason, path)) from err
        raise
    _fsync_dir(path.parent)


def replaceable_target(path: Path, hint: str = "") -> Path:
    """The file that writing ``path`` replaces: ``path`` itself, or the file a link at ``path`` points to.

    Raises :class:`UserError` when that is not a regular file (a folder, a device such as ``/dev/null``, a pipe
    such as ``/dev/stdout`` often is, a socket) or the link leads nowhere: renaming a new file over it would
    destroy what is there, or the link. ``hint`` ends the message (", or ...").
    """
    link = path.is_symlink()
    try:
        kind = special_file_kind(os.stat(path).st_mode)  # follows links
    except (FileNotFoundError, NotADirectoryError):
        if not link:
            return path  # a new file (a file in the way of its folder is named when the folder is made)
        kind = "a link to nothing (what it points to does not exist)"
    except OSError as err:
        kind = "a link in a loop" if err.errno == errno.ELOOP else f"not readable ({err.strerror})"
    else:
        if kind is None:
            return Path(os.path.realpath(path)) if link else path
        kind = f"a link to {kind}" if link else kind
    raise UserError(
        f"Cannot write '{path}': it is {kind}, not a file, and would be replaced. Choose a file name{hint}."
    )


def special_file_kind(mode: int) -> str | None:
    """What a file of ``st_mode`` ``mode`` is when it is no regular file ("a folder", "a device", "a pipe (FIFO)", ...)."""
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISFIFO(mode):
        return "a pipe (FIFO)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a special file"


def first_in_chain(err: BaseException, wanted: Callable[[BaseException], bool]) -> BaseException | None:
    """The first exception in ``err``'s chain (itself, then what it was raised from or during) that is ``wanted``."""
    seen: set[int] = set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        if wanted(current):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


# What stops a write, and what the user can do about it.
WRITE_ERRORS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is used up",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
    errno.EROFS: "the file system is read-only",
}


def write_error_message(err: OSError, path: Path | None) -> str:
    """One paragraph for a write to ``path`` (``None``: a file the error does not name) that failed with ``err``."""
    reason = WRITE_ERRORS.get(err.errno or 0, err.strerror or str(err))
    blocker = file_in_the_way(path) if path is not None and err.errno in (errno.ENOTDIR, errno.EEXIST) else None
    if blocker is not None:
        reason = f"'{blocker}' is a file, not a folder"
    fix = "free some space" if err.errno in (errno.ENOSPC, errno.EDQUOT) else "choose a folder you may write to"
    if path is None:
        what = f"A write failed: {reason}. The files written before it (checkpoints, config.yaml) are intact"
    else:
        what = f"Cannot write '{path}': {reason} (in the folder '{path.parent}'). Any earlier file of that name and the checkpoints written before are intact"
    return (
        f"{what}; {fix} (or set "
        "`trainer.logger.init_args.save_dir`), then run the command again (`--ckpt_path last` resumes a fit)."
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
