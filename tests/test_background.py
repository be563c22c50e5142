"""What happens around the training step, off its critical path: figures drawn and checkpoints written while
training goes on, arriving whole, in order and under the step they belong to."""

from __future__ import annotations

import ast
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torchmetrics.classification import MulticlassConfusionMatrix

from cifar_resnet import ScratchResNet
from cifar_resnet.callbacks import process_start_time
from cifar_resnet.checkpointing import BackgroundCheckpointIO, read_checkpoint
from cifar_resnet.cli import main
from cifar_resnet.errors import UserError
from cifar_resnet.metrics import ConfusionMatrix
from cli_process import CliProcess
from conftest import CONFIGS, env_with_tests, read_scalars, tiny_args, without_figures
from faults import FullDiskCheckpointIO, pause_point, wait_until_paused


def logged_images(run_dir: Path, tag: str) -> list[tuple[int, tuple[int, int]]]:
    """(step, (height, width)) of every image logged under ``tag``, in the order written."""
    found = []
    for events in sorted(run_dir.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"images": 0})
        acc.Reload()
        if tag in acc.Tags()["images"]:
            found += [(e.step, (e.height, e.width)) for e in acc.Images(tag)]
    return found


@pytest.mark.slow
def test_figures_drawn_in_the_background_equal_the_foreground_ones(cifar_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "figures.jsonl"
    args = [*tiny_args(cifar_dir, tmp_path / "runs"), "--trainer.max_epochs", "2",
            "--trainer.callbacks+=faults.RecordedClassFigures", "--trainer.callbacks.out", str(out)]  # fmt: skip
    main(["fit", "--config", without_figures("scratch.yaml"), *args])
    entries = [json.loads(line) for line in out.read_text().splitlines()]
    foreground = [e for e in entries if e["where"] == "foreground"]
    background = [e for e in entries if e["where"] == "background"]
    assert {e["thread"] for e in background} == {"class-figures"}
    key = lambda e: (e["tag"], e["step"], e["pixels"], e["shape"])  # noqa: E731
    # Every figure arrived (the fit waited for the last ones), in order, under its step, pixel for pixel.
    assert [key(e) for e in background] == [key(e) for e in foreground]
    steps = [e["step"] for e in foreground if e["tag"] == "val/confusion_matrix"]
    assert steps == [2, 4] and [e["tag"] for e in foreground] == ["val/confusion_matrix", "val/class_accuracy"] * 2
    # The first was drawn after training had gone on into epoch 1 and reset the confusion matrix.
    assert background[0]["trained_to"] > background[0]["step"]
    run_dir = tmp_path / "runs" / "scratch" / "version_0"
    logged = logged_images(run_dir, "val/confusion_matrix")
    assert [step for step, _ in logged] == [2, 4]
    (figures_s,) = read_scalars(run_dir)["time/figures_s"]
    assert figures_s[0] == 4 and figures_s[1] > 0
    assert {size for _, size in logged} == {tuple(foreground[0]["shape"][:2])}


def same(a: Any, b: Any) -> bool:
    """Whether two checkpoint parts are equal, tensors bit for bit."""
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


@pytest.mark.slow
def test_a_background_checkpoint_is_the_state_at_the_end_of_its_epoch(cifar_dir: Path, tmp_path: Path) -> None:
    held = tmp_path / "held"
    args = [*tiny_args(cifar_dir, tmp_path / "runs"), "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "3",
            "--trainer.callbacks+=faults.HoldCheckpointWrites", "--trainer.callbacks.folder", str(held)]  # fmt: skip
    before_main = time.time()
    main(["fit", "--config", without_figures("scratch.yaml"), *args])
    snapshot = torch.load(held / "snapshot.pt", weights_only=True)
    written = [json.loads(line) for line in (held / "written.json").read_text().splitlines()]
    assert {w["file"].split("-top1=")[0] for w in written} == {"last.ckpt", "best-epoch=0"}
    # Epoch 0 ended at step 3; its checkpoints were written after training had taken two more steps ...
    assert all(w["step"] >= 5 for w in written), written
    for w in written:
        checkpoint = torch.load(held / w["file"], weights_only=True)
        assert (checkpoint["epoch"], checkpoint["global_step"]) == (0, 3)
        # ... and hold the state of the end of epoch 0, bit for bit, not the state the steps after it made.
        assert same(checkpoint["state_dict"], snapshot["state_dict"])
        assert same(checkpoint["optimizer_states"], snapshot["optimizer_states"])
    final = torch.load(tmp_path / "runs" / "scratch" / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
    assert final["global_step"] == 6 and not same(final["state_dict"], snapshot["state_dict"])

    # WallClock's account of the fit, logged once at its end.
    scalars = read_scalars(tmp_path / "runs" / "scratch" / "version_0")
    (elapsed_step, elapsed), *_ = reversed(scalars["time/elapsed_s"])
    times = {tag: scalars[tag] for tag in ("time/startup_s", "time/validation_s", "time/checkpoint_s")}
    assert all(len(values) == 1 and values[0][0] == 6 for values in times.values()), times
    startup, validation, checkpoint = (values[0][1] for values in times.values())
    # Start-up counts from the start of the process (here pytest's), so it holds all that came before `main`.
    assert before_main - process_start_time() < startup < time.time() - process_start_time()
    assert 0 < validation < elapsed and 0 < checkpoint < elapsed


def test_a_failed_background_write_keeps_the_earlier_checkpoint_and_reaches_the_caller(tmp_path: Path) -> None:
    checkpoint_io = BackgroundCheckpointIO(FullDiskCheckpointIO(saves_before_full=1))
    weights = {"state_dict": {"w": torch.arange(4.0)}}
    checkpoint_io.save_checkpoint(weights, tmp_path / "best-epoch=0.ckpt")
    weights["state_dict"]["w"].add_(1)  # the next step changes the weights in place: the copy must not change
    checkpoint_io.wait()
    assert torch.equal(read_checkpoint(tmp_path / "best-epoch=0.ckpt")["state_dict"]["w"], torch.arange(4.0))
    # The disk is full now. ModelCheckpoint asks for the new best, then for the old best's removal.
    checkpoint_io.save_checkpoint(weights, tmp_path / "best-epoch=1.ckpt")
    checkpoint_io.remove_checkpoint(tmp_path / "best-epoch=0.ckpt")
    with pytest.raises(UserError, match=f"Cannot write '{tmp_path / 'best-epoch=1.ckpt'}': the disk is full"):
        checkpoint_io.wait()
    checkpoint_io.teardown()  # raised once, not twice
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best-epoch=0.ckpt"]


@pytest.mark.parametrize("subcommand", ["validate", "test"])
def test_evaluation_batches_never_make_the_host_wait(cifar_dir: Path, tmp_path: Path, subcommand: str) -> None:
    """Validation and test batches, with test-time augmentation and the class figures' collecting of
    misclassified images, ask the device for nothing until the epoch ends."""
    waits = tmp_path / "waits.json"
    args = [*tiny_args(cifar_dir, tmp_path / "runs"), "--model.init_args.tta", "true", "--data.eval_batch_size", "20",
            "--trainer.limit_val_batches", "4", "--trainer.limit_test_batches", "4", "--trainer.enable_progress_bar", "true",
            "--trainer.callbacks+=faults.CountEvalWaits", "--trainer.callbacks.out", str(waits)]  # fmt: skip
    main([subcommand, "--config", str(CONFIGS / "scratch.yaml"), *args])
    assert json.loads(waits.read_text()) == []


def test_tta_evaluates_each_image_and_its_mirror_in_one_forward_pass() -> None:
    model = ScratchResNet(tta=True).eval()
    batches = []
    model.net.register_forward_hook(lambda module, inputs, output: batches.append(inputs[0].clone()))
    images = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        tta = model.tta_logits(images)
        assert [len(b) for b in batches] == [12]
        assert torch.equal(batches[0], torch.cat([images, images.flip(-1)]))
        plain, mirrored = model(images), model(images.flip(-1))
    assert torch.allclose(tta, (plain + mirrored) / 2, atol=1e-6)


def test_the_confusion_matrix_counts_as_torchmetrics_does() -> None:
    ours, theirs = ConfusionMatrix(7, validate_args=False), MulticlassConfusionMatrix(7, validate_args=False)
    generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        logits, labels = torch.randn(50, 7, generator=generator), torch.randint(0, 7, (50,), generator=generator)
        ours.update(logits, labels)
        theirs.update(logits, labels)
    assert ours.compute().sum() == 150 and torch.equal(ours.compute(), theirs.compute())


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_a_stopped_fit_does_not_wait_for_drawings(cifar_dir: Path, tmp_path: Path, stop: signal.Signals) -> None:
    fifo = pause_point(tmp_path)
    args = ["fit", "--config", without_figures("scratch.yaml"), *tiny_args(cifar_dir, tmp_path / "runs"), "--trainer.max_epochs", "3",
            "--trainer.callbacks+=faults.HungClassFigures", "--trainer.callbacks.fifo", str(fifo),
            "--trainer.callbacks+=faults.SlowDown", "--trainer.callbacks.seconds", "0.5"]  # fmt: skip
    proc = CliProcess(args, tmp_path, env_with_tests())
    try:
        assert wait_until_paused(fifo, proc, timeout=240).startswith("drawing val/")
        proc.send_signal(stop)
        stderr = proc.communicate(timeout=60)[1]  # a drawing that never ends must not hold the command
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 128 + stop, stderr[-2000:]
    assert f"fit stopped by {stop.name}" in stderr


COMPILE_TWICE = """
import sys
import torch
from cifar_resnet.compile_cache import CompileCache

CompileCache(sys.argv[1]).setup(None, None, "fit")  # what the Trainer does before the module compiles
double_sin = torch.compile(lambda x: (2 * x).sin())
assert torch.allclose(double_sin(torch.ones(4)), torch.ones(4).mul(2).sin())
print(dict(torch._dynamo.utils.counters["inductor"]))
"""


@pytest.mark.slow
def test_a_second_compile_finds_the_first_ones_cache(tmp_path: Path) -> None:
    folder = tmp_path / "cache"
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    runs = [subprocess.run([sys.executable, "-c", COMPILE_TWICE, str(folder)], env=env, capture_output=True, text=True, timeout=600)
            for _ in range(2)]  # fmt: skip
    assert all(run.returncode == 0 for run in runs), runs[-1].stderr[-3000:]
    first, second = (ast.literal_eval(run.stdout.strip().splitlines()[-1]) for run in runs)
    assert first.get("fxgraph_cache_miss", 0) >= 1 and first.get("fxgraph_cache_hit", 0) == 0
    assert second.get("fxgraph_cache_hit", 0) >= 1 and second.get("fxgraph_cache_miss", 0) == 0
    assert (folder / "fxgraph").is_dir()
