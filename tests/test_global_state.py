"""The tests' own tools: a test that runs the program in its process leaves no global state behind, and a test
waiting for a run to pause does not hang when the run ends instead."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pytest
from lightning.pytorch import seed_everything

from cifar_resnet.cli import silence_known_warnings
from cli_process import CliProcess
from conftest import restored_global_state
from faults import pause_point, wait_until_paused


def test_seed_variables_and_warning_filters_are_put_back() -> None:
    before = (os.environ.get("PL_GLOBAL_SEED"), os.environ.get("PL_SEED_WORKERS"), list(warnings.filters))
    with restored_global_state():
        seed_everything(123, workers=True)
        silence_known_warnings()
        assert os.environ["PL_GLOBAL_SEED"] == "123" and os.environ["PL_SEED_WORKERS"] == "1"
        assert len(warnings.filters) > len(before[2])
    assert (os.environ.get("PL_GLOBAL_SEED"), os.environ.get("PL_SEED_WORKERS"), list(warnings.filters)) == before


def test_waiting_for_a_pause_ends_when_the_run_ends_without_pausing(tmp_path: Path) -> None:
    fifo = pause_point(tmp_path)
    proc = CliProcess(["--version"], tmp_path)  # prints the version and ends: it never reaches a training step
    with pytest.raises(AssertionError, match=r"the run ended \(exit code 0\)"):
        wait_until_paused(fifo, proc, timeout=120)
    assert not fifo.exists()
    proc.communicate(timeout=30)
