"""Reading the official CIFAR-100 archive (folder or ``.tar.gz``) into uint8 tensors, safely."""

from __future__ import annotations

import io
import math
import pickle
import tarfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cifar_resnet.errors import UserError

URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
ARCHIVE_NAME = "cifar-100-python.tar.gz"
ARCHIVE_MD5 = "eb9058c3a382ffc7106e4002c42a8d85"
FOLDER_NAME = "cifar-100-python"
MEMBERS = ("train", "test", "meta")
NUM_CLASSES = 100
NUM_SUPERCLASSES = 20

# The most each member of the official archive can hold (they hold 157 MB, 31 MB and 1.5 kB): a larger
# file is not the official one, and is refused before it is read into memory.
MAX_MEMBER_BYTES = {"train": 200 * 2**20, "test": 50 * 2**20, "meta": 2**20}
MAX_NAME_LENGTH = 200


class _DType:
    """Stands in for ``numpy.dtype``: only ``uint8`` (``'u1'``), the official files' one dtype, is accepted."""

    def __init__(self, name: Any, align: Any = False, copy: Any = True) -> None:
        if name != "u1":
            raise pickle.UnpicklingError(f"refusing dtype {name!r}: CIFAR-100 files hold only uint8 arrays")

    def __setstate__(self, state: Any) -> None:
        """Byte order and flags: uint8 has none that matter, so they are not used."""


class _Array:
    """Stands in for a numpy array while unpickling; holds the uint8 array once its bytes are checked.

    numpy itself never sees the file's values: an array is built here, with ``np.frombuffer``, only from
    a shape of plain ints and a byte string of exactly that many bytes.
    """

    def __init__(self) -> None:
        self.array: np.ndarray | None = None

    def __setstate__(self, state: Any) -> None:
        """Check ``(version, shape, dtype, fortran_order, raw bytes)`` and build the array."""
        if type(state) is not tuple or len(state) != 5:
            raise pickle.UnpicklingError("malformed array")
        _, shape, dtype, fortran, raw = state
        if type(shape) is not tuple or len(shape) > 4 or not all(type(n) is int and 0 <= n <= 2**31 for n in shape):
            raise pickle.UnpicklingError("malformed array shape")
        if not isinstance(dtype, _DType) or fortran is not False or type(raw) not in (str, bytes):
            raise pickle.UnpicklingError("malformed array: only plain uint8 arrays are accepted")
        if isinstance(raw, str):  # Python 2 byte strings arrive decoded as latin-1
            raw = raw.encode("latin1")
        if len(raw) != math.prod(shape):
            raise pickle.UnpicklingError(f"array of shape {shape} with {len(raw)} bytes")
        self.array = np.frombuffer(bytearray(raw), dtype=np.uint8).reshape(shape)


def _reconstruct(cls: Any, shape: Any, typecode: Any) -> _Array:
    """Stands in for ``numpy.core.multiarray._reconstruct(ndarray, (0,), b'b')``."""
    if cls is not _NDARRAY:
        raise pickle.UnpicklingError("malformed array")
    return _Array()


