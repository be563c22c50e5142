"""Synthetic CIFAR-100 written byte-for-byte in the official archive's format (for tests and benchmarks).

The official files are Python-2 pickles: a dict with ``str`` (bytes) keys, ``data`` a uint8 numpy
array ``(N, 3072)`` pickled by numpy 1.x (``numpy.core.multiarray._reconstruct``), and label lists.
Python 3 would pickle bytes through ``_codecs.encode``; :class:`Py2Pickler` writes them as Python 2's
``BINSTRING`` instead, so readers see exactly what the real archive holds.
"""

from __future__ import annotations

import io
import pickle
import struct
import tarfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cifar_resnet.compat import PythonPickler
from cifar_resnet.data.archive import ARCHIVE_NAME, FOLDER_NAME, NUM_CLASSES, NUM_SUPERCLASSES


class Py2Pickler(PythonPickler):
    """Protocol-2 pickler that writes ``bytes`` as Python 2 ``str`` and numpy globals as numpy 1.x did."""

    dispatch = PythonPickler.dispatch.copy()

    def save_py2_str(self, obj: bytes) -> None:
        n = len(obj)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", n) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str

    def save_global(self, obj: object, name: str | None = None) -> None:
        module = obj.__module__.replace("numpy._core", "numpy.core")
        self.write(pickle.GLOBAL + f"{module}\n{name or obj.__qualname__}\n".encode())
        self.memoize(obj)


def py2_pickle(obj: object) -> bytes:
    """``obj`` pickled as Python 2's cPickle (protocol 2) would."""
    buffer = io.BytesIO()
    Py2Pickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue()


def fine_to_coarse() -> np.ndarray:
    """A fixed class -> superclass map with 5 classes per superclass, like CIFAR-100's."""
    return np.random.default_rng(100).permutation(np.repeat(np.arange(NUM_SUPERCLASSES), 5))


def synthetic_split(n: int, seed: int, name: bytes, classes: Sequence[int] | None = None) -> dict:
    """A split of ``n`` learnable images: each class has its own colour pattern, plus noise. The images
    are of ``classes`` only (all 100 by default), in turn."""
    rng = np.random.default_rng(seed)
    patterns = np.random.default_rng(0).integers(0, 256, size=(NUM_CLASSES, 3, 8, 8))
    occurring = np.arange(NUM_CLASSES) if classes is None else np.asarray(classes, dtype=np.int64)
    labels = occurring[np.arange(n) % len(occurring)]
    rng.shuffle(labels)
    images = patterns[labels].repeat(4, axis=2).repeat(4, axis=3) + rng.normal(0, 40, size=(n, 3, 32, 32))
    data = np.clip(images, 0, 255).astype(np.uint8).reshape(n, 3072)
    return {
        b"filenames": [f"synthetic_{i:05d}.png".encode() for i in range(n)],
        b"batch_label": name,
        b"fine_labels": [int(x) for x in labels],
        b"coarse_labels": [int(x) for x in fine_to_coarse()[labels]],
        b"data": data,
    }


def synthetic_members(
    n_train: int = 500, n_test: int = 200, seed: int = 0, classes: Sequence[int] | None = None
) -> dict[str, bytes]:
    """The bytes of ``train``, ``test`` and ``meta`` for a synthetic archive (images of ``classes`` only, if given)."""
    meta = {
        b"fine_label_names": [f"class_{i:02d}".encode() for i in range(NUM_CLASSES)],
        b"coarse_label_names": [f"superclass_{i:02d}".encode() for i in range(NUM_SUPERCLASSES)],
    }
    return {
        "train": py2_pickle(synthetic_split(n_train, seed, b"training batch 1 of 1", classes)),
        "test": py2_pickle(synthetic_split(n_test, seed + 1, b"testing batch 1 of 1", classes)),
        "meta": py2_pickle(meta),
    }


def write_synthetic_archive(
    data_dir: Path,
    n_train: int = 500,
    n_test: int = 200,
    seed: int = 0,
    folder: bool = True,
    tar: bool = False,
    classes: Sequence[int] | None = None,
) -> Path:
    """Write ``cifar-100-python/`` and/or ``cifar-100-python.tar.gz`` into ``data_dir``; returns ``data_dir``.
    With ``classes``, only those classes have images (as in a user's subset of CIFAR-100)."""
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    members = synthetic_members(n_train, n_test, seed, classes)
    if folder:
        (data_dir / FOLDER_NAME).mkdir(exist_ok=True)
        for name, payload in members.items():
            (data_dir / FOLDER_NAME / name).write_bytes(payload)
    if tar:
        with tarfile.open(data_dir / ARCHIVE_NAME, "w:gz") as archive:
            for name, payload in members.items():
                info = tarfile.TarInfo(f"{FOLDER_NAME}/{name}")
                info.size = len(payload)
                archive.addfile(info, io.BytesIO(payload))
    return data_dir
