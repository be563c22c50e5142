"""Both seed recipes learn: a few steps on a handful of synthetic images fit them, and the same run with
the training loss multiplied by zero (tests/probes.py) does not."""

from __future__ import annotations

from pathlib import Path

import pytest

from cifar_resnet.cli import run
from conftest import CONFIGS, read_scalars, tiny_args

pytestmark = pytest.mark.slow  # every test here runs the program end to end (make test-fast leaves them out)

STEPS = 6
BATCH = 10


def fit_a_few_images(recipe: str, data_dir: Path, log_dir: Path, model_class: str | None, extra: list[str]) -> dict:
    """Fit the recipe for STEPS epochs of one batch on the same BATCH training images; validate twice BATCH images
    at the end (`limit_val_batches 1` would mean all of them)."""
    args = [
        "fit", "--config", str(CONFIGS / recipe), *tiny_args(data_dir, log_dir),
        "--data.val_size", str(600 - BATCH), "--data.batch_size", str(BATCH), "--data.eval_batch_size", str(BATCH),
        "--trainer.max_epochs", str(STEPS), "--trainer.check_val_every_n_epoch", str(STEPS),
        "--trainer.num_sanity_val_steps", "0", "--trainer.log_every_n_steps", "1", "--trainer.limit_val_batches", "2",
        # bf16 autocast is slow on a CPU; the recipe's optimizer, schedule and flips are unchanged.
        "--trainer.precision", "32-true", *extra,
    ]  # fmt: skip
    if model_class:
        args += ["--model.class_path", model_class]
    run(args)
    return read_scalars(log_dir)


@pytest.mark.parametrize("recipe", ["scratch.yaml", "finetune.yaml"])
@pytest.mark.parametrize("loss_scale", [1, 0])
def test_the_recipe_learns_and_a_zeroed_loss_does_not(
    recipe: str, loss_scale: int, cifar_dir: Path, resnet18_weights: Path, tmp_path: Path
) -> None:
    extra = ["--data.output_size", "32", "--model.init_args.weights_path", str(resnet18_weights)] if recipe == "finetune.yaml" else []
    model_class = None
    if loss_scale == 0:
        model_class = "probes.ZeroLossScratchResNet" if recipe == "scratch.yaml" else "probes.ZeroLossFineTunedResNet18"
    assert_learned(fit_a_few_images(recipe, cifar_dir, tmp_path / "runs", model_class, extra), bool(loss_scale))


@pytest.mark.parametrize("loss_scale", [1, 0])
def test_the_modules_own_step_learns_and_a_zeroed_loss_does_not(loss_scale: int, cifar_dir: Path, tmp_path: Path) -> None:
    """The step a CUDA graph captures (``cuda_graph: true``), run uncaptured on the CPU."""
    model_class = None if loss_scale else "probes.ZeroLossScratchResNet"
    scalars = fit_a_few_images("scratch.yaml", cifar_dir, tmp_path / "runs", model_class, ["--model.init_args.cuda_graph", "true"])
    assert_learned(scalars, bool(loss_scale))


def assert_learned(scalars: dict, expected: bool) -> None:
    """The loss fell to under half and the last epoch's training top-1 reached 50 %, or (``expected`` false) not."""
    losses = [value for _, value in scalars["train/loss_step"]]
    last_top1 = scalars["train/top1"][-1][1]
    assert len(losses) == STEPS
    learned = min(losses[-3:]) < 0.5 * losses[0] and last_top1 >= 0.5
    assert learned == expected, f"losses {losses}, last epoch's train top-1 {last_top1}"
