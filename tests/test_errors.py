"""Every bad input ends in one clear error (exit 2, no traceback) and leaves data and checkpoints intact."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import fractions
import hashlib
import io
import os
import pickle
import random
import re
import shutil
import signal
import stat
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from cifar_resnet import ScratchResNet
from cifar_resnet.callbacks import ClassFigures, StopChildProcessesOnError, StopOnNonFiniteLoss
from cifar_resnet.checkpointing import AtomicCheckpointIO, BackgroundCheckpointIO, atomic_save, read_checkpoint
from cifar_resnet.callbacks.safety import open_lock_file
from cifar_resnet.cli import Interrupted, _drop_working_folder_from_path, _finished_training, _user_message, main, run
from cifar_resnet.config_files import check_config_files
from cifar_resnet.entry import main as entry_main
from cifar_resnet.launch_env import check_launcher_variables
from cifar_resnet.data.archive import ARCHIVE_NAME, FOLDER_NAME
from cifar_resnet.data.synthetic import py2_pickle, synthetic_split
from cifar_resnet.errors import UserError
from cifar_resnet.export import main as export_main
from cifar_resnet.models import SeedResNet
from cli_process import CliProcess
from conftest import CONFIGS, env_with_tests, run_cli, tiny_args, without_figures
from faults import pause_point, wait_until_paused

# The seed recipes without their per-epoch figures: these tests are about what goes wrong.
SCRATCH, FINETUNE = without_figures("scratch.yaml"), without_figures("finetune.yaml")


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
        (["--model.init_args.optimizer.init_args.lr", "-0.1"], "Invalid optimizer or LR scheduler settings: Invalid learning rate: -0.1"),
        (["--model.init_args.num_classes", "1"], "num_classes is 1, but CIFAR-100 has 100 classes"),
        (["--model.init_args.num_classes", "10"], "num_classes is 10, but CIFAR-100 has 100 classes"),
        (["--trainer.log_every_n_steps", "0"], "log_every_n_steps must be a positive number of steps, got 0"),
        (["--seed_everything", str(2**32)], "seed_everything must lie in [0, 4294967295]"),
        (["--data.num_workers", "-1"], "num_workers must be 0 or more, got -1"),
        (["--data.output_size", "100000"], "output_size must be at most 1024"),
        # Issue 21: values jsonargparse takes but Lightning or torch tripped over with a traceback.
        (["--data.batch_size", "1e20"], 'Parser key "data.batch_size"'),
        (["--data.batch_size", str(2**70)], f"data.batch_size is {2**70}, which does not fit in 64 bits: it must lie in [-2^63, 2^63 - 1]"),
        (["--data.split_seed", str(2**70)], f"data.split_seed is {2**70}, which does not fit in 64 bits"),
        (["--trainer.devices", str(2**70)], f"trainer.devices is {2**70}, which does not fit in 64 bits"),
        (["--model.init_args.lr_scheduler.init_args.milestones", f"[{2**70}]"], "lr_scheduler.init_args.milestones[0] is"),
        (["--trainer.accumulate_grad_batches", "0"], "trainer.accumulate_grad_batches must be a positive number of batches, got 0"),
        (["--trainer.val_check_interval", "0"], "trainer.val_check_interval must be a number of training batches (1 or more) or a share of the epoch in (0, 1], got 0"),
        (["--trainer.num_nodes", "0"], "trainer.num_nodes must be a positive number of machines, got 0"),
        (["--trainer.check_val_every_n_epoch", "0"], "trainer.check_val_every_n_epoch must be a positive number of epochs"),
        (["--trainer.gradient_clip_val", "-1"], "trainer.gradient_clip_val must be 0 or more"),
        (["--trainer.num_sanity_val_steps", "-5"], "trainer.num_sanity_val_steps must be 0 or more batches (-1: the whole validation set)"),
        (["--model.init_args.num_classes", "-3"], "num_classes is -3, but CIFAR-100 has 100 classes"),
        (["--data.num_workers", "100000"], "num_workers must lie in [0, 64]"),
        (["--trainer.val_check_interval", "1000"], "Invalid trainer settings: `val_check_interval` (1000) must be less than or equal to the number of the training batches (2)"),
        (["--ckpt_path", ""], "`--ckpt_path` is empty"),
        (["--ckpt_path", "best"], "`--ckpt_path best` means the best checkpoint of a Trainer that trained in the same process"),
        (["--ckpt_path", "hpc"], "`--ckpt_path hpc`: no hpc_ckpt_*.ckpt"),
    ],
)
def test_bad_config_values(cifar_dir: Path, tmp_path: Path, capsys, override: list[str], expected: str) -> None:
    err = fails(capsys, "fit", "--config", SCRATCH, *tiny_args(cifar_dir, tmp_path / "runs"), *override)
    assert expected in err


def test_a_config_file_that_is_not_utf8_text_is_named(cifar_dir: Path, tmp_path: Path, capsys) -> None:
    latin = tmp_path / "latin.yaml"
    latin.write_bytes(Path(SCRATCH).read_bytes() + "# réglages de Zoé\n".encode("latin-1"))
    lines = latin.read_bytes().count(b"\n")
    big = tmp_path / "big.yaml"
    big.write_bytes(b"#" * (16 * 2**20 + 1))
    checkpoint = tmp_path / "last.ckpt"
    torch.save({"state_dict": {"weight": torch.ones(3)}}, checkpoint)
    cases = [(["--config", str(latin)], rf"--config '{latin}' is not UTF-8 text \(byte 0xe9 on line {lines}\)"),
             ([f"--config={checkpoint}"], rf"--config '{checkpoint}' is not UTF-8 text"),
             (["--config", SCRATCH, "--config", str(big)], rf"--config '{big}' is over 16 MiB: not a YAML config")]  # fmt: skip
    for args, expected in cases:
        for subcommand in ("fit", "test"):
            err = fails(capsys, subcommand, *args, *tiny_args(cifar_dir, tmp_path / "runs"))
            assert re.search(expected, err), err
    assert not (tmp_path / "runs").exists()
    with pytest.raises(SystemExit) as exit_info:
        export_main(["--config", str(latin), str(checkpoint), str(tmp_path / "model.onnx")])
    assert exit_info.value.code == 2 and f"--config '{latin}' is not UTF-8 text" in capsys.readouterr().err
    # The control: the same settings saved as UTF-8 parse.
    latin.write_text(latin.read_bytes().decode("latin-1"), encoding="utf-8")
    with pytest.raises(SystemExit) as printed:
        main(["fit", "--config", str(latin), *tiny_args(cifar_dir, tmp_path / "runs"), "--print_config"])
    assert printed.value.code == 0 and "ScratchResNet" in capsys.readouterr().out


@pytest.mark.parametrize("subcommand", ["test", "predict"])
@pytest.mark.parametrize("ckpt_path", ["", "best", "hpc"])
def test_ckpt_paths_no_command_has_are_refused(cifar_dir: Path, tmp_path: Path, capsys, subcommand: str, ckpt_path: str) -> None:
    err = fails(capsys, subcommand, "--config", SCRATCH, *tiny_args(cifar_dir, tmp_path / "runs"), "--ckpt_path", ckpt_path)
    assert "--ckpt_path" in err and ("'last'" in err)
    assert not (tmp_path / "runs").exists()


def test_the_constructors_refuse_what_they_cannot_build() -> None:
    with pytest.raises(UserError, match="num_classes must be a positive number of classes, got -3"):
        ScratchResNet(num_classes=-3)
    with pytest.raises(UserError, match="ClassFigures: every_n_epochs must be a positive number of epochs, got 0"):
        ClassFigures(every_n_epochs=0)
    with pytest.raises(UserError, match="ClassFigures: num_misclassified must be 0 or more images, got -1"):
        ClassFigures(num_misclassified=-1)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("data: [1, 2, 3]\n", "`data` in the config is list [1, 2, 3], but it must be a mapping of data settings"),
        ("trainer: 5\n", "`trainer` in the config is int 5, but it must be a mapping of trainer settings"),
        ("trainer: [1]\n", "`trainer` in the config is list [1], but it must be a mapping"),
        ("prediction: 5\n", "`prediction` in the config is int 5"),
        ("- 1\n- 2\n", "holds a list: a YAML config is a mapping of settings"),
        ("5\n", "holds the single value '5': a YAML config is a mapping of settings"),
        ("", "is empty: a YAML config is a mapping of settings"),
    ],
    ids=["data-list", "trainer-int", "trainer-list", "prediction-int", "top-level-list", "top-level-value", "empty"],
)
def test_a_config_of_the_wrong_shape_is_named(cifar_dir: Path, tmp_path: Path, capsys, text: str, expected: str) -> None:
    (tmp_path / "extra.yaml").write_text(text)
    err = fails(capsys, "fit", "--config", SCRATCH, *tiny_args(cifar_dir, tmp_path / "runs"), "--config", str(tmp_path / "extra.yaml"))
    assert expected in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        ("trainer:\n  max_epochs: 1  # Zoé\n".encode("utf-16"), "is UTF-16 text (it starts with a UTF-16 byte-order mark), not UTF-8"),
        ("trainer:\n  max_epochs: 1  # Zoé\n".encode("utf-16-le"), "every other byte is 0, as in UTF-16 text without a byte-order mark"),
        ("trainer:\n  max_epochs: 1\n".encode("utf-16-le"), "contains NUL (0x00) bytes"),
        ("trainer:\n  max_epochs: 1  # Zoé\n".encode("latin-1"), "(byte 0xe9 on line 2): its bytes read as Latin-1 (or Windows-1252) text"),
    ],
    ids=["utf-16-bom", "utf-16-no-bom", "utf-16-ascii", "latin-1"],
)
def test_a_config_in_another_encoding_says_which(tmp_path: Path, payload: bytes, expected: str) -> None:
    (tmp_path / "extra.yaml").write_bytes(payload)
    with pytest.raises(UserError, match=re.escape(expected)) as raised:
        check_config_files(["fit", "--config", str(tmp_path / "extra.yaml")])
    assert "Save it as UTF-8" in str(raised.value)


def nested_aliases(levels: int) -> str:
    """YAML whose last anchor stands for 10**levels values ("billion laughs") in a few hundred bytes."""
    lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def test_yaml_aliases_that_expand_a_config_beyond_reason_are_refused(cifar_dir: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "laughs.yaml").write_text(nested_aliases(9))
    (tmp_path / "loop.yaml").write_text("data: &a [1, *a]\n")
    for name in ("laughs.yaml", "loop.yaml"):
        err = fails(capsys, "fit", "--config", SCRATCH, *tiny_args(cifar_dir, tmp_path / "runs"), "--config", str(tmp_path / name))
        assert f"--config '{tmp_path / name}' grows to over 1,048,576 characters once its YAML aliases" in err
    # On the command line: jsonargparse reads values as YAML too.
    value = "{" + nested_aliases(9).strip().replace("\n", ", ") + "}"
    err = fails(capsys, "fit", "--config", SCRATCH, *tiny_args(cifar_dir, tmp_path / "runs"), "--data", value)
    assert "The command-line value grows to over 1,048,576 characters" in err
    # The control: a few aliases, as a config may well use, are fine.
    (tmp_path / "some.yaml").write_text("x: &x {max_epochs: 1}\ntrainer: *x\n" + nested_aliases(3))
    check_config_files(["--config", str(tmp_path / "some.yaml")])


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"LOCAL_RANK": "1"}, "this process is rank 1 (LOCAL_RANK=1), but WORLD_SIZE is not set: no launcher started it. Unset LOCAL_RANK"),
        ({"RANK": "3", "WORLD_SIZE": "2"}, "this process is rank 3 (RANK=3), but WORLD_SIZE is 2"),
        ({"RANK": "x"}, "The environment variable RANK='x' is not a whole number 0 or more"),
        ({"WORLD_SIZE": ""}, "The environment variable WORLD_SIZE='' is not a whole number"),
        ({"NODE_RANK": "-1"}, "NODE_RANK='-1' is not a whole number 0 or more"),
    ],
)
def test_launcher_variables_no_launcher_set_are_named(cifar_dir: Path, tmp_path: Path, capsys, monkeypatch, environ: dict, expected: str) -> None:
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    err = fails(capsys, "fit", "--config", SCRATCH, *tiny_args(cifar_dir, tmp_path / "runs"))
    assert expected in err
    # The installed command checks them before Lightning, which reads them as it is imported.
    with pytest.raises(SystemExit) as exit_info:
        entry_main(["fit", "--config", SCRATCH])
    assert exit_info.value.code == 2 and expected in capsys.readouterr().err


def test_launcher_variables_of_a_launcher_pass() -> None:
    check_launcher_variables({"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "NODE_RANK": "0", "MASTER_PORT": "x"})
    check_launcher_variables({"LOCAL_RANK": "0"})
    check_launcher_variables({})


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
    """The one check of a checkpoint against the model lives in the module: it works without the CLI too."""
    from lightning.pytorch import Trainer

    from cifar_resnet import CIFAR100DataModule

    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=tmp_path)
    with pytest.raises(UserError, match=r"holds a FineTunedResNet18, but the config asks for a ScratchResNet"):
        trainer.test(ScratchResNet(), CIFAR100DataModule(str(cifar_dir), val_size=100), ckpt_path=trained["finetune"])


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_damaged_checkpoint_names_the_file(cifar_dir: Path, trained: dict, tmp_path: Path, capsys, damage: str) -> None:
    payload = trained["scratch"].read_bytes()
    bad = tmp_path / "runs" / "scratch" / "version_0" / "checkpoints" / "last.ckpt"
    bad.parent.mkdir(parents=True)
    # Seeded garbage that torch's unpickler fails on with an IndexError (what once escaped as a traceback);
    # tests/test_tensor_files.py feeds hundreds of other payloads.
    garbage = random.Random(2).randbytes(4096)
    bad.write_bytes({"truncated": payload[: len(payload) // 2], "garbage": garbage, "empty": b""}[damage])
    before = hashes(bad.parent)
    for ckpt_path in (str(bad), "last"):
        err = fails(capsys, "fit", "--config", SCRATCH, *tiny_args(cifar_dir, tmp_path / "runs"), "--ckpt_path", ckpt_path)
        assert f"Cannot read checkpoint '{bad}': the file is truncated or corrupt" in err
    assert_intact(before)


def test_missing_checkpoint_and_no_last_checkpoint_to_test(cifar_dir: Path, tmp_path: Path, capsys) -> None:
    err = fails(capsys, "test", "--config", SCRATCH, *tiny_args(cifar_dir, tmp_path / "runs"), "--ckpt_path", "nope.ckpt")
    assert "Checkpoint 'nope.ckpt' not found" in err
    err = fails(capsys, "test", "--config", SCRATCH, *tiny_args(cifar_dir, tmp_path / "runs"), "--ckpt_path", "last")
    assert "`--ckpt_path last`: no " in err and "/checkpoints/*.ckpt to test" in err


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


@pytest.mark.slow
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


@pytest.mark.slow
def test_the_recipes_use_atomic_checkpoints_and_the_guards(cifar_dir: Path, tmp_path: Path) -> None:
    for config in (str(CONFIGS / "scratch.yaml"), str(CONFIGS / "finetune.yaml")):
        cli = run(["validate", "--config", config, *tiny_args(cifar_dir, tmp_path / "runs"),
                   "--model.init_args.weights", "null", "--data.output_size", "32"] if "finetune" in config else
                  ["validate", "--config", config, *tiny_args(cifar_dir, tmp_path / "runs")])  # fmt: skip
        checkpoint_io = cli.trainer.strategy.checkpoint_io
        assert isinstance(checkpoint_io, BackgroundCheckpointIO) and isinstance(checkpoint_io.checkpoint_io, AtomicCheckpointIO)
        kinds = {type(c) for c in cli.trainer.callbacks}
        assert {StopOnNonFiniteLoss, StopChildProcessesOnError} <= kinds


# --- training going wrong ----------------------------------------------------------------------------


@pytest.mark.slow
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


# --- checkpoints against the config -------------------------------------------------------------------


def edited_checkpoint(trained: dict, path: Path, hparams: dict, classes: int | None = None) -> Path:
    """The trained scratch checkpoint with other hyper-parameters (and a ``classes``-way head)."""
    checkpoint = torch.load(trained["scratch"], weights_only=True)
    checkpoint["hyper_parameters"].update(hparams)
    if classes is not None:
        for key in ("net.fc.weight", "net.fc.bias"):
            checkpoint["state_dict"][key] = checkpoint["state_dict"][key][:classes].clone()
    torch.save(checkpoint, path)
    return path


@pytest.mark.parametrize("subcommand", ["fit", "test", "predict"])
def test_a_10_class_checkpoint_under_the_100_class_config(cifar_dir: Path, trained: dict, tmp_path: Path, capsys, subcommand: str) -> None:
    path = edited_checkpoint(trained, tmp_path / "ten.ckpt", {"num_classes": 10}, classes=10)
    err = fails(capsys, subcommand, "--config", SCRATCH, *tiny_args(cifar_dir, tmp_path / "runs"), "--ckpt_path", str(path))
    assert f"The checkpoint '{path}' was trained with num_classes=10, but the config says num_classes=100" in err
    assert not list(tmp_path.rglob("predictions.csv"))


@pytest.mark.parametrize(
    ("hparams", "expected"),
    [
        ({"dropout": 0.5}, "was trained with dropout=0.5, but the config says dropout=0.3"),
        ({"stochastic_depth": 0.1}, "was written by another version of this program: settings unknown here: stochastic_depth"),
    ],
)
def test_checkpoint_settings_never_silently_beat_the_config(cifar_dir: Path, trained: dict, tmp_path: Path, capsys, hparams: dict, expected: str) -> None:
    path = edited_checkpoint(trained, tmp_path / "other.ckpt", hparams)
    err = fails(capsys, "test", "--config", SCRATCH, *tiny_args(cifar_dir, tmp_path / "runs"), "--ckpt_path", str(path))
    assert expected in err


def test_a_bare_state_dict_is_not_a_checkpoint(cifar_dir: Path, tmp_path: Path, capsys) -> None:
    path = tmp_path / "weights.ckpt"
    torch.save(SeedResNet().state_dict(), path)
    err = fails(capsys, "test", "--config", SCRATCH, *tiny_args(cifar_dir, tmp_path / "runs"), "--ckpt_path", str(path))
    assert f"'{path}' is not a Lightning checkpoint of this program (it has no 'state_dict'" in err


def test_weights_only_false_loads_a_trusted_checkpoint_end_to_end(cifar_dir: Path, trained: dict, tmp_path: Path, capsys) -> None:
    checkpoint = torch.load(trained["scratch"], weights_only=True)
    checkpoint["provenance"] = fractions.Fraction(1, 3)  # harmless, but not something weights_only loads
    path = tmp_path / "trusted.ckpt"
    torch.save(checkpoint, path)
    args = ["test", "--config", SCRATCH, *tiny_args(cifar_dir, tmp_path / "runs"), "--ckpt_path", str(path)]
    err = fails(capsys, *args)
    assert f"Refusing to load checkpoint '{path}'" in err and "fractions.Fraction" in err
    assert main([*args, "--weights_only", "false"]) is None
    assert "test/top1" in capsys.readouterr().out


# --- one run, one writer ------------------------------------------------------------------------------


def copy_run(trained: dict, tmp_path: Path) -> Path:
    """A copy of the trained scratch run's folder, as ``tmp_path/runs/scratch/version_0``."""
    run_dir = tmp_path / "runs" / "scratch" / "version_0"
    shutil.copytree(trained["scratch"].parent.parent, run_dir)
    return run_dir


