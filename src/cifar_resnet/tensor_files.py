"""Reading ``torch.save`` files that may be damaged or hostile: every way a load can fail becomes one of
two exceptions with a one-line reason, so each caller can name its file and the fix; and checking, before
``torch.load``, that a checkpoint is laid out as ``torch.save`` writes it (:func:`check_torch_zip`)."""

from __future__ import annotations

import functools
import io
import pickle
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch


class UnreadableFile(Exception):
    """The file cannot be read: truncated, corrupt, not a ``torch.save`` file, or not readable at all."""


class UnsafeFile(Exception):
    """The file holds objects other than tensors and plain values: loading it could run code. ``name``: the
    global it names that is not allowed (``posix.system``), where known."""

    def __init__(self, message: str, name: str | None = None) -> None:
        super().__init__(message)
        self.name = name


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
        # torch names a global it refuses as "Unsupported global: GLOBAL x.y ..." or "unsupported GLOBAL x.y whose ...".
        refused = [line.strip() for line in str(err).splitlines() if "unsupported global" in line.lower()]
        if refused:
            name = re.search(r"GLOBAL ([\w.]+)", refused[0])
            raise UnsafeFile(refused[0], name.group(1).rstrip(".") if name else None) from err
        raise UnreadableFile(_first_line(err)) from err
    except Exception as err:
        # Damaged bytes surface from the unpickler or the zip reader as almost any exception
        # (EOFError, IndexError, KeyError, struct.error, UnicodeDecodeError, RuntimeError, ...).
        raise UnreadableFile(f"{type(err).__name__}: {_first_line(err)}") from err


def _first_line(err: BaseException) -> str:
    """The first line of an exception's message (torch's pickle errors run to a page)."""
    text = str(err).strip().splitlines()
    return text[0] if text else type(err).__name__


class ForeignFile(UnreadableFile):
    """The file is not laid out as ``torch.save`` writes a file: compressed or overlapping zip records, a record
    of another size than the tensors it holds, a pickle too large to be a checkpoint's; refused before ``torch.load``."""


# The most a checkpoint's pickle (everything but the tensors' bytes) may hold: this program's take kilobytes.
MAX_PICKLE_BYTES = 16 * 2**20


def check_torch_zip(path: str | Path, max_pickle_bytes: int = MAX_PICKLE_BYTES) -> None:
    """Refuse, before ``torch.load`` reads a byte of it into tensors, a file that is not a ``torch.save`` zip file as
    this program writes one, so that a crafted file cannot make the load take memory its size does not account for.

    ``torch.save`` stores every record uncompressed, once each, and a tensor's record holds exactly the bytes of the
    storage the pickle declares. So every record must be stored (not deflated: a few MB would inflate to GBs), the
    records together no larger than the file (no two overlapping), the pickle at most ``max_pickle_bytes``, and each
    tensor record the size its storage declares. The pickle is read for the storages it declares without importing
    or calling anything (which globals it may name is for ``torch.load(weights_only=True)`` to say).
    """
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            records = archive.infolist()
            problem = _zip_layout_problem(records, path.stat().st_size, max_pickle_bytes)
            if problem:
                raise ForeignFile(problem)
            prefix = records[0].filename.split("/", 1)[0]
            sizes = {record.filename: record.file_size for record in records}
            scan = _PickleScan(io.BytesIO(archive.read(f"{prefix}/data.pkl")))
            scan.load()
    except ForeignFile:
        raise
    except PermissionError as err:
        raise UnreadableFile(f"permission denied: {err.strerror}") from err
    except zipfile.BadZipFile as err:
        raise UnreadableFile(f"not a zip file as torch.save writes ({_first_line(err)})") from err
    except Exception as err:  # damaged bytes surface from the zip reader or the pickle as almost any exception
        raise UnreadableFile(f"{type(err).__name__}: {_first_line(err)}") from err
    for key, nbytes in scan.storages.items():
        record = f"{prefix}/data/{key}"
        if record not in sizes:
            raise ForeignFile(f"it declares a tensor record '{record}' that it does not hold")
        if sizes[record] != nbytes:
            raise ForeignFile(f"its record '{record}' holds {sizes[record]:,} bytes, but its tensors declare {nbytes:,}")


