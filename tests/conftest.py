"""Shared fixtures: a synthetic CIFAR-100 archive in the official format, weights, CLI helpers."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision

from cifar_resnet.data.synthetic import write_synthetic_archive
from cifar_resnet.events import read_scalars  # noqa: F401 (tests import it from here)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
CLI = Path(sys.executable).parent / "cifar-resnet"


@pytest.fixture(scope="session")
def cifar_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A data folder holding both the extracted ``cifar-100-python/`` and the ``.tar.gz``."""
    return write_synthetic_archive(tmp_path_factory.mktemp("cifar"), n_train=600, n_test=200, folder=True, tar=True)


@pytest.fixture(scope="session")
def resnet18_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A torchvision-format ResNet18 state dict (random values), as ``torch.save`` writes it."""
    path = tmp_path_factory.mktemp("weights") / "resnet18-test.pth"
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), path)
    return path


def tiny_args(data_dir: Path, log_dir: Path) -> list[str]:
    """CLI overrides that shrink a recipe to a few seconds on CPU."""
    return [
        "--data.data_dir", str(data_dir), "--data.download", "false", "--data.val_size", "100",
        "--data.batch_size", "50", "--data.eval_batch_size", "100",
        "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.max_epochs", "1",
        "--trainer.limit_train_batches", "2", "--trainer.limit_val_batches", "1", "--trainer.limit_test_batches", "2",
        "--trainer.logger.init_args.save_dir", str(log_dir), "--trainer.enable_progress_bar", "false",
    ]  # fmt: skip


def run_cli(
    *args: str, cwd: Path, timeout: float = 300, expect_ok: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    """Run the installed ``cifar-resnet`` command; fail with its output if the exit code is unexpected."""
    proc = subprocess.run([str(CLI), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    if (proc.returncode == 0) != expect_ok:
        pytest.fail(f"cifar-resnet {' '.join(args)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc


def warning_lines(stderr: str) -> list[str]:
    """The lines of ``stderr`` that are warnings: Lightning prints its own as ``path/file.py:N: message``,
    Python's carry a category (``UserWarning: ...``)."""
    return [line for line in stderr.splitlines() if re.search(r"\.py:\d+: |Warning:", line)]


def env_with_tests() -> dict[str, str]:
    """The environment plus tests/ on PYTHONPATH, so the CLI can import test-only callbacks (``faults.*``)."""
    tests = str(Path(__file__).resolve().parent)
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [tests, os.environ.get("PYTHONPATH")]))}
