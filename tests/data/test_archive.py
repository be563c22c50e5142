"""Reading the official archive format: folder vs .tar.gz, download, checks and safe unpickling."""

from __future__ import annotations

import hashlib
import http.server
import io
import pickle
import resource
import shutil
import socket
import subprocess
import sys
import tarfile
import threading
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

from cifar_resnet.data import CIFAR100DataModule, archive
from cifar_resnet.data.archive import ARCHIVE_NAME, FOLDER_NAME, load_cifar100, safe_unpickle
from cifar_resnet.data.synthetic import py2_pickle, synthetic_split
from cifar_resnet.errors import UserError
from cli_process import CliProcess


def test_folder_and_targz_give_identical_tensors(cifar_dir: Path) -> None:
    from_folder = load_cifar100(cifar_dir / FOLDER_NAME)
    from_tar = load_cifar100(cifar_dir / ARCHIVE_NAME)
    for split in ("train", "test"):
        a, b = getattr(from_folder, split), getattr(from_tar, split)
        assert a.images.dtype == torch.uint8 and a.images.shape[1:] == (3, 32, 32)
        assert torch.equal(a.images, b.images)
        assert torch.equal(a.labels, b.labels)
        assert torch.equal(a.coarse_labels, b.coarse_labels)
    assert from_folder.class_names == from_tar.class_names
    assert len(from_folder.class_names) == 100 and from_folder.class_names[0] == "class_00"


def test_images_are_decoded_in_channel_major_order(cifar_dir: Path) -> None:
    raw = pickle.loads((cifar_dir / FOLDER_NAME / "test").read_bytes(), encoding="latin1")
    data = load_cifar100(cifar_dir / FOLDER_NAME).test
    # The official layout: 1024 red, then 1024 green, then 1024 blue values, each row-major.
    assert data.images[3, 1, 2, 5] == raw["data"][3, 1024 + 2 * 32 + 5]
    assert data.labels.tolist() == raw["fine_labels"]


def test_datamodule_reads_the_targz_alone_and_holds_out_validation(cifar_dir: Path, tmp_path: Path) -> None:
    shutil.copy(cifar_dir / ARCHIVE_NAME, tmp_path / ARCHIVE_NAME)
    dm = CIFAR100DataModule(data_dir=str(tmp_path), val_size=100, batch_size=32)
    dm.setup("fit")
    assert len(dm.splits["train"].labels) == 500 and len(dm.splits["val"].labels) == 100
    train_images = {tuple(x.flatten()[:64].tolist()) for x in dm.splits["train"].images}
    assert not any(tuple(x.flatten()[:64].tolist()) in train_images for x in dm.splits["val"].images)
    images, labels = next(iter(dm.train_dataloader()))
    assert images.shape == (32, 3, 32, 32) and images.dtype == torch.uint8 and labels.shape == (32,)
    again = CIFAR100DataModule(data_dir=str(tmp_path), val_size=100)
    again.setup("fit")
    assert torch.equal(again.splits["val"].labels, dm.splits["val"].labels), "the split seed must fix the split"


def test_val_size_zero_validates_on_the_test_split(cifar_dir: Path) -> None:
    dm = CIFAR100DataModule(data_dir=str(cifar_dir), val_size=0)
    dm.setup("fit")
    assert len(dm.splits["train"].labels) == 600
    assert dm.splits["val"] is dm.splits["test"]


def test_missing_data_offline_names_files_folder_and_url(tmp_path: Path) -> None:
    dm = CIFAR100DataModule(data_dir=str(tmp_path / "nowhere"), download=False)
    with pytest.raises(UserError) as err:
        dm.setup("fit")
    message = str(err.value)
    for expected in (str(tmp_path / "nowhere" / FOLDER_NAME), "train, test, meta", ARCHIVE_NAME, archive.URL):
        assert expected in message


