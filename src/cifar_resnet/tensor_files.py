"""Reading ``torch.save`` files that may be damaged or hostile: every way a load can fail becomes one of
two exceptions with a one-line reason, so each caller can name its file and the fix."""

from __future__ import annotations

import pickle
import warnings
from pathlib import Path
from typing import Any

import torch


class UnreadableFile(Exception):
    """The file cannot be read: truncated, corrupt, not a ``torch.save`` file, or not readable at all."""


class UnsafeFile(Exception):
    """The file holds objects other than tensors and plain values: loading it could run code."""


def not_a_file(path: Path) -> str | None:
    """Why ``path`` cannot be read as a file ("not found", "is a folder", ...), or ``None`` when it can be."""
    if path.is_file():
        return None
    if path.is_dir():
        return "is a folder, not a file"
    if path.exists():
        return "is not a regular file (a device, pipe or socket)"
    if path.is_symlink():
        return "is a link that leads nowhere (to a missing file, or in a loop)"
    return "not found"


def load_tensors(path: str | Path, map_location: Any = "cpu", weights_only: bool = True) -> Any:
    """``torch.load`` (``weights_only`` by default), raising :class:`UnsafeFile` or :class:`UnreadableFile`."""
    try:
        with warnings.catch_warnings():
            # Random bytes read as a pickle "protocol 138": torch warns before it fails.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location=map_location, weights_only=weights_only)
    except PermissionError as err:
        raise UnreadableFile(f"permission denied: {err.strerror}") from err
    except pickle.UnpicklingError as err:
        refused = [line.strip() for line in str(err).splitlines() if "Unsupported global" in line]
        if refused:
            raise UnsafeFile(refused[0]) from err
        raise UnreadableFile(_first_line(err)) from err
    except Exception as err:
        # Damaged bytes surface from the unpickler or the zip reader as almost any exception
        # (EOFError, IndexError, KeyError, struct.error, UnicodeDecodeError, RuntimeError, ...).
        raise UnreadableFile(f"{type(err).__name__}: {_first_line(err)}") from err


def _first_line(err: BaseException) -> str:
    """The first line of an exception's message (torch's pickle errors run to a page)."""
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__
