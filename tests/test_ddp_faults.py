"""A DDP job whose rank fails ends promptly with a non-zero exit code, leaving no process behind.

Rank 0 is the process the user started (here forked as tests/cli_process.py says); Lightning starts the other
ranks as its children, running the installed command.
"""

from __future__ import annotations

import os
import select
import subprocess
from pathlib import Path

import pytest

from cli_process import CliProcess
from conftest import env_with_tests, tiny_args, without_figures

pytestmark = pytest.mark.slow  # every test here runs the program end to end (make test-fast leaves them out)

# Start-up of two CPU processes takes ~15 s on a loaded 2-core machine; a hang would take 30 minutes (gloo's timeout).
LIMIT_S = 120


def ddp_fit(cifar_dir: Path, tmp_path: Path, *faults: str) -> subprocess.CompletedProcess:
    """A 2-process CPU DDP fit with fault-injecting callbacks (``subprocess.TimeoutExpired`` if it hangs)."""
    args = [
        "fit", "--config", without_figures("scratch.yaml"), *tiny_args(cifar_dir, tmp_path / "runs"),
        "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.precision", "32-true",
        "--trainer.limit_train_batches", "4", *faults,
    ]  # fmt: skip
    return CliProcess(args, tmp_path, env_with_tests()).finish(LIMIT_S)


def ends_within(pid: int, timeout: float) -> bool:
    """Whether the process ``pid`` (not a child of this one) ends within ``timeout`` seconds: its pidfd becomes
    readable when it ends (a zombie, ended but not yet reaped, has ended), so nothing polls."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:  # already ended and reaped
        return True
    try:
        return bool(select.select([fd], [], [], timeout)[0])
    finally:
        os.close(fd)


@pytest.mark.heavy
def test_a_rank_that_raises_mid_epoch_ends_the_job(cifar_dir: Path, tmp_path: Path) -> None:
    proc = ddp_fit(cifar_dir, tmp_path, "--trainer.callbacks+=faults.RaiseOnRank", "--trainer.callbacks.rank", "1",
                      "--trainer.callbacks.step", "2")  # fmt: skip
    assert proc.returncode != 0
    assert "injected fault on rank 1 at step 2" in proc.stderr
    assert not list((tmp_path / "runs").rglob("*.ckpt")), "no checkpoint of a half-finished epoch"


@pytest.mark.heavy
def test_a_failing_launcher_rank_kills_a_hung_rank(cifar_dir: Path, tmp_path: Path) -> None:
    pid_file = tmp_path / "rank1.pid"
    proc = ddp_fit(cifar_dir, tmp_path, "--trainer.callbacks+=faults.RaiseOnRank", "--trainer.callbacks.rank", "0",
                      "--trainer.callbacks.step", "2", "--trainer.callbacks+=faults.HangOnRank",
                      "--trainer.callbacks.pid_file", str(pid_file), "--trainer.callbacks.step", "2")  # fmt: skip
    assert proc.returncode != 0 and "injected fault on rank 0 at step 2" in proc.stderr
    rank1 = int(pid_file.read_text())
    assert ends_within(rank1, 10), "rank 1 was left running"
