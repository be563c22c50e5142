"""``cifar-resnet-export`` (src/cifar_resnet/export.py) refuses an output it cannot write before it loads
anything. Exporting for real (ONNX against PyTorch, the preprocessing in the JSON) is tested in test_review.py
and, for an old checkpoint, in checkpointing/test_old_checkpoint.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from cifar_resnet.export import main


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