def _zip_layout_problem(records: list[zipfile.ZipInfo], file_size: int, max_pickle_bytes: int) -> str | None:
    """What about the zip's records ``torch.save`` never writes, or ``None``."""
    if not records:
        return "it is an empty zip file"
    names = [record.filename for record in records]
    prefix = names[0].split("/", 1)[0]
    if len(set(names)) != len(names):
        return "it holds two records of the same name"
    for record in records:
        if record.compress_type != zipfile.ZIP_STORED or record.compress_size != record.file_size:
            return f"its record '{record.filename}' is compressed, which torch.save never does"
        if record.flag_bits & 0x1:
            return f"its record '{record.filename}' is encrypted"
        if not record.filename.startswith(f"{prefix}/"):
            return f"its records lie in more than one folder ('{prefix}/', '{record.filename}')"
    total = sum(record.file_size for record in records)
    if total > file_size:
        return f"its records hold {total:,} bytes, more than the file's {file_size:,} (they overlap)"
    pickle_record = next((record for record in records if record.filename == f"{prefix}/data.pkl"), None)
    if pickle_record is None:
        return f"it has no '{prefix}/data.pkl' record"
    if pickle_record.file_size > max_pickle_bytes:
        return f"its pickle holds {pickle_record.file_size:,} bytes, more than a checkpoint's {max_pickle_bytes:,} at most"
    return None


class _Stub:
    """What every global of a scanned pickle stands for: it takes any arguments and state, and does nothing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, value: Any) -> None:
        pass

    def extend(self, values: Any) -> None:
        pass


class _StorageType(_Stub):
    """A storage class a pickle names (``torch.FloatStorage``), with its element size in bytes."""

    def __init__(self, name: str, itemsize: int) -> None:
        self.name, self.itemsize = name, itemsize

    def __call__(self, *args: Any, **kwargs: Any) -> _Stub:
        return _Stub()


class _PickleScan(pickle.Unpickler):
    """Reads a ``torch.save`` pickle without importing or calling anything: every global is a :class:`_Stub`. It
    records the globals named (``globals``) and the bytes each tensor record should hold (``storages``)."""

    MAX_GLOBALS = 1000

    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file)
        self.globals: set[str] = set()
        self.storages: dict[str, int] = {}

    def find_class(self, module: str, name: str) -> Any:
        qualified = f"{module}.{name}"
        if len(self.globals) >= self.MAX_GLOBALS and qualified not in self.globals:
            raise ForeignFile(f"its pickle names more than {self.MAX_GLOBALS} globals")
        self.globals.add(qualified)
        itemsize = _storage_itemsizes().get(qualified)
        return _StorageType(qualified, itemsize) if itemsize is not None else _Stub

    def persistent_load(self, pid: Any) -> Any:
        # torch.save's persistent id of a storage: ("storage", storage class, key, location, number of elements).
        if not (
            isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)
            and isinstance(pid[2], str) and type(pid[4]) is int and pid[4] >= 0
        ):  # fmt: skip
            raise ForeignFile("its pickle refers to a tensor record in a way torch.save never writes")
        nbytes = pid[4] * pid[1].itemsize
        if self.storages.setdefault(pid[2], nbytes) != nbytes:
            raise ForeignFile(f"its tensor record '{pid[2]}' is declared with two sizes")
        return _Stub()


@functools.cache
def _storage_itemsizes() -> dict[str, int]:
    """``torch.FloatStorage`` and its kin (as ``module.name``) and their element sizes in bytes."""
    sizes = {"torch.UntypedStorage": 1}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TypedStorage is deprecated
        for name in dir(torch):
            kind = getattr(torch, name)
            if name.endswith("Storage") and isinstance(kind, type) and issubclass(kind, torch.storage.TypedStorage):
                try:
                    sizes[f"torch.{name}"] = kind.dtype.itemsize
                except (AttributeError, RuntimeError, NotImplementedError):
                    continue
    return sizes
