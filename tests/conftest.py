"""Shared fixtures: a synthetic CIFAR-100 archive in the official format, weights, CLI helpers."""

from __future__ import annotations

import atexit
import contextlib
import functools
import gzip
import os
import re
import shutil
import subprocess
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision
import yaml

from cifar_resnet.data.synthetic import write_synthetic_archive
from cifar_resnet.events import read_scalars  # noqa: F401 (tests import it from here)
from cli_process import CLI, CliProcess

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
# Module fixtures that fit a model (see pytest_collection_modifyitems).
SHARED_RUNS = ("trained", "reviewed", "uninterrupted", "two_recipes")

if "PYTEST_XDIST_WORKER" in os.environ:
    # The workers (one per core) share the cores: one thread each, here and in the processes it starts.
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist reads the groups
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """With ``--dist loadgroup``, the tests that share a fitted run go to one worker, which runs them in a row:
    the run is fitted once. Of the other tests, those marked heavy are sent first."""
    for item in items:
        shared = [name for name in SHARED_RUNS if name in getattr(item, "fixturenames", ())]
        if shared:
            item.add_marker(pytest.mark.xdist_group(shared[0]))
        if shared or item.get_closest_marker("heavy"):  # a shared fit or several fits: end to end
            item.add_marker(pytest.mark.slow)
    # pytest-xdist sends the groups first (most tests first), then single tests in this order: the heavy ones
    # first, so that the workers finish together.
    items.sort(key=lambda item: 0 if item.get_closest_marker("heavy") else 1 if item.get_closest_marker("xdist_group") else 2)


# What an in-process run (``cli.main``, ``seed_everything``, a Trainer) changes for the whole process, and later
# Trainers read: Lightning's seed variables (``reset_seed`` re-seeds from them), and torch.compile's cache folder
# (``compile_cache.CompileCache`` sets it). Their values before any test ran.
GLOBAL_ENV = ("PL_GLOBAL_SEED", "PL_SEED_WORKERS", "TORCHINDUCTOR_CACHE_DIR")
_CLEAN_ENV = {key: os.environ.get(key) for key in GLOBAL_ENV}


@contextlib.contextmanager
def restored_global_state() -> Iterator[None]:
    """Run the body, then put back the warning filters (``cli.run`` adds some) and Lightning's seed variables as
    they were before any test ran (a module fixture's fit may have set them before the body started)."""
    try:
        with warnings.catch_warnings():
            yield
    finally:
        for key, value in _CLEAN_ENV.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(autouse=True)
def _restore_global_state() -> Iterator[None]:
    """Every test leaves the process's global state as it found it (see :func:`restored_global_state`)."""
    with restored_global_state():
        yield


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


def drop_figures(config: dict) -> dict:
    """``config`` (a recipe as a dict) without its ClassFigures callback."""
    config["trainer"]["callbacks"] = [c for c in config["trainer"]["callbacks"] if not c["class_path"].endswith("ClassFigures")]
    return config


def recipe_copy(source: str, folder: Path, name: str | None = None, **changes: Any) -> Path:
    """A copy of ``configs/<source>`` in ``folder`` (as ``<name>.yaml``) without the per-epoch class figures
    (a second or more of drawing per epoch on a CPU), with ``changes`` (dotted keys) applied."""
    config = drop_figures(yaml.safe_load((CONFIGS / source).read_text()))
    for key, value in changes.items():
        section, *path = key.split(".")
        node = config[section]
        for part in path[:-1]:
            node = node[part]
        node[path[-1]] = value
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name or Path(source).stem}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@functools.cache
def without_figures(source: str) -> str:
    """``configs/<source>`` without the class figures, for tests about something else (written once per process)."""
    folder = Path(tempfile.mkdtemp(prefix="cifar-resnet-configs-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return str(recipe_copy(source, folder))


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
    *args: str,
    cwd: Path,
    timeout: float = 300,
    expect_ok: bool = True,
    env: dict[str, str] | None = None,
    installed: bool = False,
) -> subprocess.CompletedProcess:
    """Run ``cifar-resnet`` in a fresh process, forked with its imports done (tests/cli_process.py), or the
    installed script itself with ``installed=True``; fail with its output if the exit code is unexpected."""
    if installed:
        proc = subprocess.run([str(CLI), *args], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    else:
        proc = CliProcess(list(args), cwd, env).finish(timeout)
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


# A checkpoint and config.yaml written by an older version (f2a034b), which must keep loading.
OLD_RUN_FIXTURE = ROOT / "tests" / "fixtures" / "checkpoint-f2a034b"


def unpack_old_run(folder: Path) -> Path:
    """The fixture as a run folder ``folder/runs/fast/version_0`` (config.yaml, checkpoints/last.ckpt); returns the checkpoint."""
    run_dir = folder / "runs" / "fast" / "version_0"
    (run_dir / "checkpoints").mkdir(parents=True)
    shutil.copy(OLD_RUN_FIXTURE / "config.yaml", run_dir / "config.yaml")
    last = run_dir / "checkpoints" / "last.ckpt"
    with gzip.open(OLD_RUN_FIXTURE / "last.ckpt.gz") as packed, open(last, "wb") as out:
        shutil.copyfileobj(packed, out)
    return last
