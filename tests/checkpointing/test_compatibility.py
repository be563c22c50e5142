"""A checkpoint whose parts have shapes no checkpoint of this program has (damaged, edited or crafted, but
still only tensors and plain values) is refused with one sentence naming the part, not a traceback."""

from __future__ import annotations

import copy
import functools
import gzip
import math
import re
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

from cifar_resnet import ScratchResNet
from cifar_resnet.checkpointing import SCHEMA_KEY, check_checkpoint_fits, check_optimizer_fits, read_checkpoint
from cifar_resnet.classifier import parameter_groups
from cifar_resnet.cli import main
from cifar_resnet.errors import UserError
from conftest import OLD_RUN_FIXTURE, tiny_args, unpack_old_run, without_figures

OLD = OLD_RUN_FIXTURE / "last.ckpt.gz"


def setitem(key: str, value: Any) -> Callable[[dict], None]:
    return lambda checkpoint: checkpoint.__setitem__(key, value)


def data_part(change: Callable[[dict], None]) -> Callable[[dict], None]:
    """Changes the DataModule's part of a checkpoint (class names and input settings) with ``change``."""
    return lambda checkpoint: change(checkpoint["CIFAR100DataModule"])


def input_setting(key: str, value: Any) -> Callable[[dict], None]:
    return data_part(lambda data: data["transform"].__setitem__(key, value))


def callback_state(key: str, value: Any) -> Callable[[dict], None]:
    return lambda checkpoint: checkpoint["callbacks"].__setitem__(key, value)


