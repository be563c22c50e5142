"""Checkpoints that survive a kill, load without running code, fit the model they are loaded into,
and fail with errors that name the file."""

from __future__ import annotations

import errno
import inspect
import os
import tempfile
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Callable

import torch
from lightning.fabric.plugins import CheckpointIO
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning_utilities.core.apply_func import apply_to_collection
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins.io import AsyncCheckpointIO
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor

from cifar_resnet.errors import UserError
from cifar_resnet.tensor_files import UnreadableFile, UnsafeFile, load_tensors
from cifar_resnet.models.state_dicts import state_dict_mismatch

LAST = "last.ckpt"
# Where a checkpoint says which layout it has. Raise SCHEMA_VERSION when a checkpoint's layout changes in a
# way older checkpoints need converting for (a setting renamed or removed, a state moved); a setting added
# with a default that reproduces the old behaviour needs nothing (see :func:`check_checkpoint_fits`).
SCHEMA_KEY = "cifar_resnet"
SCHEMA_VERSION = 1
# The class attribute that lists a model's network settings (see :func:`network_settings`).
NETWORK_SETTINGS = "network_settings"


def stamp_schema(checkpoint: dict[str, Any]) -> None:
    """Record the checkpoint layout's version and the program's in ``checkpoint``."""
    from cifar_resnet import __version__

    checkpoint[SCHEMA_KEY] = {"schema": SCHEMA_VERSION, "program_version": __version__}


def setting_defaults(cls: type) -> dict[str, Any]:
    """Every setting of ``cls``'s constructor and the defaults it has there (``inspect.Parameter.empty``
    for none): the ``__init__`` signatures along the MRO, a subclass's first, followed through ``**kwargs``."""
    defaults: dict[str, Any] = {}
    for klass in cls.__mro__:
        init = vars(klass).get("__init__")
        if init is None:
            continue
        parameters = list(inspect.signature(init).parameters.values())[1:]  # without self
        for parameter in parameters:
            if parameter.kind not in (parameter.VAR_POSITIONAL, parameter.VAR_KEYWORD):
                defaults.setdefault(parameter.name, parameter.default)
        if not any(p.kind is p.VAR_KEYWORD for p in parameters):
            break
    return defaults


def network_settings(cls: type) -> frozenset[str]:
    """The settings that change what ``cls``'s network is: the union of the ``network_settings`` class
    attributes along the MRO, declared beside each constructor. A checkpoint loads only where these equal
    the config's; every other constructor setting may differ (the config's value is used)."""
    names = frozenset().union(*(vars(klass).get(NETWORK_SETTINGS, ()) for klass in cls.__mro__))
    unknown = names - setting_defaults(cls).keys()
    if unknown:
        raise TypeError(f"{cls.__name__}.{NETWORK_SETTINGS} names {', '.join(sorted(unknown))}, which its constructor does not take.")
    return names


