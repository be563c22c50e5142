"""The tests' own hygiene: a test that runs the program in its process leaves no global state behind."""

from __future__ import annotations

import os
import warnings

from lightning.pytorch import seed_everything

from cifar_resnet.cli import silence_known_warnings
from conftest import restored_global_state


def test_seed_variables_and_warning_filters_are_put_back() -> None:
    before = (os.environ.get("PL_GLOBAL_SEED"), os.environ.get("PL_SEED_WORKERS"), list(warnings.filters))
    with restored_global_state():
        seed_everything(123, workers=True)
        silence_known_warnings()
        assert os.environ["PL_GLOBAL_SEED"] == "123" and os.environ["PL_SEED_WORKERS"] == "1"
        assert len(warnings.filters) > len(before[2])
    assert (os.environ.get("PL_GLOBAL_SEED"), os.environ.get("PL_SEED_WORKERS"), list(warnings.filters)) == before