def test_commands_with_a_resumed_runs_config_never_write_into_that_run(cifar_dir: Path, trained: dict, tmp_path: Path) -> None:
    run_dir = copy_run(trained, tmp_path)
    save_dir = ["--trainer.logger.init_args.save_dir", str(tmp_path / "runs")]
    main(["fit", "--config", str(run_dir / "config.yaml"), *save_dir, "--trainer.max_epochs", "2", "--ckpt_path", "last"])
    config = run_dir / "config.yaml"
    assert "version: version_0" in config.read_text(), "a resumed run's config pins its folder"
    before = hashes(run_dir)
    main(["test", "--config", str(config), *save_dir, "--ckpt_path", str(run_dir / "checkpoints" / "last.ckpt")])
    main(["fit", "--config", str(config), *save_dir, "--ckpt_path", "null"])  # a new run from the same recipe
    assert_intact(before)
    assert sorted(p.name for p in run_dir.parent.iterdir()) == ["version_0", "version_0-test", "version_1"]
    assert (run_dir.parent / "version_0-test" / "test_report.json").is_file()
    assert (run_dir.parent / "version_1" / "checkpoints" / "last.ckpt").is_file()


def is_locked(path: Path) -> bool:
    """Whether another process holds an ``flock`` on ``path``."""
    if not path.exists():
        return False
    with open(path) as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False


