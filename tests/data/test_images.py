"""Which files ``predict`` reads (src/cifar_resnet/data/images.py): a file, or a folder's files; anything else named."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cifar_resnet.data.images import image_files
from cifar_resnet.errors import UserError


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
