"""On a GPU, every read of a tensor's value by the host makes it wait for the device. A training
step must need none: no per-step ``.item()`` for the progress bar, the loss check or logging."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cifar_resnet.cli import main
from conftest import CONFIGS, tiny_args

pytestmark = pytest.mark.slow  # every test here runs the program end to end (make test-fast leaves them out)


def test_training_steps_do_not_read_tensors_back(cifar_dir: Path, tmp_path: Path) -> None:
    reads_file = tmp_path / "reads.json"
    args = [*tiny_args(cifar_dir, tmp_path / "runs"), "--trainer.enable_progress_bar", "true",
            "--data.batch_size", "10", "--trainer.limit_train_batches", "14",
            "--trainer.callbacks+=faults.CountHostReads", "--trainer.callbacks.out", str(reads_file)]  # fmt: skip
    main(["fit", "--config", str(CONFIGS / "scratch.yaml"), *args])
    reads = json.loads(reads_file.read_text())
    # Adam reads its step counters, which torch keeps on the CPU (no wait); nothing else may read.
    ours = [read for read in reads if "/torch/optim/" not in read]
    assert ours == [], ours
    assert len(reads) > 0, "the counter saw Adam's reads, so it was counting"
