"""Work around the training step done in the background: figures drawn and checkpoints written while
training goes on, arriving whole, in order and under the step they belong to."""

from __future__ import annotations

import json
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from cifar_resnet.cli import main
from conftest import tiny_args, without_figures


def logged_images(run_dir: Path, tag: str) -> list[tuple[int, tuple[int, int]]]:
    """(step, (height, width)) of every image logged under ``tag``, in the order written."""
    found = []
    for events in sorted(run_dir.rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events), size_guidance={"images": 0})
        acc.Reload()
        if tag in acc.Tags()["images"]:
            found += [(e.step, (e.height, e.width)) for e in acc.Images(tag)]
    return found


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
    assert {size for _, size in logged} == {tuple(foreground[0]["shape"][:2])}
