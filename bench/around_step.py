"""Benchmark (not a test): what a fit spends around its training steps, on the device present.

Runs the installed ``cifar-resnet fit`` on a full-size synthetic archive (50,000 + 10,000 images in the
official format) with a timeline callback, and prints:

- start-up: seconds from the command to the first training step, split into imports and parsing, reading
  the archive and building the model, the sanity-check validation, and the rest of Lightning's set-up;
  plus the time of ``python -c "import cifar_resnet.cli"`` alone;
- the first training step (warm-up: compile, cuDNN autotuning) and the mean of the steps after it;
- one full validation (``val_size`` images, with test-time augmentation if the recipe has it) against a
  training epoch projected from the mean step: the share of an epoch that validating costs.

    .venv/bin/python bench/around_step.py --config configs/fast.yaml --precision 32-true --compile false
    .venv/bin/python bench/around_step.py --config configs/fast.yaml --train-batches 5 --tta false

On a CPU, leave out compile (minutes of compiling) and bf16 (slow there); the GPU run uses the recipe as is.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer

ROOT = Path(__file__).resolve().parents[1]
CLI = Path(sys.executable).parent / "cifar-resnet"


class Timeline(Callback):
    """Notes wall-clock times (``time.time()``) of a fit's milestones and writes them to ``out`` (JSON)."""

    def __init__(self, out: str) -> None:
        self.out = out
        self.marks: dict[str, Any] = {"built": time.time(), "steps": []}
        self._validation_start = 0.0

    def _mark(self, name: str, pl_module: LightningModule | None = None) -> None:
        if pl_module is not None and pl_module.device.type == "cuda":
            import torch

            torch.cuda.synchronize(pl_module.device)
        self.marks.setdefault(name, time.time())
        Path(self.out).write_text(json.dumps(self.marks))

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._mark("data_read")  # the DataModule's setup (reading the archive) runs just before this hook

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._mark("fit_start")

    def on_sanity_check_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._mark("sanity_start")

    def on_sanity_check_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._mark("sanity_end", pl_module)

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self._mark("first_step_start")
        self._step_start = time.time()

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if pl_module.device.type == "cuda":
            import torch

            torch.cuda.synchronize(pl_module.device)
        self.marks["steps"].append(time.time() - self._step_start)
        self.marks["steps_per_epoch"] = math.ceil(len(trainer.datamodule.splits["train"].labels) / trainer.datamodule.hparams.batch_size)

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            self._validation_start = time.time()

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            if pl_module.device.type == "cuda":
                import torch

                torch.cuda.synchronize(pl_module.device)
            self.marks["validation_s"] = time.time() - self._validation_start
            self.marks["val_images"] = len(trainer.datamodule.splits["val"].labels)
            self._mark("validation_end")


def import_seconds() -> float:
    """Wall seconds of a fresh ``python -c 'import cifar_resnet.cli'``."""
    start = time.time()
    subprocess.run([sys.executable, "-c", "import cifar_resnet.cli"], check=True)
    return time.time() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/fast.yaml")
    parser.add_argument("--data-dir", type=Path, default=Path(tempfile.gettempdir()) / "cifar-resnet-bench-data")
    parser.add_argument("--train-batches", type=int, default=4, help="training steps to time (the first is warm-up)")
    parser.add_argument("--precision", default=None, help="override the recipe's precision (32-true on a CPU)")
    parser.add_argument("--compile", default=None, help="override the recipe's compile (false on a CPU)")
    parser.add_argument("--tta", default=None, help="override the recipe's test-time augmentation")
    parser.add_argument("--accelerator", default="auto")
    args = parser.parse_args()

    from cifar_resnet.data.archive import find_archive
    from cifar_resnet.data.synthetic import write_synthetic_archive

    if find_archive(args.data_dir) is None:
        print(f"writing a full-size synthetic archive to {args.data_dir} ...", flush=True)
        write_synthetic_archive(args.data_dir, n_train=50_000, n_test=10_000, folder=True, tar=False)

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "timeline.json"
        cmd = [str(CLI), "fit", "--config", args.config, "--data.data_dir", str(args.data_dir), "--data.download", "false",
               "--trainer.accelerator", args.accelerator, "--trainer.devices", "1", "--trainer.max_epochs", "1",
               "--trainer.limit_train_batches", str(args.train_batches), "--trainer.enable_progress_bar", "false",
               "--trainer.logger.init_args.save_dir", str(Path(tmp) / "runs"),
               "--trainer.callbacks+=around_step.Timeline", "--trainer.callbacks.out", str(out)]  # fmt: skip
        for option, value in (("trainer.precision", args.precision), ("model.init_args.compile", args.compile), ("model.init_args.tta", args.tta)):
            if value is not None:
                cmd += [f"--{option}", value]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "bench"), os.environ.get("PYTHONPATH")]))}
        launched = time.time()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        ended = time.time()
        if proc.returncode != 0:
            sys.exit(f"the fit failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        marks = json.loads(out.read_text())

    imports = import_seconds()
    steps = marks["steps"]
    later = steps[1:] or steps
    step_s = sum(later) / len(later)
    epoch_s = step_s * marks["steps_per_epoch"]
    rows = [
        ("imports, parsing, building the classes", marks["built"] - launched),
        ("reading the archive, setting up", marks["data_read"] - marks["built"]),
        ("Lightning set-up to fit start", marks["fit_start"] - marks["data_read"]),
        ("to the sanity check", marks["sanity_start"] - marks["fit_start"]),
        ("sanity-check validation", marks["sanity_end"] - marks["sanity_start"]),
        ("to the first training step", marks["first_step_start"] - marks["sanity_end"]),
    ]
    print(f"\n{args.config} on {args.accelerator} ({os.cpu_count()} cores), overrides: precision={args.precision} "
          f"compile={args.compile} tta={args.tta}")  # fmt: skip
    print(f"start-up, command to first training step: {marks['first_step_start'] - launched:.2f} s")
    for name, seconds in rows:
        print(f"  {name:<42} {seconds:7.2f} s")
    print(f"  (import cifar_resnet.cli alone: {imports:.2f} s)")
    print(f"first training step (warm-up): {steps[0]:.2f} s; later steps: {step_s:.3f} s each")
    print(f"one validation of {marks['val_images']} images: {marks['validation_s']:.2f} s = "
          f"{100 * marks['validation_s'] / epoch_s:.1f} % of an epoch of {marks['steps_per_epoch']} steps ({epoch_s:.1f} s projected)")
    print(f"whole command: {ended - launched:.1f} s")
    print(json.dumps({"config": args.config, "launched_to_first_step_s": marks["first_step_start"] - launched,
                      "phases_s": dict(rows), "import_s": imports, "first_step_s": steps[0], "step_s": step_s,
                      "validation_s": marks["validation_s"], "epoch_s_projected": epoch_s,
                      "validation_share_of_epoch": marks["validation_s"] / epoch_s}))  # fmt: skip


if __name__ == "__main__":
    main()
