"""The predictions CSV (src/cifar_resnet/predict.py): no cell a spreadsheet would run as a formula."""

from __future__ import annotations

import csv
import io
import os
import stat
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch.callbacks import TQDMProgressBar

from cifar_resnet.errors import UserError
from cifar_resnet.predict import CSV_NAME, PredictionWriter, spreadsheet_safe

# What spreadsheets (Excel, LibreOffice, Google Sheets) read as the start of a formula (OWASP, "CSV injection").
FORMULA_PREFIXES = ["=", "+", "-", "@", "\t", "\r"]


@pytest.mark.parametrize("prefix", FORMULA_PREFIXES, ids=repr)
def test_every_formula_prefix_gets_a_quote(prefix: str) -> None:
    assert spreadsheet_safe(f"{prefix}HYPERLINK(1)") == f"'{prefix}HYPERLINK(1)"


def test_cells_that_are_not_formulas_are_kept() -> None:
    for cell in ("cat.png", "a=b.png", "1.5", "", "'quoted", "test[0]", "maple_tree"):
        assert spreadsheet_safe(cell) == cell


def test_the_csv_escapes_file_and_class_names_that_start_a_formula(tmp_path: Path) -> None:
    names = [f"{prefix}x.png" for prefix in FORMULA_PREFIXES] + ["plain.png"]
    class_names = ["=cmd", "+plus", "-minus", "@at", "apple", *(f"class{i}" for i in range(5, 100))]
    trainer = SimpleNamespace(
        datamodule=SimpleNamespace(predict_names=names, class_names=class_names),
        is_global_zero=True, log_dir=str(tmp_path), default_root_dir=str(tmp_path),
    )  # fmt: skip
    n = len(names)
    predictions = [{"classes": torch.tensor([[0, 1, 2, 3, 4]] * n), "probs": torch.full((n, 5), 0.2)}]
    PredictionWriter().write_on_epoch_end(trainer, None, predictions, [list(range(n))])

    with open(tmp_path / CSV_NAME, newline="", encoding="utf-8") as file:
        header, *rows = list(csv.reader(file))
    assert header[:3] == ["file", "class_1", "prob_1"] and len(rows) == n
    assert [row[0] for row in rows] == [f"'{name}" for name in names[:-1]] + ["plain.png"]
    assert rows[0][1:9:2] == ["'=cmd", "'+plus", "'-minus", "'@at"] and rows[0][9] == "apple"
    cells = [cell for row in rows for cell in row]
    assert not [cell for cell in cells if cell[:1] in FORMULA_PREFIXES], "a cell starts a formula"


def test_an_output_or_row_count_that_cannot_work_is_refused_before_predicting(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("x")
    assert PredictionWriter(str(tmp_path / "new" / "out.csv"), rows_shown=0).output == str(tmp_path / "new" / "out.csv")  # the control
    with pytest.raises(UserError, match=rf"prediction.output '{tmp_path}' is a folder: give the path of a CSV file"):
        PredictionWriter(str(tmp_path))
    with pytest.raises(UserError, match=rf"lies under '{tmp_path / 'a-file'}', which is a file"):
        PredictionWriter(str(tmp_path / "a-file" / "out.csv"))
    with pytest.raises(UserError, match="prediction.rows_shown must be 0 or more, got -1"):
        PredictionWriter(rows_shown=-1)


def test_a_checkpoint_or_a_link_to_a_pipe_is_never_the_output(tmp_path: Path) -> None:
    checkpoint = tmp_path / "last.ckpt"
    torch.save({"state_dict": {}}, checkpoint)
    before = checkpoint.read_bytes()
    with pytest.raises(UserError, match=rf"^--prediction.output '{checkpoint}' already exists and is not a CSV of predictions"):
        PredictionWriter(str(checkpoint))
    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "stdout").symlink_to(tmp_path / "pipe")  # /dev/stdout, when the output goes to a pipe
    with pytest.raises(UserError, match=r"link to a pipe \(FIFO\), not a file.*`--prediction.output -` for standard output"):
        PredictionWriter(str(tmp_path / "stdout"))
    assert checkpoint.read_bytes() == before and stat.S_ISFIFO(os.stat(tmp_path / "pipe").st_mode)


def test_a_dash_writes_the_csv_to_standard_output_alone(tmp_path: Path, capsys) -> None:
    bar = TQDMProgressBar()
    trainer = SimpleNamespace(
        datamodule=SimpleNamespace(predict_names=["a.png", "b.png"], class_names=[f"class{i}" for i in range(100)]),
        is_global_zero=True, log_dir=str(tmp_path), default_root_dir=str(tmp_path), progress_bar_callback=bar,
    )  # fmt: skip
    writer = PredictionWriter("-")
    writer.setup(trainer, None, "predict")
    assert not bar.is_enabled  # the bar would write between the rows
    predictions = [{"classes": torch.tensor([[3, 1, 2, 0, 4], [5, 6, 7, 8, 9]]), "probs": torch.full((2, 5), 0.2)}]
    writer.write_on_epoch_end(trainer, None, predictions, [[0, 1]])
    writer.teardown(trainer, None, "predict")
    header, first, second = list(csv.reader(io.StringIO(capsys.readouterr().out)))
    assert header[:3] == ["file", "class_1", "prob_1"] and first[:2] == ["a.png", "class3"] and second[:2] == ["b.png", "class5"]
    assert not list(tmp_path.iterdir())  # no file written
