"""Files a kill never tears (src/cifar_resnet/atomic.py): the write is whole or absent, and a write that cannot
happen names the file and why. A kill mid-write and a full disk are tested end to end in test_errors.py."""

from __future__ import annotations

import ast
import os
import re
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

import cifar_resnet
from cifar_resnet.atomic import atomic_save, atomic_write, atomic_write_text, file_in_the_way
from cifar_resnet.errors import UserError
from faults import FailingFile, ctrl_c, disk_full


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


def torch_save_failing_with(fail: Callable[[], None]) -> Callable[[Any], None]:
    """A write that runs torch.save into a file that fails (``fail()``) part of the way through."""
    return lambda f: torch.save({"w": torch.zeros(10_000)}, FailingFile(f, fail))


@pytest.mark.parametrize("fail", [disk_full, ctrl_c], ids=["full disk", "ctrl-c"])
def test_a_write_that_fails_inside_torch_save_is_reported_as_what_stopped_it(tmp_path: Path, fail: Callable[[], None]) -> None:
    """torch.save's zip writer answers a failed write with its own RuntimeError ("unexpected pos"): the error
    the user gets is the full disk or the Ctrl-C that caused it, and the previous file is intact."""
    target = tmp_path / "last.ckpt"
    atomic_save({"w": torch.ones(3)}, target)
    before = target.read_bytes()
    with pytest.raises(UserError if fail is disk_full else KeyboardInterrupt) as raised:
        atomic_write(target, torch_save_failing_with(fail))
    if fail is disk_full:
        assert str(raised.value).startswith(f"Cannot write '{target}': the disk is full")
    assert target.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]
    atomic_write(target, torch_save_failing_with(lambda: None))  # the control: the same write, not failing
    assert target.read_bytes() != before


def test_a_link_to_a_file_is_written_through_and_anything_else_is_never_replaced(tmp_path: Path) -> None:
    real = tmp_path / "real.csv"
    real.write_text("old")
    (tmp_path / "link.csv").symlink_to(real)
    atomic_write_text(tmp_path / "link.csv", "new")
    assert (tmp_path / "link.csv").is_symlink() and real.read_text() == "new"

    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "to-fifo").symlink_to(tmp_path / "fifo")  # as /dev/stdout is, when the output goes to a pipe
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    (tmp_path / "loop-a").symlink_to(tmp_path / "loop-b")
    (tmp_path / "loop-b").symlink_to(tmp_path / "loop-a")
    refused = {
        "fifo": "it is a pipe (FIFO), not a file",
        "to-fifo": "it is a link to a pipe (FIFO), not a file",
        "dangling": "it is a link to nothing",
        "loop-a": "it is a link in a loop",
    }
    for name, why in refused.items():
        with pytest.raises(UserError, match=rf"^Cannot write '{tmp_path / name}': {re.escape(why)}"):
            atomic_write_text(tmp_path / name, "x")
    with pytest.raises(UserError, match=r"^Cannot write '/dev/null': it is a device, not a file"):
        atomic_write_text("/dev/null", "x")
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode) and stat.S_ISFIFO(os.stat(tmp_path / "fifo").st_mode)
    assert (tmp_path / "dangling").is_symlink() and not (tmp_path / "nowhere").exists()
    assert not list(tmp_path.glob(".*.tmp"))


# Where the program may write a file other than through atomic.py: (module, call), and why.
NOT_A_WRITE = {
    ("cli.py", "os.replace"): "moves metrics.csv aside and back while Lightning's CSV writer starts; writes nothing",
    ("callbacks/safety.py", "os.open"): "the run folder's lock file, which stays empty",
}
WRITING_FUNCTIONS = ("os.replace", "os.rename", "shutil.move", "shutil.copy", "shutil.copyfile", "torch.save", "os.open")
WRITING_METHODS = ("write_text", "write_bytes", "savefig")


def test_every_file_the_program_writes_goes_through_the_atomic_writer() -> None:
    """No module writes a file on its own (a checkpoint, config.yaml, a CSV, a report, a model, a figure): one
    writer means one behaviour on a full disk, a Ctrl-C, a link or a device in the way."""
    source = Path(cifar_resnet.__file__).parent
    found = set()
    for path in source.rglob("*.py"):
        module = str(path.relative_to(source))
        if module in ("atomic.py", "data/synthetic.py"):  # the writer itself; test data the tests write
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Call):
                continue
            name = ast.unparse(node.func)
            method = name.rsplit(".", 1)[-1]
            modes = [arg.value for arg in [*node.args[1:2], *(k.value for k in node.keywords if k.arg == "mode")] if isinstance(arg, ast.Constant)]
            opens_to_write = method == "open" and name != "os.open" and any(letter in str(mode) for mode in modes for letter in "wax")
            read_only = name == "os.open" and "O_RDONLY" in "".join(ast.unparse(arg) for arg in node.args[1:2])
            if (name in WRITING_FUNCTIONS and not read_only) or method in WRITING_METHODS or opens_to_write:
                found.add((module, name if name in WRITING_FUNCTIONS else method))
    assert found == set(NOT_A_WRITE), "write through cifar_resnet.atomic.atomic_write"