def test_a_second_process_cannot_write_into_a_run_being_written(cifar_dir: Path, trained: dict, tmp_path: Path, capsys) -> None:
    run_dir = copy_run(trained, tmp_path)
    args = ["fit", "--config", str(run_dir / "config.yaml"), "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
            "--trainer.max_epochs", "3", "--ckpt_path", "last"]  # fmt: skip
    pause = ["--trainer.callbacks+=faults.PauseAtStep", "--trainer.callbacks.fifo", str(pause_point(tmp_path))]
    first = CliProcess([*args, *pause], tmp_path, env_with_tests())
    try:
        # Paused at its first training step, long after it took the lock (in setup), until it is killed below.
        wait_until_paused(tmp_path / "pause.fifo", first, timeout=120)
        assert is_locked(run_dir / ".lock")
        err = fails(capsys, *args)
        assert f"Another cifar-resnet process is writing into '{run_dir}'" in err
    finally:
        first.kill()
        first.communicate(timeout=30)
    # The lock goes with its process, however it ended (here: SIGKILL).
    assert main([*args[:-2], "--trainer.max_epochs", "2", "--ckpt_path", "last"]) is None


# --- the file system saying no ------------------------------------------------------------------------


FULL_DISK = "    - class_path: faults.FullDiskCheckpointIO\n"
# The recipes' writer: the same atomic writes on a background thread, whose error must reach the user the same way.
FULL_DISK_IN_BACKGROUND = (
    "    - class_path: cifar_resnet.checkpointing.BackgroundCheckpointIO\n"
    "      init_args:\n        checkpoint_io:\n          class_path: faults.FullDiskCheckpointIO\n"
)


