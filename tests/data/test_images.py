"""Which files ``predict`` reads (src/cifar_resnet/data/images.py): a file, or a folder's files; anything else named.
How it reads them: within the memory limit, NaN pixels and special files named."""

from __future__ import annotations

import os
import re
import resource
import signal
import socket
import struct
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cifar_resnet.data import images
from cifar_resnet.data.images import NotAnImageFile, image_files, read_image, read_images
from cifar_resnet.errors import UserError


@contextmanager
def alarm(seconds: int) -> Iterator[None]:
    """The body, stopped with ``TimeoutError`` should it wait ``seconds`` (a hang fails, not blocks the suite)."""

    def stop(signum: int, frame: object) -> None:
        raise TimeoutError(f"still waiting after {seconds} s")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_a_file_or_the_visible_files_of_a_folder(tmp_path: Path) -> None:
    for name in ("b.png", "a.jpg", ".hidden.png"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "sub").mkdir()
    assert image_files(tmp_path) == [tmp_path / "a.jpg", tmp_path / "b.png"]
    assert image_files(tmp_path / "b.png") == [tmp_path / "b.png"]


def test_a_path_that_is_neither_says_what_it_is(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    (tmp_path / "empty").mkdir()
    cases = {tmp_path / "missing": "does not exist", Path("/dev/zero"): "is not a regular file", fifo: "is not a regular file",
             tmp_path / "empty": "holds no files"}  # fmt: skip
    for path, problem in cases.items():
        with pytest.raises(UserError, match=problem) as err:
            image_files(path)
        assert f"'{path}'" in str(err.value)


def test_special_files_in_a_folder_are_named_and_a_pipe_never_waits(tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "a.png")
    os.mkfifo(folder / "b_pipe")
    (folder / "c_gone").symlink_to(tmp_path / "missing.png")
    (folder / "d_device").symlink_to("/dev/null")
    server = socket.socket(socket.AF_UNIX)
    server.bind(str(folder / "e_socket"))
    with server, alarm(60):  # were the pipe opened blocking, this would wait for a writer forever
        assert image_files(folder) == [folder / name for name in ("a.png", "b_pipe", "c_gone", "d_device", "e_socket")]
        with pytest.raises(UserError) as err:
            read_images(folder)
        with pytest.raises(NotAnImageFile, match="named pipe"):
            read_image(folder / "b_pipe")  # put there after the folder was listed: refused, not waited on
    message = str(err.value)
    assert "4 of the 5 files" in message and "a.png" not in message
    for name, kind in (("b_pipe", "a named pipe"), ("c_gone", "a symbolic link to a file that does not exist"), ("d_device", "a device"),
                       ("e_socket", "a socket")):  # fmt: skip
        assert f"{name}' (not a regular file: {kind}" in message


def test_nan_or_infinite_pixels_are_named_not_read_as_black(tmp_path: Path) -> None:
    picture = np.random.default_rng(0).random((20, 30)).astype(np.float32)
    for name, value in (("nan.tiff", np.nan), ("inf.tiff", np.inf), ("minus_inf.tiff", -np.inf)):
        damaged = picture.copy()
        damaged[3, 4] = value
        Image.fromarray(damaged, "F").save(tmp_path / name)
    Image.fromarray(picture, "F").save(tmp_path / "fine.tiff")
    with pytest.raises(UserError) as err:
        read_images(tmp_path)
    for name in ("nan.tiff", "inf.tiff", "minus_inf.tiff"):
        assert f"{name}' (unreadable: 1 of its 600 pixels are NaN or infinite" in str(err.value)
    assert "fine.tiff" not in str(err.value) and read_image(tmp_path / "fine.tiff").float().std() > 10


def write_big_png(path: Path, side: int) -> None:
    """A ``side`` x ``side`` 16-bit greyscale PNG of one value (0x1234), written a row at a time: a few MB on disk."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row, packer = b"\0" + b"\x12\x34" * side, zlib.compressobj(1)
    pixels = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    header = struct.pack(">IIBBBBB", side, side, 16, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b""))


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the address space from /proc (Linux)")
def test_a_13000_pixel_16_bit_png_is_read_within_the_memory_limit(tmp_path: Path) -> None:
    # 169 megapixels take 338 MB decoded; float copies of the whole image would take gigabytes.
    write_big_png(tmp_path / "big.png", 13_000)
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its address space capped at what it holds now plus 1.5 GiB
        try:
            status = Path("/proc/self/status").read_text()
            now = int(re.search(r"^VmSize:\s+(\d+) kB", status, re.MULTILINE).group(1)) * 1024
            resource.setrlimit(resource.RLIMIT_AS, (now + (3 << 29), resource.RLIM_INFINITY))
            answer = repr(np.unique(read_image(tmp_path / "big.png").numpy()).tolist())  # no torch op after fork
        except BaseException as err:  # noqa: BLE001 (reported to the parent)
            answer = f"{type(err).__name__}: {err}"
        os.write(writer, answer.encode())
        os._exit(0)
    os.close(writer)
    try:
        with alarm(300), os.fdopen(reader) as pipe:
            answer = pipe.read()
    except TimeoutError:
        os.kill(pid, signal.SIGKILL)
        raise
    finally:
        os.waitpid(pid, 0)
    assert answer == "[18]", answer  # 0x1234 / 257, as every pixel


def test_a_large_image_is_shrunk_early_to_nearly_the_same_picture(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Over SHRINK_ABOVE_PIXELS, the centred square is box-averaged before the rest: nearly the same 32x32 (turned upright too)."""
    y, x = np.mgrid[0:600, 0:900]
    smooth = np.stack([x * 255 / 900, y * 255 / 600, (x + y) * 255 / 1500], axis=-1).round().astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # turned 90 degrees
    Image.fromarray(smooth).save(tmp_path / "turned.png", exif=exif)
    Image.fromarray((smooth[..., 0].astype(np.float32) * 4).astype(np.float32) - 100, "F").save(tmp_path / "float.tiff")
    plain = [read_image(tmp_path / name) for name in ("turned.png", "float.tiff")]
    monkeypatch.setattr(images, "SHRINK_ABOVE_PIXELS", 1000)
    for name, expected in zip(("turned.png", "float.tiff"), plain):
        shrunk = read_image(tmp_path / name)
        assert (shrunk.int() - expected.int()).abs().max() <= 3, name
