"""``--trainer.logger false``: every subcommand works, in the same run folders as with a logger, and leaves
nothing in the working folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cifar_resnet.cli import main
from conftest import tiny_args, without_figures

SCRATCH = without_figures("scratch.yaml")


@pytest.mark.slow
def test_every_subcommand_works_without_a_logger(cifar_dir: Path, tmp_path: Path, monkeypatch, caplog) -> None:
    monkeypatch.chdir(tmp_path)
    args = ["--config", SCRATCH, *tiny_args(cifar_dir, tmp_path / "ignored"), "--trainer.logger", "false"]
    main(["fit", *args])
    main(["fit", *args, "--trainer.max_epochs", "2", "--ckpt_path", "last"])
    for subcommand in ("test", "validate", "predict"):
        main([subcommand, *args, "--ckpt_path", "last"])
    runs = tmp_path / "runs" / "scratch"  # the recipe's name, as with its TensorBoard logger
    last = torch.load(runs / "version_0" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["epoch"] == 1, "the resumed fit trained on in its own folder"
    # Each evaluation in its own folder, named after the run it evaluates.
    assert (runs / "version_0-test" / "test_report.json").is_file() and (runs / "version_0-validate" / "val_report.json").is_file()
    assert (runs / "version_0-predict" / "predictions.csv").is_file() and (runs / "version_0-predict" / "config.yaml").is_file()
    main(["test", *args, "--ckpt_path", "last"])
    assert (runs / "version_0-test-2" / "test_report.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"], "no .lock, checkpoint or report in the working folder"
    aside = [r.getMessage() for r in caplog.records if "step aside" in r.getMessage()]
    assert len(aside) == 6 and aside[0] == (
        "No logger (trainer.logger false): HParamsSummary, LearningRateMonitor step aside (they only write to a logger)."
    )