@pytest.mark.parametrize("plugin", [FULL_DISK, FULL_DISK_IN_BACKGROUND], ids=["foreground", "background"])
def test_a_full_disk_keeps_the_earlier_checkpoints_and_the_config(cifar_dir: Path, trained: dict, tmp_path: Path, capsys, plugin: str) -> None:
    run_dir = copy_run(trained, tmp_path)
    before = hashes(run_dir)
    (tmp_path / "full_disk.yaml").write_text("trainer:\n  plugins:\n" + plugin)
    err = fails(capsys, "fit", "--config", str(run_dir / "config.yaml"), "--config", str(tmp_path / "full_disk.yaml"),
                "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"), "--trainer.max_epochs", "2", "--ckpt_path", "last")  # fmt: skip
    assert f"Cannot write '{run_dir / 'checkpoints'}" in err and "the disk is full" in err and "free some space" in err
    assert_intact(before)  # the checkpoints and config.yaml of the run (the logs of the epoch it trained stay)
    assert not list(run_dir.rglob("*.tmp"))


def test_a_failed_resume_leaves_the_run_folder_as_it_was(cifar_dir: Path, trained: dict, tmp_path: Path, capsys) -> None:
    run_dir = copy_run(trained, tmp_path)
    (run_dir / "events.out.tfevents.0.host.1.0").write_bytes(b"the run's own log")
    before = hashes(run_dir)
    args = ["fit", "--config", str(run_dir / "config.yaml"), "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
            "--trainer.max_epochs", "2", "--ckpt_path", "last"]  # fmt: skip
    err = fails(capsys, *args, "--optimizer", "SGD", "--optimizer.lr", "0.1")
    assert "holds the state of Adam" in err
    assert hashes(run_dir) == before
    # The control: a resume that works writes into the same folder.
    main(args)
    after = hashes(run_dir)
    assert after[run_dir / "checkpoints" / "last.ckpt"] != before[run_dir / "checkpoints" / "last.ckpt"]
    events = [p for p in after if p.name.startswith("events.out")]
    assert len(events) == len([p for p in before if p.name.startswith("events.out")]) + 1


