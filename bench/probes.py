"""What a training step costs beyond the model (a benchmark, not a test): framework cost, host waits, GPU idle.

For a recipe (default ``configs/scratch.yaml``), in one Lightning ``fit`` built from the config
exactly as the ``cifar-resnet`` command builds it, over windows of training steps after a warm-up:

- **framework cost**: images/s of those steps against the same steps (same module, data path,
  optimizer, precision) in a bare PyTorch loop, and in a bare loop whose steps are each one CUDA
  graph (``step.TrainStep``, what ``cuda_graph`` captures); the ratios are Lightning's (and our
  callbacks') cost;
- **GPU busy**: with ``torch.profiler``, the union of the device's kernel and copy intervals over
  the window, divided by the window from the first to the last of them; 1 - busy is the time the
  GPU waited for the host;
- **host waits**: steps run under ``torch.cuda.set_sync_debug_mode("warn")``; every operation that
  makes the host wait for the GPU is recorded with the stack it came from (and the profiler
  counts synchronising CUDA calls).

Run from the repository root (``--device cpu`` exercises the same code with tiny sizes; device
figures are then absent)::

    python bench/probes.py --data-dir bench/out/data --out bench/out/probes.json
    python bench/probes.py --device cpu --data-dir DATA --warmup 2 --steps 3 --profile-steps 2 --sync-steps 2
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from cifar_resnet.cli import CifarCLI, run, silence_known_warnings  # noqa: E402
from cifar_resnet.data import CIFAR100DataModule  # noqa: E402

SYNC_CALLS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Windows:
    """Step ranges: warm-up, then timed, profiled and sync-checked windows, one after the other."""

    def __init__(self, warmup: int, steps: int, profile_steps: int, sync_steps: int) -> None:
        self.timed = (warmup, warmup + steps)
        self.profiled = (self.timed[1], self.timed[1] + profile_steps)
        self.synced = (self.profiled[1], self.profiled[1] + sync_steps)
        self.total = self.synced[1]


class Probe:
    """Times, profiles and sync-checks the windows of a stream of training steps (Lightning's or a bare loop's)."""

    def __init__(self, windows: Windows, device: torch.device, batch_size: int) -> None:
        self.w, self.device, self.batch_size = windows, device, batch_size
        self.marks: dict[str, float] = {}
        self.profiler: torch.profiler.profile | None = None
        self.syncs: SyncRecorder | None = None
        self.result: dict[str, Any] = {}

    def before(self, step: int) -> None:
        if step == self.w.timed[0]:
            sync(self.device)
            self.marks["timed"] = time.perf_counter()
        if step == self.w.profiled[0]:
            activities = [torch.profiler.ProfilerActivity.CUDA if self.device.type == "cuda" else torch.profiler.ProfilerActivity.CPU]
            self.profiler = torch.profiler.profile(activities=activities)
            sync(self.device)
            self.profiler.__enter__()
            self.marks["profiled"] = time.perf_counter()
        if step == self.w.synced[0]:
            sync(self.device)
            self.syncs = SyncRecorder(self.device)
            self.syncs.__enter__()

    def after(self, step: int) -> None:
        if step + 1 == self.w.timed[1]:
            sync(self.device)
            seconds = time.perf_counter() - self.marks["timed"]
            n = self.w.timed[1] - self.w.timed[0]
            self.result.update(images_per_s=n * self.batch_size / seconds, ms_per_step=1e3 * seconds / n)
        if step + 1 == self.w.profiled[1]:
            sync(self.device)
            wall = time.perf_counter() - self.marks["profiled"]
            self.profiler.__exit__(None, None, None)
            self.result["gpu"] = gpu_busy(self.profiler, self.w.profiled[1] - self.w.profiled[0], wall)
            self.profiler = None
        if step + 1 == self.w.synced[1]:
            self.syncs.__exit__(None, None, None)
            self.result["host_waits"] = self.syncs.summary(self.w.synced[1] - self.w.synced[0])


class LightningProbe(Callback):
    """:class:`Probe` on the training steps of a Lightning ``fit``."""

    def __init__(self) -> None:
        self.probe: Probe | None = None  # set once the DataModule (the batch size) is built
        self.step = 0

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        self.probe.before(self.step)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.probe.after(self.step)
        self.step += 1


class SyncRecorder(contextlib.AbstractContextManager):
    """Records every operation that makes the host wait for the GPU (CUDA's sync debug mode), with its stack."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.stacks: list[tuple[str, ...]] = []
        self._catch = warnings.catch_warnings()

    def __enter__(self) -> SyncRecorder:
        self._catch.__enter__()
        warnings.filterwarnings("always", message=".*synchroniz")  # every one, not once per place
        self._show = warnings.showwarning
        warnings.showwarning = self._record
        if self.device.type == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.device.type == "cuda":
            torch.cuda.set_sync_debug_mode("default")
        self._catch.__exit__(*exc)

    def _record(self, message: Any, category: type, filename: str, lineno: int, file: Any = None, line: str | None = None) -> None:
        if "synchroniz" not in str(message):
            return self._show(message, category, filename, lineno, file, line)
        frames = [f for f in traceback.extract_stack()[:-1] if not f.filename.endswith(("warnings.py", "probes.py"))]
        self.stacks.append(tuple(f"{_short(f.filename)}:{f.lineno} {f.name}" for f in frames[-10:]))

    def summary(self, steps: int) -> dict[str, Any]:
        """How many waits, per step, and where from (most frequent first)."""
        counts = Counter(self.stacks)
        return {
            "checked": self.device.type == "cuda",
            "steps": steps,
            "waits": len(self.stacks),
            "waits_per_step": len(self.stacks) / steps,
            "where": [{"count": n, "stack": list(stack)} for stack, n in counts.most_common(10)],
        }


def _short(filename: str) -> str:
    for marker in ("site-packages/", "/src/", "/bench/"):
        if marker in filename:
            return filename.split(marker, 1)[1]
    return filename


def gpu_busy(profiler: torch.profiler.profile, steps: int, wall_s: float) -> dict[str, Any]:
    """Device busy fraction of a profiled window: the union of kernel/copy intervals over their span."""
    events = profiler.profiler.kineto_results.events()
    device = sorted((e.start_ns(), e.start_ns() + e.duration_ns()) for e in events if e.device_type() == torch.autograd.DeviceType.CUDA)
    sync_calls = Counter(e.name() for e in events if e.name() in SYNC_CALLS)
    sync_calls["cudaDeviceSynchronize"] -= 1  # the probe's own, to end the window
    sync_calls = +sync_calls  # drops counts of zero
    busy_ns = union_length(device)
    span_ns = device[-1][1] - device[0][0] if device else 0
    return {
        "steps": steps,
        "host_ms_per_step": 1e3 * wall_s / steps,
        "device_events": len(device),
        "device_events_per_step": len(device) / steps,
        "busy_ms_per_step": busy_ns / 1e6 / steps,
        "busy_fraction": busy_ns / span_ns if span_ns else None,
        "sync_calls": dict(sync_calls),
    }


def union_length(intervals: list[tuple[int, int]]) -> int:
    """Total length covered by sorted ``(start, end)`` intervals, overlaps counted once."""
    total, end = 0, None
    for start, stop in intervals:
        if end is None or start > end:
            total += stop - start
            end = stop
        elif stop > end:
            total += stop - end
            end = stop
    return total


def build(config: Path, overrides: list[str], callbacks: list[Callback]) -> CifarCLI:
    """Model, DataModule and Trainer exactly as ``cifar-resnet fit --config ...`` builds them (not run),
    with ``callbacks`` added to the Trainer's."""
    cli = run(["--config", str(config), *overrides], subcommand=False)
    cli.trainer.callbacks.extend(callbacks)
    return cli


def lightning_steps(config: Path, overrides: list[str], windows: Windows, device: torch.device) -> dict[str, Any]:
    """The probe over a real ``Trainer.fit`` of ``windows.total`` steps (no validation)."""
    probe_args = ["--trainer.max_steps", str(windows.total), "--trainer.max_epochs", "-1", "--trainer.limit_val_batches", "0",
                  "--trainer.num_sanity_val_steps", "0"]  # fmt: skip
    callback = LightningProbe()
    cli = build(config, [*overrides, *probe_args], [callback])
    callback.probe = Probe(windows, device, cli.datamodule.hparams.batch_size)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return callback.probe.result


def bare_model(config: Path, overrides: list[str], device: torch.device) -> tuple[Any, CIFAR100DataModule, torch.optim.Optimizer, str, Any]:
    """The recipe's module, DataModule, optimizer and autocast dtype, set up for a plain loop (no Trainer run)."""
    from lightning.pytorch.trainer.states import RunningStage, TrainerFn

    cli = build(config, overrides, [])
    model, dm, trainer = cli.model, cli.datamodule, cli.trainer
    dm.trainer = trainer  # the DataModule asks it for the device (data_on_device) and whether it is training
    trainer.state.fn, trainer.state.stage = TrainerFn.FITTING, RunningStage.TRAINING
    dm.prepare_data()
    dm.setup("fit")
    model.configure_model()
    if hasattr(model, "prepare_network"):  # where the speed-ups (channels_last, compile) are applied, if not above
        model.prepare_network()
    model.to(device).train()
    note = "the recipe's configure_optimizers"
    try:
        optimizer = first_optimizer(model.configure_optimizers())
    except Exception as err:  # e.g. a schedule sized from the running Trainer; the optimizer alone does the same step
        optimizer = model.optimizer(model.parameters())
        note = f"the recipe's optimizer on all parameters in one group (configure_optimizers: {type(err).__name__}: {err})"
    precision = str(trainer.precision)
    dtype = torch.bfloat16 if precision.startswith("bf16") else torch.float16 if precision.startswith("16") else None
    return model, dm, optimizer, note, dtype


def bare_steps(config: Path, overrides: list[str], windows: Windows, device: torch.device) -> dict[str, Any]:
    """The same steps in a plain loop: the DataModule's batches and transforms, the module's forward and
    training loss, its optimizer, the recipe's autocast; no Lightning loop, hooks or logging."""
    model, dm, optimizer, note, dtype = bare_model(config, overrides, device)
    probe = Probe(windows, device, dm.hparams.batch_size)
    for step, (images, labels) in enumerate(_batches(dm)):
        if step == windows.total:
            break
        probe.before(step)
        images, labels = dm.on_after_batch_transfer((images.to(device, non_blocking=True), labels.to(device, non_blocking=True)), 0)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = model.training_loss(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        probe.after(step)
    return {**probe.result, "optimizer": note}


def bare_graphed_steps(config: Path, overrides: list[str], windows: Windows, device: torch.device) -> dict[str, Any]:
    """The same steps as one CUDA graph each in a plain loop (``step.TrainStep``, as the module's own step
    captures them, less Lightning): the bound for Lightning's graphed step. Without CUDA, uncaptured."""
    from cifar_resnet.step import TrainStep, prepare_for_capture

    model, dm, optimizer, note, dtype = bare_model(config, overrides, device)
    capture = device.type == "cuda"
    if capture:
        prepare_for_capture(optimizer, device)
    dm.transform.to(device)

    def step(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        images = dm.transform(images, train=True)
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None, cache_enabled=False):
            loss = model.training_loss(model(images), labels)
        loss.backward()
        optimizer.step()
        return loss.detach()

    graphed = TrainStep(step, capture=capture)
    probe = Probe(windows, device, dm.hparams.batch_size)
    for index, (images, labels) in enumerate(_batches(dm)):
        if index == windows.total:
            break
        probe.before(index)
        graphed(images.to(device, non_blocking=True), labels.to(device, non_blocking=True))
        probe.after(index)
    return {**probe.result, "optimizer": note, "captured": graphed.captured}


def first_optimizer(configured: Any) -> torch.optim.Optimizer:
    """The optimizer in whatever ``configure_optimizers`` returned (an optimizer, a dict, or lists of them)."""
    if isinstance(configured, dict):
        return first_optimizer(configured["optimizer"])
    if isinstance(configured, (list, tuple)):
        return first_optimizer(configured[0])
    return configured


def _batches(dm: CIFAR100DataModule) -> Iterator[Any]:
    """Training batches, epoch after epoch, as Lightning draws them."""
    loader = dm.train_dataloader()
    epoch = 0
    while True:
        sampler = getattr(loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "configs/scratch.yaml")
    parser.add_argument("--data-dir", type=Path, required=True, help="a CIFAR-100 archive (synthetic is fine)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=30, help="steps before the windows (compile, autotuning)")
    parser.add_argument("--steps", type=int, default=100, help="timed steps (framework cost)")
    parser.add_argument("--profile-steps", type=int, default=30, help="profiled steps (GPU busy)")
    parser.add_argument("--sync-steps", type=int, default=30, help="steps checked for host waits")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/out/probes.json")
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. --model.init_args.channels_last=true")
    args = parser.parse_args(argv)
    silence_known_warnings()
    for message in (r"LightningCLI's args parameter", r".*could not find the monitored key", r".*self\.log\(\)"):
        warnings.filterwarnings("ignore", message=message)  # no validation here, and the bare loop's module logs to no one
    device = torch.device(args.device)
    windows = Windows(args.warmup, args.steps, args.profile_steps, args.sync_steps)
    with tempfile.TemporaryDirectory() as logs:
        overrides = ["--data.data_dir", str(args.data_dir), "--data.download", "false", "--trainer.accelerator", device.type,
                     "--trainer.devices", "1", "--trainer.logger.init_args.save_dir", logs, "--trainer.enable_progress_bar",
                     "false", "--trainer.enable_model_summary", "false", *args.overrides]  # fmt: skip
        report: dict[str, Any] = {"config": str(args.config), "overrides": args.overrides, "device": args.device,
                                  "windows": vars(windows)}  # fmt: skip
        print(f"[probes] {args.config.name} on {device}: Lightning fit, {windows.total} steps ...", flush=True)
        report["lightning"] = lightning_steps(args.config, overrides, windows, device)
        for name, loop in (("bare", bare_steps), ("bare_graphed", bare_graphed_steps)):
            print(f"[probes] {args.config.name} on {device}: {name} loop, {windows.total} steps ...", flush=True)
            try:
                report[name] = loop(args.config, overrides, windows, device)
            except Exception as err:  # the comparison is lost, the other figures are not
                report[name] = {"error": f"{type(err).__name__}: {err}"}
    lit = report["lightning"]
    for name in ("bare", "bare_graphed"):
        if "images_per_s" in report[name]:
            report[f"lightning_over_{name}"] = lit["images_per_s"] / report[name]["images_per_s"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(format_report(report))
    return 0


def format_report(report: dict[str, Any]) -> str:
    """A few plain lines for the log."""
    lines = [f"[probes] {Path(report['config']).name} {' '.join(report['overrides'])}"]
    for name in ("lightning", "bare", "bare_graphed"):
        r = report.get(name, {"error": "not run"})
        if "error" in r:
            lines.append(f"  {name:<12} error: {r['error']}")
            continue
        gpu = r.get("gpu", {})
        busy = gpu.get("busy_fraction")
        lines.append(f"  {name:<12} {r.get('images_per_s', 0):>10.0f} img/s {r.get('ms_per_step', 0):>7.2f} ms/step   GPU busy "
                     f"{'n/a' if busy is None else f'{100 * busy:.1f} %'}   {gpu.get('device_events_per_step', 0):.0f} device ops/step")  # fmt: skip
    for name in ("bare", "bare_graphed"):
        if f"lightning_over_{name}" in report:
            lines.append(f"  Lightning fit / {name} loop images/s: {report[f'lightning_over_{name}']:.3f}")
    waits = report["lightning"].get("host_waits", {})
    if waits.get("checked"):
        lines.append(f"  host waits in {waits['steps']} Lightning steps: {waits['waits']} ({waits['waits_per_step']:.2f}/step)")
        for where in waits["where"][:5]:
            lines.append(f"    {where['count']}x at {' <- '.join(reversed(where['stack'][-4:]))}")
    else:
        lines.append("  host waits: not checked (no CUDA device)")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