_NDARRAY = object()  # what ``numpy.ndarray`` unpickles to: only a marker for _reconstruct
# The only globals the official pickles name, each mapped to a stand-in. The files were written by
# numpy 1.x ("numpy.core"); numpy 2 writes "numpy._core".
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): _DType,
}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that builds only plain values and checked uint8 arrays, so a file cannot run code
    nor hand numpy anything but bytes."""

    def find_class(self, module: str, name: str) -> Any:
        """Return the stand-in of an allowed numpy global, refuse everything else."""
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing to load global '{module}.{name}': CIFAR-100 files hold only numpy arrays, "
                "so this file is not an official CIFAR-100 pickle (it may try to run code)"
            ) from None


def safe_unpickle(data: bytes, source: str) -> dict:
    """Unpickle one Python-2 CIFAR pickle with :class:`RestrictedUnpickler`, with clear errors."""
    try:
        obj = RestrictedUnpickler(io.BytesIO(data), encoding="latin1").load()
    except pickle.UnpicklingError as err:
        raise UserError(f"Cannot read {source}: {err}. Delete it and download the official archive again.") from err
    except Exception as err:  # damaged bytes surface as almost any exception (EOFError, IndexError, ...)
        raise UserError(
            f"Cannot read {source}: the file is truncated or corrupt ({type(err).__name__}: {err}). "
            "Delete it and download the official archive again."
        ) from err
    if type(obj) is not dict:
        raise UserError(f"Cannot read {source}: expected a dict, found {type(obj).__name__}; this is not a CIFAR-100 file.")
    return obj


def int_list(value: Any, source: str, name: str, count: int) -> torch.Tensor:
    """``value`` as an int64 tensor, if it is a plain list of ``count`` ints (checked before numpy sees it)."""
    if type(value) is not list or len(value) != count or not all(type(v) is int for v in value):
        found = f"a list of {len(value)}" if type(value) is list else f"a {type(value).__name__}"
        kinds = sorted({type(v).__name__ for v in value[:count + 1]}) if type(value) is list else []
        raise UserError(
            f"{source}: '{name}' must be a list of {count} integers (one per image), found {found}"
            f"{' holding ' + ', '.join(kinds) if kinds else ''}. The file is not an official CIFAR-100 split."
        )
    return torch.tensor(value, dtype=torch.int64)


def name_list(value: Any, source: str, name: str, count: int) -> list[str]:
    """``value`` if it is a plain list of ``count`` short strings."""
    if name_list_problem(value, count):
        raise UserError(f"'{source}' (meta): '{name}' must list {count} names (strings); this is not the CIFAR-100 meta file.")
    return list(value)


def name_list_problem(value: Any, count: int) -> str | None:
    """Why ``value`` is not a plain list of ``count`` names (strings of at most ``MAX_NAME_LENGTH`` characters), or ``None``."""
    if type(value) is not list or len(value) != count:
        return f"must be a list of {count} names, found {f'{len(value)} items' if type(value) is list else f'a {type(value).__name__}'}"
    if not all(type(v) is str and len(v) <= MAX_NAME_LENGTH for v in value):
        return f"must be names of at most {MAX_NAME_LENGTH} characters (strings)"
    return None


@dataclass
class Split:
    """One split in memory: images ``(N, 3, 32, 32)`` uint8, fine and coarse labels ``(N,)`` int64."""

    images: torch.Tensor
    labels: torch.Tensor
    coarse_labels: torch.Tensor


@dataclass
class Cifar100:
    """The whole data set: both splits and the class names from ``meta``."""

    train: Split
    test: Split
    class_names: list[str]
    superclass_names: list[str]

    def fine_to_coarse(self) -> torch.Tensor:
        """Superclass index of each of the 100 classes, read off the training labels (then the test labels,
        for a class with no training images); -1 for a class with no images at all (a subset of CIFAR-100)."""
        mapping = torch.full((NUM_CLASSES,), -1, dtype=torch.long)
        mapping[self.test.labels] = self.test.coarse_labels
        mapping[self.train.labels] = self.train.coarse_labels
        return mapping


def find_archive(data_dir: Path) -> Path | None:
    """The extracted folder if it is complete, else the ``.tar.gz``, else ``None``."""
    folder = data_dir / FOLDER_NAME
    if all((folder / m).is_file() for m in MEMBERS):
        return folder
    tar = data_dir / ARCHIVE_NAME
    return tar if tar.is_file() else None


def missing_data_message(data_dir: Path) -> str:
    """The error text for a data folder without the archive."""
    return (
        f"CIFAR-100 not found in '{data_dir}': expected the folder '{data_dir / FOLDER_NAME}' with the files "
        f"{', '.join(MEMBERS)}, or the archive '{data_dir / ARCHIVE_NAME}'. Set `data.download: true` on a machine "
        f"with internet, or download {URL} (md5 {ARCHIVE_MD5}) elsewhere and copy it into '{data_dir}'."
    )


def read_members(source: Path) -> dict[str, bytes]:
    """The raw bytes of ``train``, ``test`` and ``meta`` from the folder or the ``.tar.gz``."""
    if source.is_dir():
        for m in MEMBERS:
            _check_size(source / m, (source / m).stat().st_size, m)
        return {m: (source / m).read_bytes() for m in MEMBERS}
    try:
        with tarfile.open(source, "r:gz") as tar:
            names = {Path(info.name).name: info for info in tar.getmembers() if info.isfile()}
            missing = [m for m in MEMBERS if m not in names]
            if missing:
                raise UserError(
                    f"The archive '{source}' lacks {', '.join(missing)}: it is not the official CIFAR-100 archive. "
                    f"Delete it and download {URL} again."
                )
            for m in MEMBERS:
                _check_size(source, names[m].size, m)
            return {m: tar.extractfile(names[m]).read() for m in MEMBERS}
    except PermissionError:
        raise  # not damage: main() says "permission denied"
    except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
        raise UserError(
            f"The archive '{source}' is truncated or corrupt ({err}). Delete it and download {URL} again "
            f"(md5 {ARCHIVE_MD5})."
        ) from err


def _check_size(source: Path, size: int, member: str) -> None:
    """Refuse a member larger than the official one could be, before reading it."""
    if size > MAX_MEMBER_BYTES[member]:
        raise UserError(
            f"'{source}' ({member}) is {size:,} bytes, more than the official file's {MAX_MEMBER_BYTES[member]:,} at "
            f"most: it is not the official CIFAR-100 archive. Delete it and download {URL} again."
        )


def _split(raw: dict, source: str) -> Split:
    """Check one unpickled split and turn it into tensors."""
    for key in ("data", "fine_labels", "coarse_labels"):
        if key not in raw:
            raise UserError(f"{source} has no '{key}' entry: it is not a CIFAR-100 split file.")
    data = raw["data"].array if isinstance(raw["data"], _Array) else None
    if data is None or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        shape = getattr(data, "shape", None)
        raise UserError(
            f"{source}: 'data' must be a uint8 array of shape (N, 3072), found shape {shape} "
            f"({type(raw['data']).__name__.strip('_')}). The file is not an official CIFAR-100 split; download the archive again."
        )
    labels = int_list(raw["fine_labels"], source, "fine_labels", len(data))
    coarse = int_list(raw["coarse_labels"], source, "coarse_labels", len(data))
    for name, values, limit in (("fine_labels", labels, NUM_CLASSES), ("coarse_labels", coarse, NUM_SUPERCLASSES)):
        if len(values) and (values.min() < 0 or values.max() >= limit):
            raise UserError(
                f"{source}: '{name}' must lie in [0, {limit - 1}], found values from {int(values.min())} to "
                f"{int(values.max())}. The file is not an official CIFAR-100 split."
            )
    images = torch.from_numpy(data).view(-1, 3, 32, 32)
    return Split(images=images, labels=labels, coarse_labels=coarse)


def load_cifar100(source: Path) -> Cifar100:
    """Read and check the archive at ``source`` (the extracted folder or the ``.tar.gz``)."""
    raw = {m: safe_unpickle(data, f"'{source}' ({m})") for m, data in read_members(source).items()}
    meta = raw["meta"]
    return Cifar100(
        train=_split(raw["train"], f"'{source}' (train)"),
        test=_split(raw["test"], f"'{source}' (test)"),
        class_names=name_list(meta.get("fine_label_names"), str(source), "fine_label_names", NUM_CLASSES),
        superclass_names=name_list(meta.get("coarse_label_names"), str(source), "coarse_label_names", NUM_SUPERCLASSES),
    )


def download_archive(data_dir: Path) -> None:
    """Fetch the official archive into ``data_dir`` and check its md5, with a clear error offline.

    The download goes to a ``.part`` file that is renamed only once its md5 matches, so an
    interrupted or corrupt download never looks like an archive.
    """
    from torchvision.datasets.utils import download_url

    data_dir.mkdir(parents=True, exist_ok=True)
    part = data_dir / (ARCHIVE_NAME + ".part")
    try:
        download_url(URL, str(data_dir), part.name, ARCHIVE_MD5)
    except OSError as err:
        part.unlink(missing_ok=True)
        raise UserError(f"Downloading {URL} failed ({err}). {missing_data_message(data_dir)}") from err
    except RuntimeError as err:  # torchvision's md5 check failed
        part.unlink(missing_ok=True)
        raise UserError(
            f"The download of {URL} does not match the official md5 {ARCHIVE_MD5}: it is partial or corrupt. "
            "Try again; if it keeps failing, download the archive by hand (see the README)."
        ) from err
    part.replace(data_dir / ARCHIVE_NAME)
