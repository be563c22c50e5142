"""What an output may replace (src/cifar_resnet/outputs.py): an earlier output of its kind or an empty file, never
the command's input, a checkpoint, a file of another kind, or a link to what is no file."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import pytest
import torch

from cifar_resnet.errors import UserError
from cifar_resnet.outputs import KINDS, check_output

# An earlier output of each kind, as the program writes it.
EARLIER = {
    "predictions": b"file,class_1,prob_1,class_2,prob_2\na.png,apple,0.9000,pear,0.1000\n",
    "report": b'{\n  "stage": "test"\n}\n',
    "onnx": b"\x08\x0a\x12\x07pytorch",  # ModelProto: ir_version first
}


def earlier_output(folder: Path, kind: str) -> Path:
    path = folder / f"earlier-{kind}"
    if kind == "torch.export":
        with zipfile.ZipFile(path, "w") as archive:
            archive.writestr("model/archive_format", "pt2")
    else:
        path.write_bytes(EARLIER[kind])
    return path


def foreign_files(folder: Path) -> dict[str, Path]:
    """Files no output may replace: a checkpoint, a config, an image, a CSV of another program."""
    torch.save({"state_dict": {"w": torch.ones(2)}, "epoch": 3}, folder / "last.ckpt")
    (folder / "config.yaml").write_text("trainer:\n  max_epochs: 5\n")
    (folder / "cat.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(32))
    (folder / "mine.csv").write_text("id,label\n1,cat\n")
    return {path.name: path for path in folder.iterdir()}


@pytest.mark.parametrize("kind", list(KINDS))
def test_an_output_never_replaces_a_file_of_another_kind(tmp_path: Path, kind: str) -> None:
    foreign = foreign_files(tmp_path)
    before = {name: path.read_bytes() for name, path in foreign.items()}
    for name, path in foreign.items():
        with pytest.raises(UserError, match=rf"^--out '{path}' already exists and is not {KINDS[kind][0]}.*Choose another file name"):
            check_output(path, kind, "--out")
    assert {name: path.read_bytes() for name, path in foreign.items()} == before
    with pytest.raises(UserError, match="it is a zip file, as checkpoints and weights are"):
        check_output(foreign["last.ckpt"], kind, "--out")


@pytest.mark.parametrize("kind", list(KINDS))
def test_an_earlier_output_of_the_same_kind_an_empty_file_or_a_new_file_may_be_written(tmp_path: Path, kind: str) -> None:
    earlier = earlier_output(tmp_path, kind)
    assert check_output(earlier, kind, "--out") == earlier
    (tmp_path / "empty").touch()
    assert check_output(tmp_path / "empty", kind, "--out") == tmp_path / "empty"
    assert check_output(tmp_path / "new" / "file", kind, "--out") == tmp_path / "new" / "file"
    for other in set(KINDS) - {kind}:  # but no output of another kind
        with pytest.raises(UserError, match="already exists and is not"):
            check_output(earlier_output(tmp_path, other), kind, "--out")


def test_the_commands_own_input_is_never_its_output(tmp_path: Path) -> None:
    earlier = earlier_output(tmp_path, "onnx")  # an input that looks like an output of the kind: samefile decides
    (tmp_path / "link.onnx").symlink_to(earlier)
    for path in (earlier, tmp_path / "link.onnx"):
        with pytest.raises(UserError, match=rf"^--out '{path}' is the file this command reads \('{earlier}'\)"):
            check_output(path, "onnx", "--out", inputs=[None, earlier])
    assert check_output(earlier, "onnx", "--out", inputs=[None, tmp_path / "missing.ckpt"]) == earlier  # the control


def test_a_link_is_followed_to_its_file_and_a_folder_fifo_or_device_is_refused(tmp_path: Path) -> None:
    earlier = earlier_output(tmp_path, "predictions")
    (tmp_path / "link.csv").symlink_to(earlier)
    assert check_output(tmp_path / "link.csv", "predictions", "--out") == earlier
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "stdout").symlink_to(tmp_path / "fifo")
    with pytest.raises(UserError, match=r"it is a link to a pipe \(FIFO\), not a file.*, or use -\.$"):
        check_output(tmp_path / "stdout", "predictions", "--out", hint=", or use -")
    with pytest.raises(UserError, match=r"^Cannot write '/dev/null': it is a device"):
        check_output(Path("/dev/null"), "predictions", "--out")
    with pytest.raises(UserError, match=rf"^--out '{tmp_path}' is a folder: give the path of a CSV file to write"):
        check_output(tmp_path, "predictions", "--out")
