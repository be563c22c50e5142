"""Every bad input ends in one clear error (exit 2, no traceback) and leaves data and checkpoints intact."""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cifar_resnet import ScratchResNet
from cifar_resnet.callbacks import StopChildProcessesOnError, StopOnNonFiniteLoss
from cifar_resnet.checkpointing import AtomicCheckpointIO, atomic_save, read_checkpoint
from cifar_resnet.cli import main, run
from cifar_resnet.data.archive import ARCHIVE_NAME, FOLDER_NAME
from cifar_resnet.data.synthetic import py2_pickle, synthetic_split
from cifar_resnet.errors import UserError
from cifar_resnet.models import SeedResNet
from conftest import CONFIGS, run_cli, tiny_args

SCRATCH, FINETUNE = str(CONFIGS / "scratch.yaml"), str(CONFIGS / "finetune.yaml")


def hashes(*roots: Path) -> dict[Path, str]:
    """sha256 of every file under ``roots``."""
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for root in roots for p in sorted(root.rglob("*")) if p.is_file()}


def assert_intact(before: dict[Path, str]) -> None:
    """Every file of ``before`` is still there with the same bytes."""
    after = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in before if p.is_file()}
    assert after == before


def fails(capsys: pytest.CaptureFixture, *args: str) -> str:
    """Run the CLI in-process, expect the one-paragraph error and exit code 2; return the message."""
    with pytest.raises(SystemExit) as exit_info:
        main(list(args))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "cifar-resnet: error: " in err and "Traceback" not in err
    return err[err.index("cifar-resnet: error: ") :]


