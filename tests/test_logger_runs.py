"""MLflow and W&B: the program's run folder holds the checkpoints, and a killed run resumed with ``--ckpt_path
last`` goes on logging into the same MLflow run / W&B run, with what it logged before the kill kept."""

from __future__ import annotations

import json
import signal
import struct
from pathlib import Path
from typing import Iterator

import pytest
import torch
from jsonargparse import Namespace

from cifar_resnet.cli import main
from cifar_resnet.errors import UserError
from cifar_resnet.loggers import RUN_RECORD, resume_logger_runs
from cli_process import CliProcess
from conftest import CONFIGS, env_with_tests, run_cli, tiny_args, without_figures
from faults import pause_point, wait_until_paused

# mlflow-skinny and wandb come with the test extra (`make setup`, or pip install -e '.[test]').

SCRATCH = without_figures("scratch.yaml")
LOGGERS = {
    "mlflow": ["--trainer.logger", "lightning.pytorch.loggers.MLFlowLogger"],
    "wandb": ["--trainer.logger", "lightning.pytorch.loggers.WandbLogger", "--trainer.logger.init_args.offline", "true"],
}


def fit_args(cifar_dir: Path, tmp_path: Path, logger: str, *extra: str) -> list[str]:
    """A 1-epoch scratch run (2 steps an epoch) that logs to ``logger``'s store in ``tmp_path/store``."""
    return ["fit", "--config", SCRATCH, *LOGGERS[logger], *tiny_args(cifar_dir, tmp_path / "store"), *extra]


def logger_env(tmp_path: Path) -> dict[str, str]:
    """MLflow's local file store allowed; W&B offline, quiet, and with its settings under ``tmp_path``."""
    wandb = {f"WANDB_{name}_DIR": str(tmp_path / f"wandb-{name.lower()}") for name in ("CONFIG", "CACHE", "DATA")}
    return {**env_with_tests(), "MLFLOW_ALLOW_FILE_STORE": "true", "WANDB_MODE": "offline", "WANDB_SILENT": "true", **wandb}


def wandb_records(path: Path) -> Iterator[object]:
    """The protobuf records of a W&B ``run-<id>.wandb`` file (a LevelDB-style log: 32 KiB blocks of chunks, each
    with a 7-byte header: CRC, length, type FULL=1/FIRST=2/MIDDLE=3/LAST=4), after its 7-byte ``:W&B`` header."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, pos, chunks = path.read_bytes(), 32768, 7, b""
    assert data[:4] == b":W&B", path
    while pos + 7 <= len(data):
        left = block - pos % block
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if left < 7 or (length == 0 and kind == 0):  # block padding
            pos += left
            continue
        chunks += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(chunks)
            chunks = b""
            yield record


def wandb_history(run_file: Path) -> tuple[set[str], dict[int, float], dict[str, object]]:
    """The run ids in a W&B run file, its ``val/top1`` by step, and its config."""
    ids, top1, config = set(), {}, {}
    for record in wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            ids.add(record.run.run_id)
        elif kind == "config":
            config.update({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.config.update})
        elif kind == "history":
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            if "val/top1" in row:
                top1[row["trainer/global_step"]] = row["val/top1"]
    return ids, top1, config


def mlflow_history(store: Path) -> tuple[list[str], dict[int, float], dict[str, str]]:
    """The ids of every run in the local file store ``store``, and the first run's ``val/top1`` by step and parameters."""
    from mlflow import MlflowClient

    client = MlflowClient(f"file:{store}")
    runs = [run for experiment in client.search_experiments() for run in client.search_runs([experiment.experiment_id])]
    ids = [run.info.run_id for run in runs]
    history = {m.step: m.value for m in client.get_metric_history(ids[0], "val/top1")} if ids else {}
    return ids, history, runs[0].data.params if runs else {}


