"""A checkpoint written by an older version of the program still tests, validates, predicts, exports and
resumes (tests/fixtures/checkpoint-f2a034b/README.md says how it was written)."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import pytest
import torch

import cifar_resnet
from cifar_resnet import CIFAR100DataModule, FineTunedResNet18, ScratchResNet
from cifar_resnet.checkpointing import SCHEMA_KEY, SCHEMA_VERSION, check_checkpoint_fits, network_settings, setting_defaults
from cifar_resnet.cli import main
from cifar_resnet.errors import UserError
from cli_process import CliProcess
from conftest import OLD_RUN_FIXTURE as FIXTURE, tiny_args, unpack_old_run

@pytest.fixture(scope="module")
def old_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The old checkpoint, unpacked once (tests copy it before writing beside it)."""
    return unpack_old_run(tmp_path_factory.mktemp("old"))


def old_args(cifar_dir: Path, runs: Path) -> list[str]:
    """The old run's own config, shrunk to a few batches, logging into ``runs``."""
    return ["--config", str(FIXTURE / "config.yaml"), *tiny_args(cifar_dir, runs)]


@pytest.mark.parametrize("subcommand", ["test", "validate"])
def test_an_old_checkpoint_still_evaluates(cifar_dir: Path, old_run: Path, tmp_path: Path, capsys, subcommand: str) -> None:
    main([subcommand, *old_args(cifar_dir, tmp_path / "runs"), "--ckpt_path", str(old_run)])
    out = capsys.readouterr().out
    stage = "test" if subcommand == "test" else "val"
    assert f"{stage}/top1" in out and f"{stage}/top1_tta" in out