class Exploit:
    """Unpickling this calls ``open(marker, 'w')``: a stand-in for any code a crafted file could run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


@pytest.fixture(scope="module")
def trained(cifar_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """last.ckpt of a one-epoch scratch run and of a one-epoch fine-tuning run."""
    tmp = tmp_path_factory.mktemp("trained")
    main(["fit", "--config", SCRATCH, *tiny_args(cifar_dir, tmp / "runs")])
    main(["fit", "--config", FINETUNE, *tiny_args(cifar_dir, tmp / "runs"), "--model.init_args.weights", "null",
          "--data.output_size", "32"])  # fmt: skip
    return {name: tmp / "runs" / name / "version_0" / "checkpoints" / "last.ckpt" for name in ("scratch", "finetune")}


# --- data ----------------------------------------------------------------------------------------------


def test_truncated_archive_on_the_command_line(cifar_dir: Path, tmp_path: Path, capsys) -> None:
    payload = (cifar_dir / ARCHIVE_NAME).read_bytes()
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / ARCHIVE_NAME).write_bytes(payload[: len(payload) * 2 // 3])
    before = hashes(tmp_path / "data")
    err = fails(capsys, "fit", "--config", SCRATCH, *tiny_args(tmp_path / "data", tmp_path / "runs"))
    assert f"The archive '{tmp_path / 'data' / ARCHIVE_NAME}' is truncated or corrupt" in err and "download" in err
    assert_intact(before)


def test_partial_folder_falls_back_to_nothing_and_says_what_is_missing(cifar_dir: Path, tmp_path: Path, capsys) -> None:
    shutil.copytree(cifar_dir / FOLDER_NAME, tmp_path / "data" / FOLDER_NAME)
    (tmp_path / "data" / FOLDER_NAME / "test").unlink()
    before = hashes(tmp_path / "data")
    err = fails(capsys, "fit", "--config", SCRATCH, *tiny_args(tmp_path / "data", tmp_path / "runs"))
    assert "CIFAR-100 not found" in err and "train, test, meta" in err
    assert_intact(before)


def test_labels_out_of_range_on_the_command_line(cifar_dir: Path, tmp_path: Path, capsys) -> None:
    shutil.copytree(cifar_dir / FOLDER_NAME, tmp_path / "data" / FOLDER_NAME)
    split = synthetic_split(600, 0, b"training batch 1 of 1")
    split[b"coarse_labels"][7] = 20
    (tmp_path / "data" / FOLDER_NAME / "train").write_bytes(py2_pickle(split))
    before = hashes(tmp_path / "data")
    err = fails(capsys, "test", "--config", SCRATCH, *tiny_args(tmp_path / "data", tmp_path / "runs"))
    assert "(train): 'coarse_labels' must lie in [0, 19], found values from 0 to 20" in err
    assert_intact(before)


def test_a_data_pickle_that_would_run_code_is_refused(cifar_dir: Path, tmp_path: Path, capsys) -> None:
    shutil.copytree(cifar_dir / FOLDER_NAME, tmp_path / "data" / FOLDER_NAME)
    marker = tmp_path / "pwned"
    (tmp_path / "data" / FOLDER_NAME / "meta").write_bytes(pickle.dumps({"fine_label_names": Exploit(marker)}, protocol=2))
    err = fails(capsys, "fit", "--config", SCRATCH, *tiny_args(tmp_path / "data", tmp_path / "runs"))
    assert "refusing to load global" in err and "(meta)" in err
    assert not marker.exists()


# --- configuration ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (["--trainer.epochs", "3"], "unrecognized arguments: --trainer.epochs"),
        (["--data.batch_size", "many"], 'Parser key "data.batch_size"'),
        (["--data.batch_size", "0"], "batch_size, eval_batch_size and output_size must be positive"),
        (["--data.hflip_prob", "1.5"], "Flip probabilities must lie in [0, 1]"),
        (["--model.init_args.dropout", "1.2"], "dropout must lie in [0, 1)"),
        (["--trainer.devices", "0"], "Invalid trainer settings"),
    ],
)
def test_bad_config_values(cifar_dir: Path, tmp_path: Path, capsys, override: list[str], expected: str) -> None:
    err = fails(capsys, "fit", "--config", SCRATCH, *tiny_args(cifar_dir, tmp_path / "runs"), *override)
    assert expected in err


def test_unknown_key_in_a_config_file_is_one_line_not_a_page_of_usage(cifar_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "extra.yaml").write_text("data:\n  batch_sise: 10\n")
    proc = run_cli("fit", "--config", SCRATCH, "--config", str(tmp_path / "extra.yaml"), cwd=tmp_path, expect_ok=False)
    assert proc.returncode == 2
    assert "does not accept option 'data.batch_sise'" in proc.stderr and "--help" in proc.stderr
    assert "Traceback" not in proc.stderr and "usage:" not in proc.stderr and len(proc.stderr.splitlines()) <= 3


# --- checkpoints and weights --------------------------------------------------------------------------


def test_fine_tune_checkpoint_with_the_scratch_config(cifar_dir: Path, trained: dict, tmp_path: Path, capsys) -> None:
    before = hashes(trained["finetune"].parent)
    for subcommand in ("fit", "test"):
        err = fails(capsys, subcommand, "--config", SCRATCH, *tiny_args(cifar_dir, tmp_path / "runs"),
                    "--ckpt_path", str(trained["finetune"]))  # fmt: skip
        assert f"'{trained['finetune']}' holds a FineTunedResNet18, but the config asks for a ScratchResNet" in err
    assert_intact(before)


def test_checkpoint_of_another_network_without_the_cli(cifar_dir: Path, trained: dict, tmp_path: Path) -> None:
    """Lightning's own page of missing keys becomes one line, also when the Trainer is used directly."""
    from lightning.pytorch import Trainer

    from cifar_resnet import CIFAR100DataModule

    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=tmp_path)
    with pytest.raises(UserError, match=r"holds the weights of cifar_resnet.FineTunedResNet18, which do not fit ScratchResNet \(missing: "):
        trainer.test(ScratchResNet(), CIFAR100DataModule(str(cifar_dir), val_size=100), ckpt_path=trained["finetune"])


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_damaged_checkpoint_names_the_file(cifar_dir: Path, trained: dict, tmp_path: Path, capsys, damage: str) -> None:
    payload = trained["scratch"].read_bytes()
    bad = tmp_path / "runs" / "scratch" / "version_0" / "checkpoints" / "last.ckpt"
    bad.parent.mkdir(parents=True)
    bad.write_bytes({"truncated": payload[: len(payload) // 2], "garbage": os.urandom(4096), "empty": b""}[damage])
    before = hashes(bad.parent)
    for ckpt_path in (str(bad), "last"):
        err = fails(capsys, "fit", "--config", SCRATCH, *tiny_args(cifar_dir, tmp_path / "runs"), "--ckpt_path", ckpt_path)
        assert f"Cannot read checkpoint '{bad}': the file is truncated or corrupt" in err
    assert_intact(before)


def test_missing_checkpoint_and_no_last_checkpoint_to_test(cifar_dir: Path, tmp_path: Path, capsys) -> None:
    err = fails(capsys, "test", "--config", SCRATCH, *tiny_args(cifar_dir, tmp_path / "runs"), "--ckpt_path", "nope.ckpt")
    assert "Checkpoint 'nope.ckpt' not found" in err
    err = fails(capsys, "test", "--config", SCRATCH, *tiny_args(cifar_dir, tmp_path / "runs"), "--ckpt_path", "last")
    assert "no " in err and "last.ckpt to test" in err


def test_a_checkpoint_that_would_run_code_is_refused(cifar_dir: Path, trained: dict, tmp_path: Path, capsys) -> None:
    checkpoint = torch.load(trained["scratch"], weights_only=True)
    checkpoint["hyper_parameters"]["payload"] = Exploit(tmp_path / "pwned")
    crafted = tmp_path / "crafted.ckpt"
    torch.save(checkpoint, crafted)
    before = hashes(tmp_path)
    for subcommand in ("fit", "test"):
        err = fails(capsys, subcommand, "--config", SCRATCH, *tiny_args(cifar_dir, tmp_path / "runs"), "--ckpt_path", str(crafted))
        assert f"Refusing to load checkpoint '{crafted}'" in err
    with pytest.raises(UserError, match="Refusing"):
        AtomicCheckpointIO().load_checkpoint(crafted)
    assert not (tmp_path / "pwned").exists()
    assert_intact(before)
    # The file is a real threat: an unrestricted load runs its code.
    torch.load(crafted, weights_only=False)
    assert (tmp_path / "pwned").exists()


def test_a_weights_file_that_would_run_code_is_refused(cifar_dir: Path, tmp_path: Path, capsys) -> None:
    crafted = tmp_path / "resnet18.pth"
    torch.save({"conv1.weight": torch.zeros(1), "x": Exploit(tmp_path / "pwned")}, crafted)
    err = fails(capsys, "fit", "--config", FINETUNE, *tiny_args(cifar_dir, tmp_path / "runs"),
                "--model.init_args.weights_path", str(crafted))  # fmt: skip
    assert f"Cannot read weights file '{crafted}'" in err
    assert not (tmp_path / "pwned").exists()


def test_weights_file_of_another_architecture_on_the_command_line(cifar_dir: Path, tmp_path: Path, capsys) -> None:
    weights = tmp_path / "seed_resnet.pth"
    torch.save(SeedResNet().state_dict(), weights)
    before = hashes(tmp_path)
    err = fails(capsys, "fit", "--config", FINETUNE, *tiny_args(cifar_dir, tmp_path / "runs"),
                "--model.init_args.weights_path", str(weights))  # fmt: skip
    assert f"The weights in '{weights}' are not a torchvision ResNet18 state dict (missing: bn1.bias" in err
    assert_intact(before)


# --- atomic checkpoints -------------------------------------------------------------------------------


def test_a_kill_while_saving_leaves_the_previous_checkpoint(tmp_path: Path) -> None:
    target = tmp_path / "last.ckpt"
    atomic_save({"state_dict": {"w": torch.ones(3)}, "epoch": 0}, target)
    before = target.read_bytes()
    # A process killed (SIGKILL) half-way through writing the next checkpoint.
    script = f"""
import os, signal, torch
from cifar_resnet.checkpointing import atomic_save
def torn_save(obj, f):
    f.write(b"PK\\x03\\x04 half a checkpoint")
    f.flush()
    os.kill(os.getpid(), signal.SIGKILL)
torch.save = torn_save
atomic_save({{"state_dict": {{"w": torch.zeros(3)}}, "epoch": 1}}, {str(target)!r})
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert proc.returncode == -9
    assert target.read_bytes() == before
    assert read_checkpoint(target)["epoch"] == 0
    leftovers = [p.name for p in tmp_path.iterdir() if p != target]
    assert len(leftovers) == 1 and leftovers[0].startswith(".last.ckpt.") and leftovers[0].endswith(".tmp")


def test_the_recipes_use_atomic_checkpoints_and_the_guards(cifar_dir: Path, tmp_path: Path) -> None:
    for config in (SCRATCH, FINETUNE):
        cli = run(["validate", "--config", config, *tiny_args(cifar_dir, tmp_path / "runs"),
                   "--model.init_args.weights", "null", "--data.output_size", "32"] if config == FINETUNE else
                  ["validate", "--config", config, *tiny_args(cifar_dir, tmp_path / "runs")])  # fmt: skip
        assert isinstance(cli.trainer.strategy.checkpoint_io, AtomicCheckpointIO)
        kinds = {type(c) for c in cli.trainer.callbacks}
        assert {StopOnNonFiniteLoss, StopChildProcessesOnError} <= kinds


# --- training going wrong ----------------------------------------------------------------------------


def test_nan_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(cifar_dir: Path, tmp_path: Path, capsys) -> None:
    args = [*tiny_args(cifar_dir, tmp_path / "runs"), "--trainer.precision", "32-true"]
    assert main(["fit", "--config", SCRATCH, *args]) is None
    checkpoints = tmp_path / "runs" / "scratch" / "version_0" / "checkpoints"
    before = hashes(checkpoints, cifar_dir)
    # Losses are read back only every so often; the step named is still the first bad one, not the one
    # after which the losses were read (before validation, after step 3).
    err = fails(capsys, "fit", "--config", SCRATCH, *args, "--trainer.max_epochs", "2", "--ckpt_path", "last",
                "--trainer.callbacks+=faults.PoisonWeights", "--trainer.callbacks.step", "2")  # fmt: skip
    assert "The training loss became nan at step 2 (epoch 1, batch 0)" in err
    assert_intact(before)
    assert sorted(p.name for p in checkpoints.iterdir()) == sorted(p.name for p in before if p.parent == checkpoints)
    good = read_checkpoint(checkpoints / "last.ckpt")
    assert good["epoch"] == 0 and all(torch.isfinite(v).all() for v in good["state_dict"].values() if v.is_floating_point())