DAMAGE: dict[str, tuple[Callable[[dict], None], str]] = {
    "hyper_parameters a list": (setitem("hyper_parameters", [1, 2]), "its 'hyper_parameters' is a list"),
    "schema stamp a string": (setitem(SCHEMA_KEY, "v1"), f"its '{SCHEMA_KEY}' is a str"),
    "schema version a string": (setitem(SCHEMA_KEY, {"schema": "2"}), "its schema version is a str"),
    "epoch a float": (setitem("epoch", 3.5), "its 'epoch' is a float"),
    "global_step a bool": (setitem("global_step", True), "its 'global_step' is a bool"),
    "optimizer_states a dict": (setitem("optimizer_states", {}), "its 'optimizer_states' is a dict"),
    "callbacks a list": (setitem("callbacks", []), "its 'callbacks' is a list"),
    "loops a string": (setitem("loops", "x"), "its 'loops' is a str"),
    "a weight that is a number": (lambda c: c["state_dict"].__setitem__("model.fc.bias", 0.5), "values that are not tensors"),
    "an EMA state that is a number": (lambda c: c["averaging_state"].__setitem__("n_averaged", 2), "its 'averaging_state' holds values that are not tensors"),
    "trained weights that are text": (lambda c: c["current_model_state"].__setitem__("net.fc.bias", "x"), "its 'current_model_state' holds values that are not tensors"),
    "a weight named by a number": (lambda c: c["state_dict"].__setitem__(7, torch.ones(1)), "'state_dict' has keys that are not names"),
    "a setting named by a number": (lambda c: c["hyper_parameters"].__setitem__(3, 1), "'hyper_parameters' has keys that are not names"),
    # The settings a checkpoint carries for predict pass the config's own checks, and names are names.
    "output_size 100000": (input_setting("output_size", 100000), "its input settings are out of range (output_size must be at most 1024"),
    "output_size a string": (input_setting("output_size", "32"), "(output_size must be a positive integer, got '32')"),
    "std 0": (input_setting("std", [0.0, 0.25, 0.25]), "(std must be 3 finite numbers greater than 0"),
    "mean NaN": (input_setting("mean", [math.nan, 0.5, 0.5]), "(mean must be 3 finite numbers (one per channel R, G, B), got [nan, 0.5, 0.5])"),
    "two means": (input_setting("mean", [0.5, 0.5]), "(mean must be 3 finite numbers"),
    "an unknown input setting": (input_setting("crop", 3), "its input settings are not mean, std, output_size"),
    "a class name of 10 MB": (data_part(lambda d: d["class_names"].__setitem__(0, "x" * 10**7)), "its class_names must be names of at most 200 characters"),
    "3 class names": (data_part(lambda d: d.__setitem__("class_names", ["a", "b", "c"])), "its class_names must be a list of 100 names, found 3 items"),
    "superclass names that are numbers": (data_part(lambda d: d.__setitem__("superclass_names", list(range(20)))), "its superclass_names must be names"),
    "a superclass 20": (data_part(lambda d: d["fine_to_coarse"].__setitem__(5, 20)), "its fine_to_coarse is not 100 superclass indices in [0, 19]"),
    "a superclass -2": (data_part(lambda d: d["fine_to_coarse"].__setitem__(5, -2)), "its fine_to_coarse is not 100 superclass indices"),
    "data settings a list": (lambda c: c.__setitem__("CIFAR100DataModule", []), "its data settings are a list"),
    "a random state of floats": (callback_state("RandomStates", {"cpu": torch.zeros(5056)}), "its random generator state ('cpu') is not a generator state"),
    "a short random state": (callback_state("RandomStates", {"cpu": torch.zeros(3, dtype=torch.uint8)}), "('cpu') has 3 bytes, not 5056"),
    "random states a list": (callback_state("RandomStates", [1]), "its random generator states are not a CPU and a CUDA state"),
    "Lightning version not a version": (setitem("pytorch-lightning_version", "two"), "its 'pytorch-lightning_version' ('two') is not a version number"),
    "Lightning version a number": (setitem("pytorch-lightning_version", 2.6), "its 'pytorch-lightning_version' (2.6) is not a version number"),
    "a parameter listed twice": (lambda c: c["optimizer_states"][0]["param_groups"][0]["params"].__setitem__(1, 0), "number their parameters other than once each"),
    "state of an unlisted parameter": (lambda c: c["optimizer_states"][0]["state"].__setitem__(999, {}), "hold state of parameters they do not list"),
    "a parameter state of text": (lambda c: c["optimizer_states"][0]["state"].__setitem__(0, {"step": "x"}), "a parameter state that is not named tensors and numbers"),
    "a scheduler state without its step": (setitem("lr_schedulers", [{"bogus": 1}]), "its 'lr_schedulers' state 0 is not the state of a learning-rate scheduler"),
    "a scheduler's base rates of text": (lambda c: c["lr_schedulers"][0].__setitem__("base_lrs", ["0.1"]), "its 'lr_schedulers' state 0 is not the state"),
    "a setting of 10 MB": (lambda c: c["hyper_parameters"].__setitem__("label_smoothing", "x" * 10**7), "its 'hyper_parameters' holds a text of 10,000,000 characters (at most 4,096)"),
    "a setting nested deep": (lambda c: c["datamodule_hyper_parameters"].__setitem__("mean", functools.reduce(lambda x, _: [x], range(40), 0)), "its 'datamodule_hyper_parameters' is nested more than 16 deep"),
}


def resume_from_damaged(cifar_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture, change: Callable[[dict], None]) -> tuple[bytes, bytes, str]:
    """Resume the old run after ``change`` to its checkpoint; expect the one-paragraph error, exit code 2; return the
    checkpoint's bytes before and after the command, and the message."""
    last = unpack_old_run(tmp_path)
    damaged = torch.load(last, weights_only=True)
    change(damaged)
    torch.save(damaged, last)
    before = last.read_bytes()
    args = ["--config", str(last.parent.parent / "config.yaml"), *tiny_args(cifar_dir, tmp_path / "runs"), "--trainer.max_epochs", "2"]
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *args, "--ckpt_path", "last"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    return before, last.read_bytes(), err


@pytest.fixture(scope="module")
def checkpoint() -> dict:
    with gzip.open(OLD) as packed:
        return torch.load(packed, weights_only=True)


