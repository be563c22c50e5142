"""``cifar-resnet-export`` (src/cifar_resnet/export.py) refuses an output it cannot write before it loads
anything, and never leaves a torn model file. Exporting for real (ONNX against PyTorch, the preprocessing in the JSON) is tested in test_review.py
and, for an old checkpoint, in checkpointing/test_old_checkpoint.py."""

from __future__ import annotations

import errno
import zipfile
from pathlib import Path
from typing import BinaryIO, Callable

import pytest
import torch

from cifar_resnet.export import main
from conftest import unpack_old_run


def export_error(capsys: pytest.CaptureFixture, *args: str) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("cifar-resnet-export: error: ") and "Traceback" not in err
    return err


def test_an_output_that_is_a_folder_or_under_a_file_is_refused(tmp_path: Path, capsys) -> None:
    missing = str(tmp_path / "missing.ckpt")
    (tmp_path / "a-file").write_text("x")
    assert f"The output '{tmp_path}' is a folder" in export_error(capsys, missing, str(tmp_path))
    under = tmp_path / "a-file" / "model.onnx"
    assert f"The output '{under}' lies under '{tmp_path / 'a-file'}', which is a file" in export_error(capsys, missing, str(under))
    # The control: a writable output gets past the check, to the checkpoint that is not there.
    assert f"Checkpoint '{missing}' not found" in export_error(capsys, missing, str(tmp_path / "new" / "model.onnx"))
    assert (tmp_path / "a-file").read_text() == "x" and not (tmp_path / "new").exists()


def test_a_failed_write_keeps_the_previous_model_file(tmp_path: Path, monkeypatch, capsys) -> None:
    last = unpack_old_run(tmp_path)
    model = tmp_path / "model.pt2"
    with zipfile.ZipFile(model, "w") as previous:  # what torch.export.save writes holds an archive_format record
        previous.writestr("model/archive_format", "pt2")
    before = model.read_bytes()

    def disk_full_half_way(program: object, f: BinaryIO) -> None:
        f.write(b"half a model")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch.export, "save", disk_full_half_way)
    err = export_error(capsys, str(last), str(model), "--format", "torch.export")
    assert f"Cannot write '{model}': the disk is full" in err
    assert model.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["model.pt2", "runs"]


def test_the_checkpoint_or_a_file_of_another_kind_is_never_the_output(tmp_path: Path, capsys) -> None:
    last = unpack_old_run(tmp_path)
    before = last.read_bytes()
    assert f"The output '{last}' is the file this command reads" in export_error(capsys, str(last), str(last))
    config = last.parent.parent / "config.yaml"
    text = config.read_text()
    assert f"The output '{config}' already exists and is not an ONNX model" in export_error(capsys, str(last), str(config))
    (tmp_path / "model.onnx.json").write_bytes(before[:64])  # the JSON file beside the output is checked too
    assert f"The output's JSON file '{tmp_path / 'model.onnx.json'}' already exists" in export_error(capsys, str(last), str(tmp_path / "model.onnx"))
    assert last.read_bytes() == before and config.read_text() == text and not (tmp_path / "model.onnx").exists()


def damaged_copy(tmp_path: Path, change: Callable[[dict], None]) -> Path:
    """The old run's checkpoint, changed by ``change``."""
    last = unpack_old_run(tmp_path)
    checkpoint = torch.load(last, weights_only=True)
    change(checkpoint)
    torch.save(checkpoint, last)
    return last


@pytest.mark.parametrize(
    "change, expected",
    [(lambda c: c["state_dict"].__setitem__("net.fc.weight", torch.zeros(10, 3)),
      "holds the weights of ScratchResNet, which do not fit ScratchResNet (wrong shape: net.fc.weight). It is damaged"),
     (lambda c: c["state_dict"].pop("net.fc.bias"), "which do not fit ScratchResNet (missing: net.fc.bias)"),
     (lambda c: c["hyper_parameters"].__setitem__("num_classes", 10**9), "it holds a model of num_classes=1000000000, but CIFAR-100, whose class names it holds, has 100 classes"),
     (lambda c: c["hyper_parameters"].__setitem__("dropout", "half"), "its settings do not build a ScratchResNet ("),
     (lambda c: c["CIFAR100DataModule"]["transform"].__setitem__("output_size", 100000), "its input settings are out of range (output_size"),
     (lambda c: c["CIFAR100DataModule"]["transform"].__setitem__("std", [0, 1, 1]), "its input settings are out of range (std must be"),
     (lambda c: c["CIFAR100DataModule"]["class_names"].__setitem__(1, "y" * 10**7), "its class_names must be names of at most 200 characters")],
    ids=["weights-of-another-shape", "a-missing-weight", "a-billion-classes", "dropout-text", "output-size", "std-0", "10-MB-class-name"],
)  # fmt: skip
def test_export_makes_the_checkpoint_check_of_the_other_commands(tmp_path: Path, capsys, change: Callable[[dict], None], expected: str) -> None:
    last = damaged_copy(tmp_path, change)
    err = export_error(capsys, str(last), str(tmp_path / "model.onnx"))
    assert f"'{last}'" in err and expected in err
    assert not list(tmp_path.glob("model.onnx*"))