def test_ctrl_c_while_a_checkpoint_is_written_ends_like_any_ctrl_c(cifar_dir: Path, trained: dict, tmp_path: Path) -> None:
    run_dir = copy_run(trained, tmp_path)
    before = hashes(run_dir / "checkpoints")
    (tmp_path / "ctrl_c.yaml").write_text("trainer:\n  plugins:\n" + FULL_DISK + "      init_args:\n        interrupt: true\n")
    args = ["fit", "--config", str(run_dir / "config.yaml"), "--config", str(tmp_path / "ctrl_c.yaml"),
            "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"), "--trainer.max_epochs", "2", "--ckpt_path", "last"]  # fmt: skip
    result = CliProcess(args, tmp_path, env_with_tests()).finish(timeout=300)
    assert result.returncode == 130, result.stderr
    assert "Traceback" not in result.stderr and "unexpected pos" not in result.stderr
    last = run_dir / "checkpoints" / "last.ckpt"
    assert result.stderr.strip().splitlines()[-1].startswith(
        f"cifar-resnet: fit stopped by SIGINT in epoch 1, which starts again on resume. Resume from {last} with: cifar-resnet fit"
    )
    assert hashes(run_dir / "checkpoints") == before and not list(run_dir.rglob("*.tmp"))


def test_a_disk_that_fills_up_while_test_writes_its_report_leaves_no_empty_report(cifar_dir: Path, trained: dict, tmp_path: Path, capsys, monkeypatch) -> None:
    real_fsync = os.fsync

    def fsync(fd: int) -> None:  # the report's bytes reach the disk at fsync, and find it full
        if "test_report.json" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    err = fails(capsys, "test", "--config", SCRATCH, *tiny_args(cifar_dir, tmp_path / "runs"), "--ckpt_path", str(trained["scratch"]))
    assert re.search(r"Cannot write '.*/test_report\.json': the disk is full", err)
    assert not [p for p in (tmp_path / "runs").rglob("*") if "test_report" in p.name]