def test_an_old_checkpoint_still_predicts(cifar_dir: Path, old_run: Path, tmp_path: Path) -> None:
    output = tmp_path / "predictions.csv"
    main(["predict", *old_args(cifar_dir, tmp_path / "runs"), "--ckpt_path", str(old_run), "--prediction.output", str(output),
          "--trainer.limit_predict_batches", "2"])  # fmt: skip
    with open(output, newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 200 and all(0.0 <= float(row["prob_1"]) <= 1.0 for row in rows)


def export_command(*args: str) -> None:
    """What ``cifar-resnet-export`` runs."""
    from cifar_resnet.export import main as export_main

    export_main(list(args))


@pytest.mark.slow
def test_an_old_checkpoint_still_exports(old_run: Path, tmp_path: Path) -> None:
    output = tmp_path / "model.onnx"
    proc = CliProcess([str(old_run), str(output)], tmp_path, target=export_command).finish(timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(Path(f"{output}.json").read_text())
    assert output.stat().st_size > 1_000_000 and len(info["class_names"]) == 100


@pytest.mark.slow
def test_an_old_checkpoint_still_resumes_in_its_own_folder(cifar_dir: Path, tmp_path: Path) -> None:
    last = unpack_old_run(tmp_path)
    run_dir = last.parent.parent
    args = ["--config", str(run_dir / "config.yaml"), *tiny_args(cifar_dir, tmp_path / "runs"), "--trainer.max_epochs", "2"]
    main(["fit", *args, "--ckpt_path", "last"])
    resumed = torch.load(last, map_location="cpu", weights_only=True)
    assert (resumed["epoch"], resumed["global_step"]) == (1, 4), "one more epoch of 2 steps after the old one"
    assert resumed["callbacks"]["EMAWeights"]["latest_update_step"] == 4
    assert not (tmp_path / "runs" / "fast" / "version_1").exists()


# --- what may differ between the program that wrote a checkpoint and the one that loads it --------------


def old_checkpoint(old_run: Path, **hparams) -> dict:
    """The old checkpoint as a dict, with ``hparams`` changed in its hyper-parameters."""
    checkpoint = torch.load(old_run, map_location="cpu", weights_only=True)
    checkpoint["hyper_parameters"].update(hparams)
    return checkpoint


def fast_model(cls: type = ScratchResNet, **settings) -> ScratchResNet:
    """``cls`` with the settings of the old run's config (its network settings included)."""
    return cls(**{"dropout": 0.3, "label_smoothing": 0.1, "weight_decay_norm_and_bias": False, "tta": True, **settings})


def test_only_network_settings_refuse_and_both_values_are_named(old_run: Path) -> None:
    check_checkpoint_fits(fast_model(compile=True, channels_last=True, tta=False, label_smoothing=0.0), old_checkpoint(old_run))
    with pytest.raises(UserError, match=r"trained with dropout=0.3, but the config says dropout=0.5"):
        check_checkpoint_fits(fast_model(dropout=0.5), old_checkpoint(old_run), "old.ckpt")
    with pytest.raises(UserError, match=r"trained with num_classes=10, but the config says num_classes=100"):
        check_checkpoint_fits(fast_model(), old_checkpoint(old_run, num_classes=10))
    with pytest.raises(UserError, match=r"holds a FineTunedResNet18, but the config asks for a ScratchResNet"):
        check_checkpoint_fits(fast_model(), old_checkpoint(old_run, _class_path="cifar_resnet.FineTunedResNet18"))


def test_the_network_settings_come_from_the_classes() -> None:
    assert network_settings(ScratchResNet) == {"num_classes", "dropout"}
    assert network_settings(FineTunedResNet18) == {"num_classes"}
    assert {"tta", "compile", "optimizer", "weights_path"} <= setting_defaults(FineTunedResNet18).keys()
    assert setting_defaults(ScratchResNet)["dropout"] == 0.3 and setting_defaults(ScratchResNet)["num_classes"] == 100

    class Misdeclared(ScratchResNet):
        network_settings = frozenset({"width"})

    with pytest.raises(TypeError, match="names width, which its constructor does not take"):
        network_settings(Misdeclared)


def newer_program(network: bool):
    """A ScratchResNet of a newer program: one more constructor setting with a default, a network setting or not."""

    class ScratchResNet(cifar_resnet.ScratchResNet):  # the same class name, as in a newer version of the program
        network_settings = frozenset({"width"} if network else ())

        def __init__(self, width: int = 1, **kwargs) -> None:
            super().__init__(**kwargs)

    return ScratchResNet


# A plain Trainer without the recipe's callbacks (whose state the checkpoint holds), on purpose.
@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
@pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated")
def test_a_setting_the_checkpoint_predates_takes_its_default_with_one_line(cifar_dir: Path, old_run: Path, tmp_path: Path, caplog) -> None:
    from lightning.pytorch import Trainer

    newer = newer_program(network=False)
    model = fast_model(newer, width=2)  # not a network setting: may differ
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, default_root_dir=tmp_path, limit_val_batches=1)
    with caplog.at_level(logging.INFO):
        trainer.validate(model, CIFAR100DataModule(str(cifar_dir), val_size=100, eval_batch_size=50), ckpt_path=old_run)
    lines = [r.getMessage() for r in caplog.records if "predates" in r.getMessage()]
    # width, and whatever settings the program gained since f2a034b (cuda_graph, ...), each with its default.
    defaults = setting_defaults(newer)
    missing = sorted(defaults.keys() - old_checkpoint(old_run)["hyper_parameters"].keys())
    assert "width" in missing
    assert lines == [
        f"The checkpoint '{old_run}' predates the settings {', '.join(missing)} (checkpoint schema 0, this program's "
        f"{SCHEMA_VERSION}); it was trained as their defaults say: {', '.join(f'{k}={defaults[k]!r}' for k in missing)}."
    ]
    assert not list(tmp_path.iterdir()), "validate without a logger writes nothing"


def test_a_network_setting_the_checkpoint_predates_must_be_its_default(old_run: Path) -> None:
    checkpoint = old_checkpoint(old_run)
    check_checkpoint_fits(fast_model(newer_program(network=True), width=1), checkpoint)
    assert checkpoint["hyper_parameters"]["width"] == 1, "filled in, for whoever reads the checkpoint next"
    with pytest.raises(UserError, match=r"trained with width=1 \(the default of width: it predates the setting\), but the config says width=2"):
        check_checkpoint_fits(fast_model(newer_program(network=True), width=2), old_checkpoint(old_run))


def test_new_checkpoints_carry_the_schema_and_a_newer_one_is_refused(old_run: Path, tmp_path: Path) -> None:
    checkpoint = old_checkpoint(old_run)
    assert SCHEMA_KEY not in checkpoint, "the fixture predates the schema"
    fast_model().on_save_checkpoint(checkpoint)
    assert checkpoint[SCHEMA_KEY] == {"schema": SCHEMA_VERSION, "program_version": cifar_resnet.__version__}
    checkpoint[SCHEMA_KEY]["schema"] = SCHEMA_VERSION + 1
    with pytest.raises(UserError, match=rf"written by a newer cifar-resnet .*schema {SCHEMA_VERSION + 1}; this one reads up to {SCHEMA_VERSION}\)"):
        check_checkpoint_fits(fast_model(), checkpoint)
