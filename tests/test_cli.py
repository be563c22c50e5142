"""The installed ``cifar-resnet`` command end to end: both recipes, LR schedule, DDP, bf16, configs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from cifar_resnet.cli import run
from conftest import CONFIGS, read_scalars, run_cli, tiny_args, without_figures

pytestmark = pytest.mark.slow  # every test here runs the program end to end (make test-fast leaves them out)


def checkpoints(log_dir: Path) -> list[Path]:
    return sorted(log_dir.rglob("*.ckpt"))


def test_scratch_fit_then_test_from_checkpoint(cifar_dir: Path, tmp_path: Path) -> None:
    config = str(CONFIGS / "scratch.yaml")
    run_cli("fit", "--config", config, *tiny_args(cifar_dir, tmp_path / "runs"), cwd=tmp_path)
    run_dir = tmp_path / "runs" / "scratch" / "version_0"
    assert (run_dir / "config.yaml").is_file()
    last = run_dir / "checkpoints" / "last.ckpt"
    assert last.is_file() and len(checkpoints(run_dir)) == 2, "expected last.ckpt and the best-val checkpoint"
    fit_scalars = read_scalars(run_dir)
    for tag in ("train/loss_epoch", "train/top1", "val/loss", "val/top1", "val/top5", "train/lr"):
        assert tag in fit_scalars

    proc = run_cli("test", "--config", config, *tiny_args(cifar_dir, tmp_path / "runs"), "--ckpt_path", str(last), cwd=tmp_path)
    assert "test/top1" in proc.stdout and "test/top5" in proc.stdout
    test_scalars = read_scalars(tmp_path / "runs" / "scratch" / "version_0-test")
    top1 = test_scalars["test/top1"][0][1]
    assert 0.0 <= top1 <= 1.0 and test_scalars["test/top5"][0][1] >= top1


def test_finetune_fit_uses_the_weights_file_then_tests(cifar_dir: Path, resnet18_weights: Path, tmp_path: Path) -> None:
    config = str(CONFIGS / "finetune.yaml")
    args = [*tiny_args(cifar_dir, tmp_path / "runs"), "--data.output_size", "64"]
    run_cli("fit", "--config", config, *args, "--model.init_args.weights_path", str(resnet18_weights), cwd=tmp_path)
    last = tmp_path / "runs" / "finetune" / "version_0" / "checkpoints" / "last.ckpt"
    trained = torch.load(last, map_location="cpu", weights_only=True)["state_dict"]
    pretrained = torch.load(resnet18_weights, weights_only=True)
    assert trained["net.fc.weight"].shape == (100, 512)
    # Two SGD steps move the ImageNet weights only a little; a random init would be far away.
    assert (trained["net.conv1.weight"] - pretrained["conv1.weight"]).abs().max() < 1e-2

    # Testing a checkpoint needs no ImageNet weights (the checkpoint has them): the recipe's `weights` stays,
    # and nothing is downloaded (this machine is offline).
    proc = run_cli("test", "--config", config, *args, "--ckpt_path", str(last), cwd=tmp_path)
    assert "test/top1" in proc.stdout


def test_lr_drops_at_the_milestone_epoch_not_step(cifar_dir: Path, tmp_path: Path) -> None:
    # 2 steps per epoch and the milestone at 2: stepped per epoch (the seed's MultiStepLR), the LR drops
    # before the third epoch; stepped per optimizer step it would drop before the second.
    run_cli(
        "fit", "--config", without_figures("scratch.yaml"), *tiny_args(cifar_dir, tmp_path / "runs"),
        "--trainer.max_epochs", "3", "--trainer.limit_train_batches", "2",
        "--model.init_args.lr_scheduler.init_args.milestones", "[2]", "--trainer.log_every_n_steps", "1", cwd=tmp_path,
    )  # fmt: skip
    scalars = read_scalars(tmp_path / "runs")
    assert [step for step, _ in scalars["train/loss_step"]] == list(range(6)), "3 epochs of 2 batches each"
    assert [value for _, value in scalars["train/lr"]] == pytest.approx([1e-3, 1e-3, 1e-4])


def test_ddp_two_cpu_processes_train_and_write_once(cifar_dir: Path, tmp_path: Path) -> None:
    weights = {}
    for cuda_graph in ("auto", "true"):  # Lightning's step (auto on a CPU) and the module's own step
        save_dir = tmp_path / cuda_graph
        run_cli(
            "fit", "--config", without_figures("scratch.yaml"), *tiny_args(cifar_dir, save_dir),
            "--trainer.devices", "2", "--trainer.strategy", "ddp", "--trainer.precision", "32-true",
            "--trainer.deterministic", "true", "--model.init_args.cuda_graph", cuda_graph, cwd=tmp_path,
        )  # fmt: skip
        versions = sorted(p.name for p in (save_dir / "scratch").iterdir())
        assert versions == ["version_0"]
        run_dir = save_dir / "scratch" / "version_0"
        assert len(list(run_dir.glob("events.out.tfevents.*"))) == 1
        assert sorted(p.name for p in checkpoints(run_dir))[-1] == "last.ckpt" and len(checkpoints(run_dir)) == 2
        ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
        # Each of the 2 ranks ran limit_train_batches=2 steps on its own shard: the global step counts 2.
        assert ckpt["global_step"] == 2 and ckpt["epoch"] == 0
        weights[cuda_graph] = ckpt["state_dict"]
    # The own step's gradients are averaged over the ranks as Lightning's are: the same weights.
    for name, value in weights["auto"].items():
        assert torch.allclose(weights["true"][name].double(), value.double(), rtol=0, atol=1e-6), name


def test_bf16_mixed_runs_on_cpu(cifar_dir: Path, tmp_path: Path) -> None:
    cli = run(["fit", "--config", without_figures("scratch.yaml"), *tiny_args(cifar_dir, tmp_path / "runs"),
                "--trainer.precision", "bf16-mixed"])  # fmt: skip
    assert cli.trainer.precision == "bf16-mixed"
    with cli.trainer.precision_plugin.forward_context():
        logits = cli.model(torch.randn(2, 3, 32, 32))
    assert logits.dtype == torch.bfloat16
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss_epoch"])


def test_print_config_shows_the_seed_recipes() -> None:
    def printed(config: str) -> dict:
        proc = run_cli("fit", "--config", str(CONFIGS / config), "--print_config", cwd=CONFIGS)
        return yaml.safe_load(proc.stdout)

    scratch = printed("scratch.yaml")
    model = scratch["model"]["init_args"]
    assert scratch["model"]["class_path"] == "cifar_resnet.ScratchResNet"
    assert model["optimizer"]["class_path"] == "torch.optim.Adam" and model["optimizer"]["init_args"]["lr"] == 1e-3
    assert model["lr_scheduler"]["class_path"] == "torch.optim.lr_scheduler.MultiStepLR"
    assert model["lr_scheduler"]["init_args"]["milestones"] == [30] and model["lr_scheduler"]["init_args"]["gamma"] == 0.1
    assert scratch["trainer"]["max_epochs"] == 50 and scratch["trainer"]["precision"] == "bf16-mixed"
    assert scratch["trainer"]["devices"] == "auto"
    assert scratch["data"]["batch_size"] == 100 and scratch["data"]["output_size"] == 32
    assert scratch["data"]["hflip_prob"] == 0.2 and scratch["data"]["vflip_prob"] == 0.2

    finetune = printed("finetune.yaml")
    model = finetune["model"]["init_args"]
    assert finetune["model"]["class_path"] == "cifar_resnet.FineTunedResNet18"
    assert model["optimizer"]["class_path"] == "torch.optim.SGD" and model["optimizer"]["init_args"]["lr"] == 0.01
    assert model["weights"] == "IMAGENET1K_V1"
    assert finetune["trainer"]["max_epochs"] == 5 and finetune["data"]["output_size"] == 224


def test_python_dash_m_is_the_same_cli() -> None:
    proc = subprocess.run([sys.executable, "-m", "cifar_resnet", "fit", "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--data.val_size" in proc.stdout and "--ckpt_path" in proc.stdout


def test_missing_data_is_a_clear_error_not_a_traceback(tmp_path: Path) -> None:
    proc = run_cli("fit", "--config", str(CONFIGS / "scratch.yaml"), *tiny_args(tmp_path / "empty", tmp_path / "runs"), cwd=tmp_path, expect_ok=False)
    assert proc.returncode == 2
    assert "CIFAR-100 not found" in proc.stderr and "Traceback" not in proc.stderr