def test_unreadable_data_says_permission_denied(cifar_dir: Path, tmp_path: Path, capsys, monkeypatch) -> None:
    shutil.copytree(cifar_dir / FOLDER_NAME, tmp_path / "data" / FOLDER_NAME)
    denied = tmp_path / "data" / FOLDER_NAME / "train"
    real_open = io.open

    def open_as_another_user(file, *args, **kwargs):  # the tests run as root, whom chmod does not stop
        if str(file) == str(denied):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(io, "open", open_as_another_user)
    err = fails(capsys, "fit", "--config", SCRATCH, *tiny_args(tmp_path / "data", tmp_path / "runs"))
    assert f"Permission denied: '{denied}'" in err and "corrupt" not in err


def test_a_save_dir_that_is_a_file(cifar_dir: Path, tmp_path: Path, capsys) -> None:
    (tmp_path / "runs").write_text("not a folder")
    err = fails(capsys, "fit", "--config", SCRATCH, *tiny_args(cifar_dir, tmp_path / "runs" / "sub"))
    assert f"save_dir is '{tmp_path / 'runs' / 'sub'}', but '{tmp_path / 'runs'}' is a file" in err


def test_checkpoints_are_created_as_the_umask_says(trained: dict, tmp_path: Path) -> None:
    run_dir = trained["scratch"].parent.parent
    assert stat.S_IMODE(trained["scratch"].stat().st_mode) == stat.S_IMODE((run_dir / "hparams.yaml").stat().st_mode)
    for umask, mode in ((0o022, 0o644), (0o077, 0o600), (0o002, 0o664)):
        old = os.umask(umask)
        try:
            atomic_save({"state_dict": {}}, tmp_path / "a.ckpt")
        finally:
            os.umask(old)
        assert stat.S_IMODE((tmp_path / "a.ckpt").stat().st_mode) == mode


