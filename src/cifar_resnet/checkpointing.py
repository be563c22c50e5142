"""Checkpoints that survive a kill, load without running code, and fail with errors that name the file."""

from __future__ import annotations

import os
import pickle
import tempfile
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Callable

import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.fabric.utilities.types import _PATH
from torch import Tensor

from cifar_resnet.errors import UserError

LAST = "last.ckpt"


def read_checkpoint(path: str | Path, map_location: Any = "cpu", weights_only: bool = True) -> dict[str, Any]:
    """Load a Lightning checkpoint with ``torch.load`` (``weights_only`` by default), with clear errors."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"Checkpoint '{path}' not found. Check `--ckpt_path` (or use `--ckpt_path last`).")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=weights_only)
    except pickle.UnpicklingError as err:
        refused = [line.strip() for line in str(err).splitlines() if "Unsupported global" in line]
        if not refused:  # not a pickle of ours at all: random bytes, another format
            raise UserError(f"Cannot read checkpoint '{path}': the file is truncated or corrupt (not a checkpoint).") from err
        raise UserError(
            f"Refusing to load checkpoint '{path}': it holds objects other than tensors and plain values, which "
            f"could run code when loaded ({refused[0]}). Only load checkpoints this program wrote."
        ) from err
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as err:
        raise UserError(
            f"Cannot read checkpoint '{path}': the file is truncated or corrupt ({_first_line(err)}). Resume from "
            "another checkpoint of the run (the best one, or an earlier copy), or start again."
        ) from err
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), Mapping):
        raise UserError(f"'{path}' is not a Lightning checkpoint of this program (it has no 'state_dict').")
    return checkpoint


def _first_line(err: BaseException) -> str:
    """The first line of an exception's message (torch's pickle errors run to a page)."""
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save`` to a temporary file beside ``path``, flushed to disk, then renamed over ``path``.

    The rename is atomic within a folder, so a kill at any moment leaves either the old file or the
    new one, never a torn one; a stale ``.tmp`` file is all an interrupted save can leave behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


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


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint IO with atomic local saves and ``weights_only`` loads with clear errors.

    Lightning's own save stages the file in the system temp folder and moves it, which is a plain,
    interruptible copy when that folder is on another disk; this one writes beside the target.
    Remote paths (``s3://`` and the like) keep Lightning's behaviour.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None) -> None:
        """Write ``checkpoint`` to ``path`` atomically."""
        if "://" in str(path):
            return super().save_checkpoint(checkpoint, path, storage_options)
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options.")
        atomic_save(checkpoint, path)

    def load_checkpoint(
        self, path: _PATH, map_location: Callable | None = lambda storage, loc: storage, weights_only: bool | None = None
    ) -> dict[str, Any]:
        """Load ``path``; ``weights_only`` unless the caller explicitly says ``False``."""
        if "://" in str(path):
            return super().load_checkpoint(path, map_location, weights_only)
        return read_checkpoint(path, map_location, weights_only=weights_only is not False)


def find_last_checkpoint(experiment_dir: str | Path) -> Path | None:
    """The newest ``<version>/checkpoints/last.ckpt`` of a logger's experiment folder, if any."""
    candidates = list(Path(experiment_dir).glob(f"*/checkpoints/{LAST}"))
    return max(candidates, key=lambda p: p.stat().st_mtime) if candidates else None


def rng_states() -> dict[str, Tensor]:
    """The CPU and current CUDA device's random generator states, as tensors (``weights_only``-safe).

    Under DDP every rank is seeded alike and draws alike, so rank 0's states (the ones a checkpoint
    keeps) are every rank's.
    """
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def set_rng_states(states: Mapping[str, Tensor]) -> None:
    """Restore what :func:`rng_states` returned."""
    if "cpu" in states:
        torch.set_rng_state(states["cpu"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state(states["cuda"])