@pytest.fixture
def http_server(cifar_dir: Path):
    """A local HTTP server serving the synthetic archive, standing in for the official host."""
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(cifar_dir))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_download_fetches_the_archive_and_checks_md5(cifar_dir: Path, tmp_path: Path, http_server: str, monkeypatch) -> None:
    source = cifar_dir / ARCHIVE_NAME
    monkeypatch.setattr(archive, "URL", f"{http_server}/{ARCHIVE_NAME}")
    monkeypatch.setattr(archive, "ARCHIVE_MD5", hashlib.md5(source.read_bytes()).hexdigest())
    dm = CIFAR100DataModule(data_dir=str(tmp_path / "downloaded"), download=True, val_size=0)
    dm.prepare_data()
    dm.setup("fit")
    assert (tmp_path / "downloaded" / ARCHIVE_NAME).read_bytes() == source.read_bytes()
    assert len(dm.splits["train"].labels) == 600

    monkeypatch.setattr(archive, "ARCHIVE_MD5", "0" * 32)
    with pytest.raises(UserError, match="md5"):
        CIFAR100DataModule(data_dir=str(tmp_path / "bad"), download=True).prepare_data()
    assert list((tmp_path / "bad").iterdir()) == [], "a corrupt download must not be left to look like the archive"


def test_download_offline_gives_clear_error(tmp_path: Path, monkeypatch) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    monkeypatch.setattr(archive, "URL", f"http://127.0.0.1:{closed_port}/{ARCHIVE_NAME}")
    with pytest.raises(UserError, match="Downloading .* failed.*CIFAR-100 not found"):
        CIFAR100DataModule(data_dir=str(tmp_path / "d"), download=True).prepare_data()