@pytest.mark.slow
@pytest.mark.parametrize(("logger", "stop"), [("mlflow", signal.SIGKILL), ("wandb", signal.SIGKILL), ("wandb", signal.SIGTERM)])
def test_stopped_run_resumes_into_the_same_logger_run(
    cifar_dir: Path, tmp_path: Path, monkeypatch, logger: str, stop: signal.Signals
) -> None:
    """A kill (or SIGTERM) after the first epoch's checkpoint, then ``--ckpt_path last``. W&B's own service
    process buffers what a run logs and drops it when the run's process is killed (it shuts down when its
    parent dies), so after a SIGKILL only W&B's record of the killed part is lost; after SIGTERM nothing is."""
    env = logger_env(tmp_path)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # for this test's own MlflowClient
    run_dir = tmp_path / "runs" / "scratch" / "version_0"  # the program's, named after the recipe
    last = run_dir / "checkpoints" / "last.ckpt"
    # Paused at the first step of the second epoch, after the first epoch's last.ckpt; stopped there.
    pause = ["--trainer.max_epochs", "2", "--trainer.callbacks+=faults.PauseAtStep",
             "--trainer.callbacks.fifo", str(pause_point(tmp_path)), "--trainer.callbacks.step", "2"]  # fmt: skip
    proc = CliProcess(fit_args(cifar_dir, tmp_path, logger, *pause), tmp_path, env)
    try:
        assert wait_until_paused(tmp_path / "pause.fifo", proc, timeout=240) == "paused at step 2, epoch 1"
        proc.send_signal(stop)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == (-signal.SIGKILL if stop == signal.SIGKILL else 128 + signal.SIGTERM)
    assert torch.load(last, map_location="cpu", weights_only=True)["epoch"] == 0
    recorded = json.loads((run_dir / RUN_RECORD).read_text())[0]["id"]

    # MLflow refuses to change a run's parameter: the resume with another batch size keeps the first one there.
    other_batch = ["--data.batch_size", "25"] if logger == "mlflow" else []
    resume = fit_args(cifar_dir, tmp_path, logger, "--trainer.max_epochs", "2", *other_batch, "--ckpt_path", "last")
    proc = run_cli(*resume, cwd=tmp_path, env=env)

    assert torch.load(last, map_location="cpu", weights_only=True)["epoch"] == 1, "resumed in the run folder"
    assert sorted(p.name for p in run_dir.parent.iterdir()) == ["version_0"], "no second run folder"
    assert (run_dir / "config.yaml").is_file()
    # Checkpoints and the run's files are in the run folder only, not in the logger's store or the working folder.
    store = tmp_path / "store"
    assert not [p for p in store.rglob("*") if p.suffix == ".ckpt" or p.name in ("config.yaml", ".lock")]
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("wandb-")) == ["runs", "store"]
    # Validation logs at the last step of each epoch: steps 1 (before the kill) and 3 (after the resume).
    if logger == "mlflow":
        ids, top1, params = mlflow_history(store)
        assert ids == [recorded], "one MLflow run, the one the run folder names"
        assert sorted(top1) == [1, 3], "epoch 0's val/top1 is kept and epoch 1's appended"
        assert params["batch_size"] == "50" and "MLflow keeps a run's parameters: batch_size keeps" in proc.stdout + proc.stderr
        # Beside the settings Lightning logs, what TensorBoard's HPARAMS tab has: recipe, epochs, best score.
        assert (params["recipe"], params["max_epochs"], params["optimizer/init_args/lr"]) == ("scratch", "2", "0.001")
        from mlflow import MlflowClient

        assert "val/top1_best" in MlflowClient(f"file:{store}").get_run(ids[0]).data.metrics
    else:
        folders = sorted((store / "wandb").glob("offline-run-*"))
        assert [f.name.rsplit("-", 1)[1] for f in folders] == [recorded] * 2, "one W&B run id (the run folder's), twice"
        (ids_before, before, _), (ids_after, after, config) = (wandb_history(f / f"run-{recorded}.wandb") for f in folders)
        assert ids_after == {recorded} and sorted(after) == [3], "the resume logs epoch 1 into the same run"
        assert (config["recipe"], config["max_epochs"], config["optimizer"]["init_args"]["lr"]) == ("scratch", 2, 0.001)
        if stop == signal.SIGTERM:
            assert ids_before == {recorded} and sorted(before) == [1], "epoch 0's val/top1 is kept"