# --- a config is code ---------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_config_cannot_import_modules_from_the_working_folder(cifar_dir: Path, tmp_path: Path) -> None:
    (tmp_path / "evil.py").write_text(
        "from pathlib import Path\nPath('pwned').write_text('code ran')\n"
        "from lightning.pytorch import Callback\nclass Evil(Callback):\n    pass\n"
    )
    args = [sys.executable, "-m", "cifar_resnet", "validate", "--config", SCRATCH, *tiny_args(cifar_dir, tmp_path / "runs"),
            "--trainer.callbacks+=evil.Evil"]  # fmt: skip
    proc = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "evil.Evil" in proc.stderr, proc.stderr[-3000:]
    assert not (tmp_path / "pwned").exists()
    # Asked for with PYTHONPATH, the working folder is searched: the module above really runs code.
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [".", os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run(args, cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "pwned").read_text() == "code ran"


def test_the_error_handler_names_file_system_errors_however_they_come(tmp_path: Path) -> None:
    """TensorBoard gives file names as bytes; a file object's write fails with no file name; libraries wrap the
    OSError in their own errors. None of it may crash the handler or hide the reason."""
    read_only = OSError(errno.EROFS, "Read-only file system", os.fsencode(tmp_path / "runs" / "events.out"))
    assert _user_message(read_only).startswith(f"Cannot write '{tmp_path / 'runs' / 'events.out'}': the file system is read-only")
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")  # from f.write: no file name
        except OSError as full:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598") from full
    except RuntimeError as wrapped:
        assert _user_message(wrapped).startswith("A write failed: the disk is full. The files written before it")
    denied = PermissionError(errno.EACCES, "Permission denied", b"/runs/\xff")
    assert _user_message(denied).startswith("Permission denied: '/runs/\udcff'")
    assert _user_message(OSError(errno.EPERM, "Operation not permitted")) is None  # os.kill and the like: not a user's file


def test_a_lock_file_that_is_a_pipe_or_a_link_is_named_never_waited_on(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "link").symlink_to(tmp_path / "elsewhere")
    for name, kind in (("fifo", r"a pipe \(FIFO\)"), ("link", "a link")):
        with pytest.raises(UserError, match=rf"^Cannot lock the run folder: '{tmp_path / name}' is {kind}, where this program keeps an empty lock file"):
            open_lock_file(tmp_path / name)  # a FIFO with no reader: opening it to write would wait forever
    assert not (tmp_path / "elsewhere").exists() and stat.S_ISFIFO(os.stat(tmp_path / "fifo").st_mode)
    with open_lock_file(tmp_path / ".lock") as lock:  # the control
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    assert (tmp_path / ".lock").read_bytes() == b""


@pytest.mark.parametrize("pythonpath", [":/opt/x", "/opt/x:", "/opt/x::/opt/y"])
def test_an_empty_pythonpath_entry_does_not_make_the_working_folder_importable(tmp_path: Path, monkeypatch, pythonpath: str) -> None:
    # Python turns an empty PYTHONPATH entry into the working folder; the installed script's own folder comes first.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PYTHONPATH", pythonpath)
    monkeypatch.setattr(sys, "path", [str(Path(sys.executable).parent), str(tmp_path), "/opt/x", *sys.path])
    _drop_working_folder_from_path()
    assert str(tmp_path) not in sys.path and "" not in sys.path and "/opt/x" in sys.path
    # Asked for by name, it stays.
    monkeypatch.setenv("PYTHONPATH", f".:{pythonpath}")
    monkeypatch.setattr(sys, "path", [str(Path(sys.executable).parent), str(tmp_path), *sys.path])
    _drop_working_folder_from_path()
    assert str(tmp_path) in sys.path


@pytest.mark.slow
def test_ctrl_c_while_starting_is_one_line_and_exit_130(tmp_path: Path) -> None:
    """A real new process (the forked ones have imported everything): SIGINT once it is importing torch, again
    until it ends, so that it lands during the imports whatever the machine's speed."""
    args = [sys.executable, "-m", "cifar_resnet", "fit", "--config", SCRATCH, "--data.data_dir", str(tmp_path / "none")]
    proc = subprocess.Popen(args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    maps = Path(f"/proc/{proc.pid}/maps")
    try:
        # The process has loaded torch's library: it is in `import torch`, seconds before any command runs.
        while proc.poll() is None and "libtorch" not in maps.read_text(errors="replace"):
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(0.01)
        while proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(0.2)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr
    assert "stopped by SIGINT" in stderr and len(stderr.strip().splitlines()) == 1, stderr


@pytest.mark.slow
def test_sigterm_at_the_end_of_the_last_epoch_says_nothing_is_left(cifar_dir: Path, tmp_path: Path) -> None:
    proc = run_cli("fit", "--config", SCRATCH, *tiny_args(cifar_dir, tmp_path / "runs"), "--trainer.callbacks+=faults.SigtermAfterLastEpoch",
                   cwd=tmp_path, env=env_with_tests(), expect_ok=False)  # fmt: skip
    last = tmp_path / "runs" / "scratch" / "version_0" / "checkpoints" / "last.ckpt"
    assert proc.returncode == 128 + signal.SIGTERM and last.is_file()
    assert f"fit stopped by SIGTERM after its last epoch: the run finished training; its newest checkpoint is {last}." in proc.stderr
    assert "starts again on resume" not in proc.stderr and "Traceback" not in proc.stderr


class StandInTrainer:
    """What :func:`_finished_training` reads of a Trainer."""

    def __init__(self, current_epoch: int, global_step: int, max_epochs: int | None = 2, max_steps: int = -1) -> None:
        self.current_epoch, self.global_step, self.max_epochs, self.max_steps = current_epoch, global_step, max_epochs, max_steps
        self.state = types.SimpleNamespace(fn="fit")


def test_sigterm_after_the_last_epoch_says_the_run_finished(tmp_path: Path) -> None:
    assert _finished_training(StandInTrainer(current_epoch=2, global_step=20))
    assert _finished_training(StandInTrainer(current_epoch=1, global_step=10, max_epochs=-1, max_steps=10))
    assert not _finished_training(StandInTrainer(current_epoch=1, global_step=10))
    assert not _finished_training(StandInTrainer(current_epoch=1, global_step=10, max_epochs=-1, max_steps=-1))
    last = tmp_path / "last.ckpt"
    finished = Interrupted(signal.SIGTERM, "fit", 2, last, finished=True).message(["fit", "--config", "x.yaml"])
    assert finished == f"cifar-resnet: fit stopped by SIGTERM after its last epoch: the run finished training; its newest checkpoint is {last}. Nothing is left to resume."
    stopped = Interrupted(signal.SIGTERM, "fit", 1, last).message(["fit", "--config", "x.yaml"])
    assert "in epoch 1, which starts again on resume" in stopped and "--ckpt_path" in stopped