def test_crafted_pickle_is_refused_and_does_not_run(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    with pytest.raises(UserError, match="refusing to load global '(io|builtins).open'"):
        safe_unpickle(pickle.dumps({"data": Exploit()}, protocol=2), "crafted")
    assert not marker.exists()


def _write_split(data_dir: Path, cifar_dir: Path, split: dict) -> Path:
    shutil.copytree(cifar_dir / FOLDER_NAME, data_dir / FOLDER_NAME)
    (data_dir / FOLDER_NAME / "train").write_bytes(py2_pickle(split))
    return data_dir / FOLDER_NAME


def test_labels_out_of_range_are_refused(cifar_dir: Path, tmp_path: Path) -> None:
    split = synthetic_split(10, 0, b"bad")
    split[b"fine_labels"][3] = 100
    with pytest.raises(UserError, match=r"'fine_labels' must lie in \[0, 99\].*up to 100|to 100"):
        load_cifar100(_write_split(tmp_path, cifar_dir, split))


def test_wrong_image_shape_is_refused(cifar_dir: Path, tmp_path: Path) -> None:
    split = synthetic_split(10, 0, b"bad")
    split[b"data"] = np.zeros((10, 1024), dtype=np.uint8)
    with pytest.raises(UserError, match=r"shape \(N, 3072\).*\(10, 1024\)"):
        load_cifar100(_write_split(tmp_path, cifar_dir, split))


def test_truncated_archive_is_refused(cifar_dir: Path, tmp_path: Path) -> None:
    payload = (cifar_dir / ARCHIVE_NAME).read_bytes()
    (tmp_path / ARCHIVE_NAME).write_bytes(payload[: len(payload) // 2])
    with pytest.raises(UserError, match="truncated or corrupt"):
        load_cifar100(tmp_path / ARCHIVE_NAME)


# --- hostile files: refused in bounded time and memory, nothing run, nothing crashed ------------------

def load_capped(source: str) -> None:
    """``load_cifar100(source)`` with the memory capped at 512 MB above what the process holds and the CPU time
    at 60 s, so that a regression fails a test instead of taking the test run down; exit 2 with the message
    on a UserError."""
    used = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmSize"))
    resource.setrlimit(resource.RLIMIT_AS, (used + 2**29, used + 2**29))
    resource.setrlimit(resource.RLIMIT_CPU, (60, 60))
    try:
        load_cifar100(Path(source))
    except UserError as err:
        print(err)
        sys.exit(2)


def sandboxed_load(source: Path) -> subprocess.CompletedProcess:
    """:func:`load_capped` in a child process of its own (forked with the imports done: tests/cli_process.py)."""
    return CliProcess([str(source)], source.parent, target=load_capped).finish(timeout=120)


def crafted_folder(cifar_dir: Path, tmp_path: Path, member: str, payload: bytes) -> Path:
    """A copy of the synthetic archive folder with one member replaced by ``payload``."""
    folder = tmp_path / FOLDER_NAME
    shutil.copytree(cifar_dir / FOLDER_NAME, folder)
    (folder / member).write_bytes(payload)
    return folder


def test_object_dtype_labels_cannot_make_numpy_follow_pointers(cifar_dir: Path, tmp_path: Path) -> None:
    # uint64 labels re-typed as an object array: numpy would read the values as pointers (a segfault).
    split = synthetic_split(20, 0, b"crafted")
    split[b"fine_labels"] = np.full(20, 0x4141414141414141, dtype="<u8")
    payload = py2_pickle(split)
    assert payload.count(b"u8") == 1
    proc = sandboxed_load(crafted_folder(cifar_dir, tmp_path, "train", payload.replace(b"u8", b"O8")))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "(train): refusing dtype 'O8': CIFAR-100 files hold only uint8 arrays" in proc.stdout


def test_deeply_shared_label_lists_are_not_walked(cifar_dir: Path, tmp_path: Path) -> None:
    labels: list = [0]
    for _ in range(40):  # a few hundred bytes pickled, 2^40 entries if walked
        labels = [labels, labels]
    split = synthetic_split(20, 0, b"crafted")
    split[b"fine_labels"] = labels
    payload = py2_pickle(split)
    assert len(payload) < 70_000
    proc = sandboxed_load(crafted_folder(cifar_dir, tmp_path, "train", payload))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "(train): 'fine_labels' must be a list of 20 integers (one per image), found a list of 2 holding list" in proc.stdout


def test_an_oversized_tar_member_is_refused_before_it_is_read(cifar_dir: Path, tmp_path: Path) -> None:
    source = tmp_path / ARCHIVE_NAME
    huge = archive.MAX_MEMBER_BYTES["train"] + 2**20
    with tarfile.open(source, "w:gz", compresslevel=1) as tar:
        info = tarfile.TarInfo(f"{FOLDER_NAME}/train")
        info.size = huge
        tar.addfile(info, io.BytesIO(bytes(huge)))
        for member in ("test", "meta"):
            tar.add(cifar_dir / FOLDER_NAME / member, f"{FOLDER_NAME}/{member}")
    proc = sandboxed_load(source)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"(train) is {huge:,} bytes, more than the official file's" in proc.stdout


@pytest.mark.parametrize("bad", [1.0, True, "3", None])
def test_labels_that_are_not_plain_ints_are_refused(cifar_dir: Path, tmp_path: Path, bad) -> None:
    split = synthetic_split(10, 0, b"bad")
    split[b"coarse_labels"][4] = bad
    with pytest.raises(UserError, match=rf"'coarse_labels' must be a list of 10 integers .*holding .*{type(bad).__name__}"):
        load_cifar100(_write_split(tmp_path, cifar_dir, split))


@pytest.mark.parametrize("bad", [7, None, b"x" * 300])
def test_class_names_must_be_strings(cifar_dir: Path, tmp_path: Path, bad) -> None:
    folder = tmp_path / FOLDER_NAME
    shutil.copytree(cifar_dir / FOLDER_NAME, folder)
    meta = pickle.loads((folder / "meta").read_bytes(), encoding="bytes")
    meta[b"fine_label_names"][5] = bad
    (folder / "meta").write_bytes(py2_pickle(meta))
    with pytest.raises(UserError, match=r"'fine_label_names' must list 100 names \(strings\)"):
        load_cifar100(folder)


def test_float_images_are_refused(cifar_dir: Path, tmp_path: Path) -> None:
    split = synthetic_split(10, 0, b"bad")
    split[b"data"] = split[b"data"].astype(np.float32)
    with pytest.raises(UserError, match="refusing dtype 'f4'"):
        load_cifar100(_write_split(tmp_path, cifar_dir, split))