def test_mlflow_file_store_refusal_is_one_paragraph(cifar_dir: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    """mlflow 3.17 (the test extra's) refuses a local file store (its default, ./mlruns) unless MLFLOW_ALLOW_FILE_STORE is set."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(SystemExit) as exit_:
        main(fit_args(cifar_dir, tmp_path, "mlflow"))
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cifar-resnet: error: MLflow refuses to write to a local file store") and "\n" not in err
    assert "MLFLOW_ALLOW_FILE_STORE=true" in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists(), "a command that failed leaves no run folder"


@pytest.mark.slow
def test_figures_reach_mlflow_wandb_and_png_files(cifar_dir: Path, tmp_path: Path) -> None:
    """The recipe's class figures, with MLflow and W&B (offline) as the loggers: in both, and as PNG files in the
    program's run folder (the pixels W&B has)."""
    from PIL import Image

    store = tmp_path / "store"
    loggers = tmp_path / "loggers.yaml"
    loggers.write_text(
        "trainer:\n  logger:\n"
        f"    - class_path: lightning.pytorch.loggers.MLFlowLogger\n      init_args: {{save_dir: {store / 'mlruns'}}}\n"
        f"    - class_path: lightning.pytorch.loggers.WandbLogger\n      init_args: {{save_dir: {store}, offline: true}}\n"
    )
    args = tiny_args(cifar_dir, store)
    at = args.index("--trainer.logger.init_args.save_dir")
    del args[at : at + 2]  # a list of loggers: their folders are in loggers.yaml
    run_cli("fit", "--config", str(CONFIGS / "scratch.yaml"), "--config", str(loggers), *args, cwd=tmp_path, env=logger_env(tmp_path))

    png = tmp_path / "runs" / "scratch" / "version_0" / "figures"
    tags = ("val/confusion_matrix", "val/class_accuracy")
    assert sorted(str(p.relative_to(png)) for p in png.rglob("*.png")) == [f"{tag}/step_2.png" for tag in sorted(tags)]
    (mlflow_run,) = [p for p in (store / "mlruns").glob("*/*") if (p / "artifacts").is_dir()]
    for tag in tags:
        assert (mlflow_run / "artifacts" / tag / "step_2.png").stat().st_size > 0, tag
        (wandb_png,) = (store / "wandb").glob(f"offline-run-*/files/media/images/{tag}_*.png")
        with Image.open(wandb_png) as theirs, Image.open(png / tag / "step_2.png") as ours:
            assert theirs.size == ours.size and theirs.convert("RGB").tobytes() == ours.convert("RGB").tobytes(), tag


def test_a_damaged_logger_run_record_is_named_not_a_traceback(tmp_path: Path) -> None:
    config = Namespace(class_path="lightning.pytorch.loggers.MLFlowLogger", init_args=Namespace())
    record = tmp_path / RUN_RECORD
    record.write_text(json.dumps([{"logger": "MLFlowLogger", "id": "abc123"}]))
    resume_logger_runs(config, tmp_path)  # the control: a good record names the run to continue
    assert config.init_args.run_id == "abc123"
    for damage in (b"\xff\xfe garbage", b'[{"logger": "MLFlowLogger"', b'{"a": 1}', b'[{"logger": "MLFlowLogger"}]', b"[3]"):
        record.write_bytes(damage)
        with pytest.raises(UserError, match=rf"^'{record}' is damaged .*delete it to log the resumed run as a new one"):
            resume_logger_runs(Namespace(class_path="lightning.pytorch.loggers.MLFlowLogger", init_args=Namespace()), tmp_path)
