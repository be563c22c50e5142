"""Configs name the program's classes by ``class_path``; a run's ``config.yaml`` keeps those names for years.
Every name a config of this or an older version holds must still import, whatever module now owns it."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

from conftest import ROOT

CONFIGS = sorted((ROOT / "configs").glob("*.yaml")) + sorted((ROOT / "tests" / "fixtures").glob("*/config.yaml"))

# Public names of callbacks.py and checkpointing.py before they became packages (a module per job).
BEFORE_THE_SPLIT = {
    "cifar_resnet.callbacks": [
        "SpeedMonitor", "WallClock", "ClassFigures", "HParamsSummary", "FixedFormatProgressBar",
        "StopOnNonFiniteLoss", "StopChildProcessesOnError", "RunFolderLock", "process_start_time",
        "fixed_format", "tensorboard", "data_questions", "class_figures_job", "figures_after_test_job",
        "without_unset_switches", "flat_hparams",
    ],
    "cifar_resnet.checkpointing": [
        "AtomicCheckpointIO", "BackgroundCheckpointIO", "LastCheckpoint", "RandomStates", "LAST", "SCHEMA_KEY",
        "SCHEMA_VERSION", "NETWORK_SETTINGS", "stamp_schema", "setting_defaults", "network_settings",
        "read_checkpoint", "check_checkpoint_fits", "atomic_save", "atomic_write", "atomic_write_text",
        "write_error_message", "wait_for_checkpoints", "checkpoint_host_seconds", "find_last_checkpoint",
        "newest_checkpoint", "rng_states", "set_rng_states", "check_optimizer_fits", "damaged_part",
    ],
}


def class_paths(config: Path) -> list[str]:
    return re.findall(r"class_path:\s*(cifar_resnet\.[\w.]+)", config.read_text())


def test_the_configs_name_classes_of_the_program() -> None:
    assert len(CONFIGS) >= 6  # the five recipes/overlays and the old run's config.yaml
    names = {path for config in CONFIGS for path in class_paths(config)}
    assert "cifar_resnet.callbacks.SpeedMonitor" in names and "cifar_resnet.checkpointing.AtomicCheckpointIO" in names


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_class_path_in_a_config_imports(config: Path) -> None:
    for path in class_paths(config):
        module, _, name = path.rpartition(".")
        assert isinstance(getattr(importlib.import_module(module), name), type), path


@pytest.mark.parametrize("module", sorted(BEFORE_THE_SPLIT))
def test_every_name_of_the_old_modules_still_imports(module: str) -> None:
    imported = importlib.import_module(module)
    missing = [name for name in BEFORE_THE_SPLIT[module] if not hasattr(imported, name)]
    assert not missing, f"{module} lost {missing}"
    assert sorted(imported.__all__) == sorted(BEFORE_THE_SPLIT[module])
