"""Reading the official CIFAR-100 archive (folder or ``.tar.gz``) into uint8 tensors, safely."""

from __future__ import annotations

import io
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

# The only globals the official pickles need: numpy arrays and their dtypes. The files were
# written by numpy 1.x ("numpy.core"); numpy 2 renamed the package to "numpy._core".
_reconstruct = np.array(0).__reduce__()[0]
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that builds only plain containers and numpy arrays, so a file cannot run code."""

    def find_class(self, module: str, name: str) -> Any:
        """Return an allowed numpy global, refuse everything else."""
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
    except (EOFError, ValueError, TypeError, IndexError, KeyError, AttributeError) as err:
        raise UserError(
            f"Cannot read {source}: the file is truncated or corrupt ({type(err).__name__}: {err}). "
            "Delete it and download the official archive again."
        ) from err
    if not isinstance(obj, dict):
        raise UserError(f"Cannot read {source}: expected a dict, found {type(obj).__name__}; this is not a CIFAR-100 file.")
    return obj


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
        """Superclass index of each of the 100 classes, read off the training labels."""
        mapping = torch.full((NUM_CLASSES,), -1, dtype=torch.long)
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
            return {m: tar.extractfile(names[m]).read() for m in MEMBERS}
    except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
        raise UserError(
            f"The archive '{source}' is truncated or corrupt ({err}). Delete it and download {URL} again "
            f"(md5 {ARCHIVE_MD5})."
        ) from err


def _split(raw: dict, source: str) -> Split:
    """Check one unpickled split and turn it into tensors."""
    for key in ("data", "fine_labels", "coarse_labels"):
        if key not in raw:
            raise UserError(f"{source} has no '{key}' entry: it is not a CIFAR-100 split file.")
    data = raw["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        shape = getattr(data, "shape", None)
        dtype = getattr(data, "dtype", type(data).__name__)
        raise UserError(
            f"{source}: 'data' must be a uint8 array of shape (N, 3072), found shape {shape} and dtype {dtype}. "
            "The file is not an official CIFAR-100 split; download the archive again."
        )
    labels = torch.as_tensor(np.asarray(raw["fine_labels"], dtype=np.int64))
    coarse = torch.as_tensor(np.asarray(raw["coarse_labels"], dtype=np.int64))
    for name, values, limit in (("fine_labels", labels, NUM_CLASSES), ("coarse_labels", coarse, NUM_SUPERCLASSES)):
        if values.shape != (len(data),):
            raise UserError(f"{source}: '{name}' has {values.numel()} entries for {len(data)} images.")
        if len(values) and (values.min() < 0 or values.max() >= limit):
            raise UserError(
                f"{source}: '{name}' must lie in [0, {limit - 1}], found values from {int(values.min())} to "
                f"{int(values.max())}. The file is not an official CIFAR-100 split."
            )
    images = torch.from_numpy(np.ascontiguousarray(data)).view(-1, 3, 32, 32)
    return Split(images=images, labels=labels, coarse_labels=coarse)


def load_cifar100(source: Path) -> Cifar100:
    """Read and check the archive at ``source`` (the extracted folder or the ``.tar.gz``)."""
    raw = {m: safe_unpickle(data, f"'{source}' ({m})") for m, data in read_members(source).items()}
    meta = raw["meta"]
    for key, count in (("fine_label_names", NUM_CLASSES), ("coarse_label_names", NUM_SUPERCLASSES)):
        if len(meta.get(key, ())) != count:
            raise UserError(f"'{source}' (meta): '{key}' must list {count} names; this is not the CIFAR-100 meta file.")
    return Cifar100(
        train=_split(raw["train"], f"'{source}' (train)"),
        test=_split(raw["test"], f"'{source}' (test)"),
        class_names=list(meta["fine_label_names"]),
        superclass_names=list(meta["coarse_label_names"]),
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