def test_a_checkpoint_of_this_program_is_read(checkpoint: dict, tmp_path: Path) -> None:
    torch.save(checkpoint, tmp_path / "good.ckpt")
    assert read_checkpoint(tmp_path / "good.ckpt").keys() == checkpoint.keys()  # the control


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_part_of_the_wrong_shape_is_named(checkpoint: dict, tmp_path: Path, damage: str) -> None:
    damaged, path = copy.deepcopy(checkpoint), tmp_path / "damaged.ckpt"
    change, expected = DAMAGE[damage]
    change(damaged)
    torch.save(damaged, path)
    with pytest.raises(UserError) as err:
        read_checkpoint(path)
    assert f"'{path}' is damaged or was not written by this program: " in str(err.value) and expected in str(err.value)


@pytest.mark.slow  # a command run in-process, up to its refusal
def test_the_command_names_it_too(checkpoint: dict, cifar_dir: Path, tmp_path: Path, capsys) -> None:
    damaged = copy.deepcopy(checkpoint)
    damaged["hyper_parameters"] = "fast"
    torch.save(damaged, tmp_path / "damaged.ckpt")
    args = ["--config", without_figures("fast.yaml"), *tiny_args(cifar_dir, tmp_path / "runs"), "--ckpt_path", str(tmp_path / "damaged.ckpt")]
    for subcommand in ("fit", "test"):
        with pytest.raises(SystemExit) as exit_info:
            main([subcommand, *args])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and "its 'hyper_parameters' is a str" in err and "Traceback" not in err


def test_resuming_needs_the_optimizer_and_groups_the_checkpoint_was_trained_with(checkpoint: dict) -> None:
    assert [len(g["params"]) for g in checkpoint["optimizer_states"][0]["param_groups"]] == [32, 58]
    check_optimizer_fits(checkpoint, "AdamW", [32, 58])  # the control: the run's own optimizer
    with pytest.raises(UserError, match=r"holds the state of AdamW over 2 parameter groups \(32 \+ 58 parameters\), but the "
                                        r"config asks for SGD over 2 parameter groups"):  # fmt: skip
        check_optimizer_fits(checkpoint, "SGD", [32, 58])
    with pytest.raises(UserError, match=r"but the config asks for AdamW over 1 parameter group \(90 parameters\)"):
        check_optimizer_fits(checkpoint, "AdamW", [90])
    check_optimizer_fits({**checkpoint, "optimizer_states": []}, "SGD", [90])  # weights only: nothing to resume


@pytest.mark.parametrize(
    "change",
    [["--model.init_args.optimizer", "torch.optim.SGD", "--model.init_args.optimizer.init_args.lr", "0.1"],
     ["--optimizer", "torch.optim.SGD", "--optimizer.lr", "0.1"],
     ["--model.init_args.weight_decay_norm_and_bias", "true"]],
    ids=["model-optimizer", "top-level-optimizer", "parameter-groups"],
)  # fmt: skip
def test_a_resume_with_another_optimizer_stops_before_it_changes_anything(
    cifar_dir: Path, tmp_path: Path, capsys, change: list[str]
) -> None:
    last = unpack_old_run(tmp_path)
    run_dir = last.parent.parent
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    args = ["--config", str(run_dir / "config.yaml"), *tiny_args(cifar_dir, tmp_path / "runs"), "--trainer.max_epochs", "2"]
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *args, "--ckpt_path", "last", *change])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert f"The checkpoint '{last}' holds the state of AdamW over 2 parameter groups" in err and "resume with the run's config" in err
    assert {p: p.read_bytes() for p in before} == before, "the run's files are as they were"
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.ckpt"]


@pytest.mark.slow  # a command run in-process, up to its refusal
@pytest.mark.parametrize(
    "part, value, expected",
    [("RandomStates", {"cpu": torch.zeros(5056, dtype=torch.uint8)}, "its random generator state ('cpu') cannot be restored"),
     ("SpeedMonitor", {"elapsed_s": "soon"}, "its fit time (SpeedMonitor's elapsed_s) is 'soon', not a number of seconds"),
     ("EMAWeights", {"latest_update_step": "x"}, "its EMA state (EMAWeights' latest_update_step) is 'x', not a step number")],
    ids=["rng-state", "fit-time", "ema-state"],
)  # fmt: skip
def test_a_callback_state_that_cannot_be_restored_is_named(
    cifar_dir: Path, tmp_path: Path, capsys, part: str, value: dict, expected: str
) -> None:
    before, after, err = resume_from_damaged(cifar_dir, tmp_path, capsys, lambda damaged: damaged["callbacks"].__setitem__(part, value))
    assert "The checkpoint being loaded is damaged or was not written by this program: " + expected in err
    assert after == before


