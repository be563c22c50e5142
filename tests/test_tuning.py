"""Lightning users' flags for the optimizer and their tuners work, and the run records what trained."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from cifar_resnet.cli import main
from conftest import tiny_args, without_figures

FAST = without_figures("fast.yaml")
# fast.yaml on a CPU: no compile, the data in host memory.
CPU = ["--model.init_args.compile", "false", "--data.data_on_device", "false", "--trainer.precision", "32-true"]


def hparams_tab(run_dir: Path) -> dict[str, object]:
    """The hyper-parameters of the run's row in TensorBoard's HPARAMS tab (its session-start record)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    (events,) = run_dir.glob("events.out.tfevents.*")
    accumulator = EventAccumulator(str(events))
    accumulator.Reload()
    start = HParamsPluginData.FromString(accumulator.PluginTagToContent("hparams")["_hparams_/session_start_info"])
    values = start.session_start_info.hparams
    return {name: values[name].WhichOneof("kind") and getattr(values[name], values[name].WhichOneof("kind")) for name in values}


def recorded(run_dir: Path) -> tuple[dict, dict, dict]:
    """The run's config.yaml, hparams.yaml and last checkpoint."""
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    hparams = yaml.safe_load((run_dir / "hparams.yaml").read_text())
    checkpoint = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    return config, hparams, checkpoint


def test_top_level_optimizer_flags_set_the_models_optimizer_and_are_recorded(cifar_dir: Path, tmp_path: Path) -> None:
    main(["fit", "--config", FAST, *tiny_args(cifar_dir, tmp_path / "runs"), *CPU,
          "--optimizer", "torch.optim.AdamW", "--optimizer.lr", "0.01"])  # fmt: skip
    run_dir = tmp_path / "runs" / "fast" / "version_0"
    config, hparams, checkpoint = recorded(run_dir)
    assert config["optimizer"] is None and config["model"]["init_args"]["optimizer"]["class_path"] == "torch.optim.AdamW"
    assert config["model"]["init_args"]["optimizer"]["init_args"]["lr"] == 0.01
    assert hparams["optimizer"]["class_path"] == "torch.optim.AdamW" and hparams["optimizer"]["init_args"]["lr"] == 0.01
    tab = hparams_tab(run_dir)
    assert tab["optimizer/class_path"] == "torch.optim.AdamW" and tab["optimizer/init_args/lr"] == pytest.approx(0.01)
    # The tab leads with what people compare, and leaves out switches nobody set.
    assert tab["recipe"] == "fast" and tab["max_epochs"] == 1 and tab["batch_size"] == 50
    assert not {"optimizer/init_args/foreach", "optimizer/init_args/capturable", "optimizer/init_args/fused"} & tab.keys()
    assert "capturable" in hparams["optimizer"]["init_args"], "hparams.yaml keeps every setting"
    # What trained: AdamW, with the recipe's two weight-decay groups and its per-step schedule from lr 0.01.
    (state,) = checkpoint["optimizer_states"]
    assert [g["name"] for g in state["param_groups"]] == ["decay", "no_decay"] and "exp_avg" in next(iter(state["state"].values()))
    (schedule,) = checkpoint["lr_schedulers"]
    assert schedule["base_lrs"] == [0.01, 0.01] and schedule["decay"] == "linear"


@pytest.mark.heavy
def test_lr_and_batch_size_finders_train_with_and_record_what_they_chose(cifar_dir: Path, tmp_path: Path, monkeypatch, caplog) -> None:
    monkeypatch.chdir(tmp_path)  # where Lightning's tuners keep their temporary checkpoints
    main(["fit", "--config", FAST, *tiny_args(cifar_dir, tmp_path / "runs"), *CPU, "--data.batch_size", "10",
          "--trainer.limit_train_batches", "14",
          "--trainer.callbacks+=lightning.pytorch.callbacks.BatchSizeFinder", "--trainer.callbacks.init_val", "2",
          "--trainer.callbacks.max_trials", "1", "--trainer.callbacks.steps_per_trial", "1",
          "--trainer.callbacks+=lightning.pytorch.callbacks.LearningRateFinder", "--trainer.callbacks.num_training_steps", "13",
          "--trainer.callbacks.max_lr", "0.1", "--trainer.callbacks.early_stop_threshold", "null"])  # fmt: skip
    run_dir = tmp_path / "runs" / "fast" / "version_0"
    config, hparams, checkpoint = recorded(run_dir)
    lr = hparams["optimizer"]["init_args"]["lr"]
    assert lr != 0.2 and f"Learning rate set to {lr}" in caplog.text
    # The run trained with it: the per-step schedule was rebuilt for it, not left at the recipe's 0.2.
    assert checkpoint["lr_schedulers"][0]["base_lrs"] == [lr, lr]
    assert config["model"]["init_args"]["optimizer"]["init_args"]["lr"] == lr == checkpoint["hyper_parameters"]["optimizer"]["init_args"]["lr"]
    assert hparams_tab(run_dir)["optimizer/init_args/lr"] == pytest.approx(lr)
    assert hparams["batch_size"] == config["data"]["batch_size"] == checkpoint["datamodule_hyper_parameters"]["batch_size"] == 2
    assert hparams_tab(run_dir)["batch_size"] == 2
    # config.yaml is what trained: resuming with it trains on with these values instead of tuning again.
    assert not any("Finder" in c["class_path"] for c in config["trainer"]["callbacks"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"], "the tuners' temporary checkpoints are gone"
