"""Run folders hold what happened: a resumed CSV log keeps its rows, a failed command leaves no empty run."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from cifar_resnet.cli import main
from conftest import CONFIGS, without_figures


def debug_args(cifar_dir: Path, runs: Path, recipe: str = "scratch.yaml") -> list[str]:
    return ["--config", without_figures(recipe), "--config", str(CONFIGS / "debug.yaml"), "--data.data_dir", str(cifar_dir),
            "--data.download", "false", "--trainer.logger.init_args.save_dir", str(runs), "--trainer.limit_train_batches", "2",
            "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar", "false"]  # fmt: skip


@pytest.mark.slow
def test_a_resumed_csv_log_keeps_its_rows_and_a_failed_command_leaves_no_run(cifar_dir: Path, tmp_path: Path, capsys) -> None:
    args = debug_args(cifar_dir, tmp_path / "runs")
    main(["fit", *args, "--trainer.max_epochs", "1"])
    main(["fit", *args, "--trainer.max_epochs", "2", "--ckpt_path", "last"])
    run_dir = tmp_path / "runs" / "scratch" / "version_0"
    with (run_dir / "metrics.csv").open(newline="") as file:
        rows = list(csv.DictReader(file))
    assert [row["epoch"] for row in rows if row.get("val/top1")] == ["0", "1"], "epoch 0's rows survive the resume"
    assert not list(run_dir.glob(".metrics*"))

    # Commands that fail before they log: a missing checkpoint, a checkpoint of another network.
    for command in (["test", *args, "--ckpt_path", str(run_dir / "checkpoints" / "missing.ckpt")],
                    ["test", *debug_args(cifar_dir, tmp_path / "runs", "finetune.yaml"), "--ckpt_path", str(run_dir / "checkpoints" / "last.ckpt")]):  # fmt: skip
        with pytest.raises(SystemExit):
            main(command)
        assert "cifar-resnet: error:" in capsys.readouterr().err
    assert sorted(p.relative_to(tmp_path / "runs").as_posix() for p in (tmp_path / "runs").glob("*/*")) == ["scratch/version_0"]