def read_checkpoint(path: str | Path, map_location: Any = "cpu", weights_only: bool = True) -> dict[str, Any]:
    """Load a Lightning checkpoint with ``torch.load`` (``weights_only`` by default), with clear errors."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"Checkpoint '{path}' not found. Check `--ckpt_path` (or use `--ckpt_path last`).")
    try:
        checkpoint = load_tensors(path, map_location=map_location, weights_only=weights_only)
    except UnsafeFile as err:
        raise UserError(
            f"Refusing to load checkpoint '{path}': it holds objects other than tensors and plain values, which "
            f"could run code when loaded ({err}). Only load checkpoints this program wrote."
        ) from err
    except UnreadableFile as err:
        raise UserError(
            f"Cannot read checkpoint '{path}': the file is truncated or corrupt ({err}). Resume from "
            "another checkpoint of the run (the best one, or an earlier copy), or start again."
        ) from err
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), Mapping):
        raise UserError(
            f"'{path}' is not a Lightning checkpoint of this program (it has no 'state_dict'; a bare state dict "
            "or weights file is not enough). Pass a checkpoint from a run's checkpoints/ folder."
        )
    return checkpoint


def check_checkpoint_fits(module: LightningModule, checkpoint: dict[str, Any], path: str | None = None) -> None:
    """Refuse, with one clear paragraph, a checkpoint of another model class, of a newer program, of other
    network settings than the config's (:func:`network_settings`: ``num_classes``, ``dropout``, ...), or with
    other weight shapes.

    Every other setting may differ: the config's value is used. A checkpoint written before a setting
    existed was trained as that setting's default says (a new setting's default reproduces the old
    behaviour); the default is filled into its ``hyper_parameters``, and one line says so.
    """
    name = f" '{path}'" if path else ""
    fix = "Use the config the checkpoint was trained with (config.yaml in its run folder)."
    stamp = checkpoint.get(SCHEMA_KEY) or {}
    schema = stamp.get("schema", 0)
    if schema > SCHEMA_VERSION:
        raise UserError(
            f"The checkpoint{name} was written by a newer cifar-resnet ({stamp.get('program_version', 'unknown')}, checkpoint "
            f"schema {schema}; this one reads up to {SCHEMA_VERSION}). Upgrade cifar-resnet to load it."
        )
    trained = checkpoint.setdefault("hyper_parameters", {})
    kind = str(trained.get("_class_path", "")).rsplit(".", 1)[-1]
    if kind and kind != type(module).__name__:
        raise UserError(
            f"The checkpoint{name} holds a {kind}, but the config asks for a {type(module).__name__}. {fix[:-1]}, "
            "or the recipe in configs/ for that model."
        )
    theirs = {k: v for k, v in trained.items() if not k.startswith("_")}
    ours = {k: v for k, v in module.hparams.items() if not k.startswith("_")}
    unknown = sorted(theirs.keys() - ours.keys())
    if theirs and unknown:
        raise UserError(
            f"The checkpoint{name} was written by another version of this program: settings unknown here: "
            f"{', '.join(unknown)}. Load it with the version of cifar-resnet that wrote it."
        )
    missing = sorted(ours.keys() - theirs.keys()) if theirs else []
    if missing:
        defaults = setting_defaults(type(module))
        filled = {k: defaults[k] for k in missing if defaults.get(k, inspect.Parameter.empty) is not inspect.Parameter.empty}
        trained.update(filled)
        theirs.update(filled)
        rank_zero_info(
            f"The checkpoint{name} predates the settings {', '.join(missing)} (checkpoint schema {schema}, this program's "
            f"{SCHEMA_VERSION}); it was trained as their defaults say: {', '.join(f'{k}={v!r}' for k, v in filled.items())}."
        )
    differ = sorted(k for k in network_settings(type(module)) if k in theirs and theirs[k] != ours[k])
    if differ:
        predates = [k for k in differ if k in missing]
        raise UserError(
            f"The checkpoint{name} was trained with {', '.join(f'{k}={theirs[k]!r}' for k in differ)}"
            + (f" (the default of {', '.join(predates)}: it predates the setting)" if predates else "")
            + f", but the config says {', '.join(f'{k}={ours[k]!r}' for k in differ)}. {fix}"
        )
    details = state_dict_mismatch(module.state_dict(), checkpoint["state_dict"])
    if details:
        raise UserError(
            f"The checkpoint{name} holds the weights of {kind or 'another model'}, which do not fit "
            f"{type(module).__name__} ({details}). {fix}"
        )


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
    fix = "free some space" if err.errno in (errno.ENOSPC, errno.EDQUOT) else "choose a folder you may write to"
    return (
        f"Cannot write '{path}': {reason} (in the folder '{path.parent}'). Any earlier file of that name and the "
        f"checkpoints written before are intact; {fix} (or set `trainer.logger.init_args.save_dir`), then run the "
        "command again (`--ckpt_path last` resumes a fit)."
    )


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


def find_last_checkpoint(experiment_dir: str | Path) -> Path | None:
    """The newest complete checkpoint in ``<version>/checkpoints/`` of a logger's experiment folder, if any.

    Usually a run's ``last.ckpt``; but if a kill lands while a ``last.ckpt`` is being written (after the
    epoch's best checkpoint), the best checkpoint is newer and holds the same training state. Writes are
    atomic, so every ``*.ckpt`` is complete.
    """
    return newest_checkpoint(Path(experiment_dir).glob("*/checkpoints/*.ckpt"))


def newest_checkpoint(candidates: Iterable[Path]) -> Path | None:
    """The most recently written of ``candidates``; on equal times ``last.ckpt`` (both hold the same step)."""
    return max(candidates, key=lambda p: (p.stat().st_mtime_ns, p.name == LAST), default=None)


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


class RandomStates(Callback):
    """Keeps the random generators' states in every checkpoint and restores them on resume, so a
    resumed run draws the same flips and dropout masks as an uninterrupted one."""

    def state_dict(self) -> dict[str, Tensor]:
        """The generators' states (saved into the checkpoint)."""
        return rng_states()

    def load_state_dict(self, state_dict: dict[str, Tensor]) -> None:
        """Restore the generators' states from a checkpoint."""
        set_rng_states(state_dict)


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