@pytest.mark.slow  # a command run in-process, up to its refusal
@pytest.mark.parametrize("subcommand", ["fit", "test", "predict"])
def test_every_command_refuses_settings_it_would_believe(checkpoint: dict, cifar_dir: Path, tmp_path: Path, capsys, subcommand: str) -> None:
    damaged = copy.deepcopy(checkpoint)
    damaged["CIFAR100DataModule"]["transform"]["output_size"] = 100000  # was a 12 TB allocation in each command
    path = tmp_path / "damaged.ckpt"
    torch.save(damaged, path)
    args = ["--config", without_figures("fast.yaml"), *tiny_args(cifar_dir, tmp_path / "runs"), "--ckpt_path", str(path)]
    with pytest.raises(SystemExit) as exit_info:
        main([subcommand, *args, "--prediction.output", str(tmp_path / "p.csv")] if subcommand == "predict" else [subcommand, *args])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert f"'{path}' is damaged or was not written by this program: its input settings are out of range (output_size must be at most 1024" in err
    assert not (tmp_path / "p.csv").exists()


def test_an_optimizer_state_of_another_shape_than_its_parameter_is_named(checkpoint: dict) -> None:
    groups = parameter_groups(ScratchResNet(dropout=0.3), decay_norm_and_bias=False)
    shapes = [p.shape for group in groups for p in group["params"]]
    check_optimizer_fits(checkpoint, "AdamW", [32, 58], shapes=shapes)  # the control
    damaged = copy.deepcopy(checkpoint)
    first = damaged["optimizer_states"][0]["param_groups"][0]["params"][0]
    damaged["optimizer_states"][0]["state"][first]["exp_avg"] = torch.zeros(3)
    with pytest.raises(UserError, match=rf"its optimizer state \('exp_avg' of parameter 0\) has shape \(3,\), but the parameter has shape {re.escape(str(tuple(shapes[0])))}"):
        check_optimizer_fits(damaged, "AdamW", [32, 58], shapes=shapes)


def test_the_trained_weights_beside_the_average_must_fit_too(checkpoint: dict) -> None:
    model = ScratchResNet(dropout=0.3)
    check_checkpoint_fits(model, copy.deepcopy(checkpoint))  # the control
    damaged = copy.deepcopy(checkpoint)
    damaged["current_model_state"]["net.fc.weight"] = torch.zeros(10, 3)  # what a resume loads into the model
    with pytest.raises(UserError, match=r"holds the weights of ScratchResNet, which do not fit ScratchResNet \(wrong shape: net\.fc\.weight\)"):
        check_checkpoint_fits(model, damaged)


@pytest.mark.slow  # a command run in-process, up to its refusal
@pytest.mark.parametrize(
    "change, expected",
    [(lambda loops: loops.__setitem__("fit_loop", 5), "('loops.fit_loop') is of type int, not a mapping"),
     (lambda loops: loops["fit_loop"].pop("epoch_progress"), "lacks 'loops.fit_loop.epoch_progress'"),
     (lambda loops: loops["fit_loop"]["epoch_progress"]["total"].__setitem__("completed", "2"), "('loops.fit_loop.epoch_progress.total.completed') is of type str, not a whole number")],
    ids=["a-number", "a-part-missing", "a-counter-of-text"],
)  # fmt: skip
def test_a_training_loop_state_of_another_form_is_named_on_resume(
    cifar_dir: Path, tmp_path: Path, capsys, change: Callable[[dict], None], expected: str
) -> None:
    *_, err = resume_from_damaged(cifar_dir, tmp_path, capsys, lambda damaged: change(damaged["loops"]))
    assert "The checkpoint being loaded is damaged or was not written by this program: its training-loop state " + expected in err
