"""Files a kill never tears (src/cifar_resnet/atomic.py): the write is whole or absent, and a write that cannot
happen names the file and why. A kill mid-write and a full disk are tested end to end in test_errors.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from cifar_resnet.atomic import atomic_write_text, file_in_the_way
from cifar_resnet.errors import UserError


def test_a_write_replaces_the_file_whole_and_leaves_nothing_beside_it(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "report.json"
    atomic_write_text(target, "first")
    atomic_write_text(target, "second")
    assert target.read_text() == "second" and [p.name for p in target.parent.iterdir()] == ["report.json"]


def test_a_file_where_a_folder_should_be_is_named(tmp_path: Path) -> None:
    blocker = tmp_path / "runs"
    blocker.write_text("not a folder")
    target = blocker / "scratch" / "report.json"
    assert file_in_the_way(target) == blocker and file_in_the_way(tmp_path / "x" / "y") is None
    with pytest.raises(UserError, match=rf"^Cannot write '{target}': '{blocker}' is a file, not a folder"):
        atomic_write_text(target, "x")
    with pytest.raises(UserError, match=r"^Cannot write '/dev/null/x.csv': '/dev/null' is a file, not a folder"):
        atomic_write_text(Path("/dev/null/x.csv"), "x")
    assert blocker.read_text() == "not a folder"
