"""Time-to-accuracy for every recipe: the real ``fit`` then ``test`` of each config, for several seeds.

For each recipe (default: every ``configs/*.yaml``) and seed, runs ``python -m cifar_resnet fit`` and
then ``test`` on the best checkpoint, as subprocesses, each recipe in its own run folder, and reads
the figures back from the runs' TensorBoard events: test top-1/top-5 (and with test-time
augmentation where the recipe has it), best val top-1, fit wall time with the warm-up (compile,
cuDNN autotuning) apart, the time to reach given val accuracies, images/s and peak GPU memory.
Writes ``reproduce.json``, ``reproduce.md`` (mean ± std per recipe next to the seed's 2018 results)
and ``reproduce.png`` (val top-1 against wall-clock seconds, mean and band over seeds) to ``--out``.

    python bench/reproduce.py --data-dir data --seeds 3            # real CIFAR-100
    python bench/reproduce.py --synthetic --seeds 1 --max-minutes 5  # speed only, offline

A recipe that fails is a row with its error; ``--max-minutes`` interrupts the run in progress at
the budget (it becomes a "stopped" row with what it logged so far: its pace, and the time all its
epochs would take at that pace) and starts no more; ``--max-minutes-per-fit`` stops each fit that
runs longer (to sample the pace of long recipes).
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

from cifar_resnet.events import read_scalars

ROOT = Path(__file__).resolve().parents[1]
THRESHOLDS = (0.5, 0.6, 0.7)
# The seed's results (IE534 HW4, 2018 GPUs): test top-1 and wall time.
SEED_RESULTS = {"scratch": "60.13 % in 3.5 h", "finetune": "75.37 % in 1.5 h"}
SYNTHETIC_NOTE = "synthetic: not an accuracy"
FINE_TUNED_MODEL = "cifar_resnet.FineTunedResNet18"
# Scalars read back from the events of a test run.
TEST_SCALARS = ("test/top1", "test/top5", "test/loss", "test/top1_tta", "test/top5_tta")
# Where a fit's wall time went: (column, scalar the program logs, table title); train_s sums train/epoch_time.
BREAKDOWN = (
    ("startup_s", "time/startup_s", "start-up s"), ("train_s", None, "training epochs s"),
    ("validation_s", "time/validation_s", "validation s"), ("figures_s", "time/figures_s", "figures s"),
    ("checkpoint_s", "time/checkpoint_s", "checkpoints s"),
)
STATS = (
    "test_top1", "test_top5", "test_top1_tta", "test_top5_tta", "best_val_top1", "fit_s", "warmup_s",
    "fit_s_excl_warmup", "images_per_s", "peak_memory_gib", *(column for column, _, _ in BREAKDOWN),
)  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("configs", nargs="*", type=Path, help="recipes to run, in this order (default: configs/*.yaml)")
    data = parser.add_mutually_exclusive_group(required=True)
    data.add_argument("--data-dir", type=Path, help="folder holding the real CIFAR-100 archive")
    data.add_argument("--synthetic", action="store_true", help="full-size synthetic archive: speed only, no accuracy")
    parser.add_argument("--synthetic-size", default="50000,10000", help="train,test images of the synthetic archive")
    parser.add_argument("--seeds", type=int, default=1, help="runs per recipe, seeds 0 .. N-1")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/out", help="where reproduce.json/.md/.png go")
    parser.add_argument("--work-dir", type=Path, default=ROOT / "bench/out/reproduce", help="run folders and data")
    parser.add_argument("--max-minutes", type=float, default=None, help="stop at this budget, keeping finished rows")
    parser.add_argument("--max-minutes-per-fit", type=float, default=None, help="stop each fit after this long (its pace is kept)")
    parser.add_argument("--accelerator", default=None, help="passed as --trainer.accelerator (cpu, gpu, auto)")
    parser.add_argument(
        "--extra", action="append", default=[],
        help="arguments added to every fit and test, e.g. --extra=--trainer.max_epochs=2 (repeatable)",
    )  # fmt: skip
    parser.add_argument("--thresholds", default=",".join(str(t) for t in THRESHOLDS), help="val top-1 levels to time")
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.configs = args.configs or sorted((ROOT / "configs").glob("*.yaml"))
    missing = [str(c) for c in args.configs if not c.is_file()]
    if missing:
        parser.error(f"no such config: {', '.join(missing)}")
    if args.data_dir is not None and not args.data_dir.is_dir():
        parser.error(f"--data-dir {args.data_dir} is not a folder (it should hold cifar-100-python/ or its .tar.gz)")
    try:
        args.synthetic_size = tuple(int(n) for n in args.synthetic_size.split(","))
        if len(args.synthetic_size) != 2 or min(args.synthetic_size) < 1:
            raise ValueError
    except ValueError:
        parser.error(f"--synthetic-size takes two positive numbers, TRAIN,TEST; got {args.synthetic_size!r}")
    args.extra = [token for value in args.extra for token in shlex.split(value)]
    args.thresholds = [float(t) for t in args.thresholds.split(",") if t]
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    return args


def fit_figures(scalars: dict[str, list[tuple[int, float]]], thresholds: list[float]) -> dict[str, Any]:
    """A fit's figures from its scalars: the val top-1 curve against wall-clock seconds, and what follows from it."""
    elapsed = dict(scalars.get("time/elapsed_s", []))
    curve = [[elapsed[step], top1] for step, top1 in scalars.get("val/top1", []) if step in elapsed]
    warmup = [v for _, v in scalars.get("time/warmup_s", [])]
    rates = [v for _, v in scalars.get("train/images_per_sec", [])]
    memory = [v for _, v in scalars.get("gpu/peak_memory_gib", [])]
    epoch_times = [v for _, v in scalars.get("train/epoch_time", [])]
    fit_s = curve[-1][0] if curve else None
    return {
        "curve": curve,
        "epochs": len(curve),
        "best_val_top1": max((top1 for _, top1 in curve), default=None),
        "fit_s": fit_s,
        "warmup_s": warmup[0] if warmup else None,
        "fit_s_excl_warmup": fit_s - warmup[0] if fit_s is not None and warmup else None,
        # The median epoch: the first one pays for compiling.
        "images_per_s": statistics.median(rates) if rates else None,
        "peak_memory_gib": memory[-1] if memory else None,
        # Training epochs alone; the rest of the fit is validation, figures, checkpoints.
        "train_s": sum(epoch_times) if epoch_times else None,
        # What the program logged at the end of the fit (callbacks.WallClock, ClassFigures): host seconds.
        **{column: scalars[tag][-1][1] if tag in scalars else None for column, tag, _ in BREAKDOWN if tag},
        "time_to_val": {f"{t:g}": next((s for s, top1 in curve if top1 >= t), None) for t in thresholds},
    }


def test_figures(scalars: dict[str, list[tuple[int, float]]]) -> dict[str, float | None]:
    """``test_top1`` etc. from a test run's scalars (``None`` where the recipe does not log one)."""
    return {tag.replace("/", "_"): (scalars[tag][-1][1] if tag in scalars else None) for tag in TEST_SCALARS}


def max_epochs(run_dir: Path) -> int | None:
    """``trainer.max_epochs`` of the run, from the ``config.yaml`` Lightning saved beside its events."""
    import yaml

    path = run_dir / "config.yaml"
    if not path.is_file():
        return None
    return (yaml.safe_load(path.read_text()) or {}).get("trainer", {}).get("max_epochs")


def model_class(config: Path) -> str | None:
    """The ``model.class_path`` of a recipe (``None`` if the file cannot say)."""
    import yaml

    try:
        model = (yaml.safe_load(config.read_text()) or {}).get("model", {})
    except (OSError, yaml.YAMLError):
        return None
    return model.get("class_path") if isinstance(model, dict) else None


class Runner:
    """Runs subprocesses against a shared deadline and prints progress. ``launch`` starts one as
    ``subprocess.Popen`` does (the tests pass one that skips the imports; see tests/cli_process.py)."""

    def __init__(self, max_minutes: float | None, launch: Callable[..., Any] = subprocess.Popen) -> None:
        self.launch = launch
        self.start = time.monotonic()
        self.deadline = self.start + 60 * max_minutes if max_minutes is not None else math.inf

    def clock(self) -> str:
        budget = "" if math.isinf(self.deadline) else f" / {_mmss(self.deadline - self.start)}"
        return f"[reproduce {_mmss(time.monotonic() - self.start)}{budget}]"

    def end_now(self) -> None:
        self.deadline = time.monotonic()

    def out_of_time(self) -> bool:
        return time.monotonic() >= self.deadline

    def run(self, cmd: list[str], log_path: Path, what: str, max_s: float = math.inf) -> tuple[int, float, bool]:
        """Run ``cmd`` with its output to ``log_path``; at the deadline, or after ``max_s``, interrupt it
        (as Ctrl+C, so Lightning closes its logs). Returns (exit code, seconds, whether it was stopped)."""
        print(f"{self.clock()} {what} ...", flush=True)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
        began = time.monotonic()
        stopped = False
        with log_path.open("w") as log:
            proc = self.launch(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
            next_note = began + 60
            while proc.poll() is None:
                try:
                    proc.wait(timeout=1)
                except subprocess.TimeoutExpired:
                    pass
                now = time.monotonic()
                if (now >= self.deadline or now - began >= max_s) and not stopped and proc.poll() is None:
                    print(f"{self.clock()} time budget reached: stopping {what}", flush=True)
                    stopped = True
                    _stop(proc)
                elif now >= next_note:
                    print(f"{self.clock()} {what}: running for {_mmss(now - began)}", flush=True)
                    next_note = now + 60
        seconds = time.monotonic() - began
        # A Ctrl+C reaches the run too (same process group), which then ends on its own: still a stop.
        stopped = stopped or (proc.returncode != 0 and self.out_of_time())
        print(f"{self.clock()} {what}: {'stopped' if stopped else 'exit ' + str(proc.returncode)} after {seconds:.1f} s", flush=True)
        return proc.returncode, seconds, stopped


def _stop(proc: subprocess.Popen) -> None:
    """Ctrl+C (Lightning shuts down cleanly and flushes its logs), then SIGTERM, then SIGKILL."""
    for sig, grace in ((signal.SIGINT, 30), (signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        proc.send_signal(sig)
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def _mmss(seconds: float) -> str:
    return f"{int(seconds // 60):02d}:{int(seconds % 60):02d}"


def tail(path: Path, lines: int = 12) -> str:
    """The last lines of a log (where the error is)."""
    text = path.read_text(errors="replace") if path.is_file() else ""
    return "\n".join(text.rstrip().splitlines()[-lines:])


def error_line(log_tail: str) -> str:
    """The line of a log tail that best says what went wrong."""
    lines = [line.strip() for line in log_tail.splitlines() if line.strip()]
    for line in reversed(lines):
        if "error" in line.lower() or "exception" in line.lower():
            return line
    return lines[-1] if lines else "no output"


def run_recipe(config: Path, seed: int, args: argparse.Namespace, data_dir: Path, runner: Runner) -> dict[str, Any]:
    """Fit then test one recipe with one seed; its row of the report."""
    recipe = config.stem
    save_dir = args.work_dir / "runs" / recipe
    row: dict[str, Any] = {"recipe": recipe, "config": str(config), "seed": seed, "status": "ok", "error": None}
    if runner.out_of_time():
        return {**row, "status": "not run", "error": "time budget reached before it started"}
    for version in (f"seed{seed}-fit", f"seed{seed}-test"):  # runs of an earlier call
        for old in save_dir.glob(f"*/{version}"):
            shutil.rmtree(old)
    save_dir.mkdir(parents=True, exist_ok=True)
    common = ["--config", str(config), "--seed_everything", str(seed), "--data.data_dir", str(data_dir),
              "--data.download", "false", "--trainer.logger.init_args.save_dir", str(save_dir),
              "--trainer.enable_progress_bar", "false"]  # fmt: skip
    if args.accelerator:
        common += ["--trainer.accelerator", args.accelerator]
    if args.synthetic and model_class(config) == FINE_TUNED_MODEL:
        common += ["--model.init_args.weights", "null"]  # speed only: no ImageNet weights offline
    program = [sys.executable, "-m", "cifar_resnet"]

    fit_log = save_dir / f"seed{seed}-fit.log"
    fit_cmd = [*program, "fit", *common, "--trainer.logger.init_args.version", f"seed{seed}-fit", *args.extra]
    cap = 60 * args.max_minutes_per_fit if args.max_minutes_per_fit else math.inf
    code, seconds, stopped = runner.run(fit_cmd, fit_log, f"{recipe} seed {seed}: fit", cap)
    row.update(fit_command=shlex.join(fit_cmd), fit_process_s=seconds)
    fit_dir = next(iter(save_dir.glob(f"*/seed{seed}-fit")), None)
    if fit_dir is not None:
        row.update(fit_figures(read_scalars(fit_dir), args.thresholds), run_dir=str(fit_dir))
        row["max_epochs"] = max_epochs(fit_dir)
    if stopped:
        row.update(status="stopped", error=f"stopped at its time limit after {row.get('epochs', 0)} epochs")
        if row.get("epochs") and row.get("max_epochs") and row.get("fit_s") is not None:
            # The warm-up once, then every epoch at the pace of those that ran.
            warmup = row.get("warmup_s") or 0.0
            row["projected_fit_s"] = warmup + (row["fit_s"] - warmup) / row["epochs"] * row["max_epochs"]
        return row
    if code != 0 or fit_dir is None:
        return {**row, "status": "failed", "error": tail(fit_log), "failed_at": "fit"}

    checkpoints = sorted((fit_dir / "checkpoints").glob("*.ckpt"), key=lambda p: p.name.startswith("last"))
    if not checkpoints:
        return {**row, "status": "failed", "error": f"fit wrote no checkpoint in {fit_dir / 'checkpoints'}", "failed_at": "fit"}
    row["checkpoint"] = str(checkpoints[0])
    test_log = save_dir / f"seed{seed}-test.log"
    test_cmd = [*program, "test", *common, "--trainer.logger.init_args.version", f"seed{seed}-test",
                "--ckpt_path", str(checkpoints[0]), *args.extra]  # fmt: skip
    code, seconds, stopped = runner.run(test_cmd, test_log, f"{recipe} seed {seed}: test")
    row.update(test_command=shlex.join(test_cmd), test_process_s=seconds)
    test_dir = next(iter(save_dir.glob(f"*/seed{seed}-test")), None)
    if stopped:
        return {**row, "status": "stopped", "error": "stopped at its time limit while testing"}
    if code != 0 or test_dir is None:
        return {**row, "status": "failed", "error": tail(test_log), "failed_at": "test"}
    row.update(test_figures(read_scalars(test_dir)))
    if row.get("fit_s") is None:
        row["warning"] = "the fit logged no time/elapsed_s: the config needs cifar_resnet.callbacks.SpeedMonitor in trainer.callbacks"
    return row


def summarize(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per recipe, over its finished runs: mean, standard deviation (``None`` for one run) and n of each figure."""
    recipes: dict[str, dict[str, Any]] = {}
    for row in rows:
        recipes.setdefault(row["recipe"], {"runs": 0, "ok": 0, "stats": {}})
        recipes[row["recipe"]]["runs"] += 1
        recipes[row["recipe"]]["ok"] += row["status"] == "ok"
    for recipe, entry in recipes.items():
        done = [r for r in rows if r["recipe"] == recipe and r["status"] == "ok"]
        keys = list(STATS) + [f"time_to_val/{k}" for k in (done[0]["time_to_val"] if done else {})]
        for key in keys:
            values = [_get(r, key) for r in done]
            values = [v for v in values if v is not None]
            if values:
                entry["stats"][key] = {
                    "mean": statistics.mean(values),
                    "std": statistics.stdev(values) if len(values) > 1 else None,
                    "n": len(values),
                }
    return recipes


def _get(row: dict[str, Any], key: str) -> Any:
    if "/" in key:
        group, name = key.split("/", 1)
        return row.get(group, {}).get(name)
    return row.get(key)


def environment(args: argparse.Namespace) -> dict[str, Any]:
    """Device, versions, commit, date and command of this call."""
    import torch

    cuda = torch.cuda.is_available() and args.accelerator not in ("cpu",)
    device = torch.cuda.get_device_name(0) if cuda else f"CPU ({platform.machine()}, {os.cpu_count()} cores)"
    versions = {name: _version(name) for name in ("torch", "lightning", "torchvision", "torchmetrics")}
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device,
        "python": platform.python_version(),
        "versions": versions,
        "commit": git_commit(),
        "command": shlex.join(["python", "bench/reproduce.py", *args.argv]),
        "data": "synthetic (speed only)" if args.synthetic else str(args.data_dir),
        "synthetic": bool(args.synthetic),
        "seeds": args.seeds,
    }


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def git_commit() -> str:
    """The checkout's commit, with ``+dirty`` if files differ from it; ``unknown`` without git."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit + ("+dirty" if dirty else "")


def _pct(stat: dict[str, Any] | None) -> str:
    if stat is None:
        return "—"
    return f"{100 * stat['mean']:.2f}" + (f" ± {100 * stat['std']:.2f}" if stat["std"] is not None else "")


def _secs(stat: dict[str, Any] | None) -> str:
    if stat is None:
        return "—"
    return f"{stat['mean']:.1f}" + (f" ± {stat['std']:.1f}" if stat["std"] is not None else "")


def _num(stat: dict[str, Any] | None, fmt: str = ",.0f") -> str:
    if stat is None:
        return "—"
    return format(stat["mean"], fmt) + (f" ± {format(stat['std'], fmt)}" if stat["std"] is not None else "")


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: a header saying where and how it was measured, one row per recipe, and the failures."""
    env, recipes, rows = report["environment"], report["recipes"], report["runs"]
    synthetic = env["synthetic"]
    thresholds = report["thresholds"]
    lines = [
        f"- **Device:** {env['device']}; torch {env['versions']['torch']}, Lightning {env['versions']['lightning']}, Python {env['python']}",
        f"- **Date:** {env['date']}; **commit:** `{env['commit']}`; **data:** {env['data']}; **seeds:** {env['seeds']}",
        f"- **Command:** `{env['command']}`",
        "",
        "Mean ± standard deviation over the seeds that finished. Fit time: wall seconds from the start of "
        "`fit` to the end of its last validation; warm-up: the first training step plus the first "
        "validation batch (compilation, cuDNN autotuning).",
        "",
    ]
    time_cols = [f"to {100 * t:g} % val (s)" for t in thresholds]
    header = ["recipe", "runs ok", "test top-1 %", "test top-1 TTA %", "test top-5 %", "best val top-1 %",
              "fit s", "warm-up s", "fit s excl. warm-up", *time_cols, "train images/s", "peak GPU GiB", "seed (2018 GPUs)"]  # fmt: skip
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for recipe, entry in recipes.items():
        stats = entry["stats"]
        if synthetic:
            accuracy = [SYNTHETIC_NOTE] * 4 + ["—"] * len(thresholds)
        else:
            accuracy = [_pct(stats.get(k)) for k in ("test_top1", "test_top1_tta", "test_top5", "best_val_top1")]
            accuracy += [_secs(stats.get(f"time_to_val/{t:g}")) for t in thresholds]
        cells = [recipe, f"{entry['ok']}/{entry['runs']}", *accuracy[:4], _secs(stats.get("fit_s")), _secs(stats.get("warmup_s")),
                 _secs(stats.get("fit_s_excl_warmup")), *accuracy[4:], _num(stats.get("images_per_s")),
                 _num(stats.get("peak_memory_gib"), ".2f"), SEED_RESULTS.get(recipe, "—")]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Where each fit's wall time went (seconds): start-up from the start of the process to the first training "
        "step (it ends inside the fit: the sanity-check validation, with any compiling it does, belongs to both); "
        "warm-up (inside the training epochs and validation); training epochs; validation; and what figures and "
        "checkpoints cost the training thread (the drawing and writing run in the background).",
        "",
    ]
    header = ["recipe", "start-up s", "warm-up s", *(title for _, _, title in BREAKDOWN[1:]), "fit s"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for recipe, entry in recipes.items():
        stats = entry["stats"]
        cells = [recipe, _secs(stats.get("startup_s")), _secs(stats.get("warmup_s")),
                 *(_secs(stats.get(column)) for column, _, _ in BREAKDOWN[1:]), _secs(stats.get("fit_s"))]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    problems = [r for r in rows if r["status"] != "ok" or r.get("warning")]
    if problems:
        lines += ["", "Runs that did not finish (or miss a figure):", ""]
        for r in problems:
            what = f"- **{r['recipe']}**, seed {r['seed']}: {r['status']}"
            if r["status"] == "stopped" and r.get("fit_s"):
                what += f" after {r['epochs']} of {r.get('max_epochs') or '?'} epochs, {r['fit_s']:.1f} s"
                if r.get("projected_fit_s"):
                    what += f" (all epochs at this pace: {r['projected_fit_s']:.0f} s)"
            elif r["status"] == "ok":
                what += f", but {r['warning']}"
            elif r["status"] == "failed":
                what += f" in {r.get('failed_at', 'fit')}: `{error_line(r['error']).replace('`', chr(39))}`"
            else:
                what += f": {r['error']}"
            lines.append(what)
            if r["status"] == "failed":
                lines += ["", "  ```", *("  " + line for line in r["error"].splitlines()), "  ```"]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    """Val top-1 against wall-clock seconds: per recipe the mean over seeds, with a ± std band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for recipe in report["recipes"]:
        curves = [r["curve"] for r in report["runs"] if r["recipe"] == recipe and r["status"] in ("ok", "stopped") and r.get("curve")]
        if not curves:
            continue
        n = min(len(c) for c in curves)  # epoch by epoch over the seeds
        seconds = [statistics.mean(c[i][0] for c in curves) for i in range(n)]
        top1 = [100 * statistics.mean(c[i][1] for c in curves) for i in range(n)]
        (line,) = ax.plot(seconds, top1, marker="o", markersize=3, label=f"{recipe} ({len(curves)} seed{'s' * (len(curves) > 1)})")
        if len(curves) > 1:
            spread = [100 * statistics.stdev(c[i][1] for c in curves) for i in range(n)]
            ax.fill_between(seconds, [m - s for m, s in zip(top1, spread)], [m + s for m, s in zip(top1, spread)],
                            color=line.get_color(), alpha=0.2)  # fmt: skip
    env = report["environment"]
    ax.set_xscale("log")
    ax.set_xlabel("wall-clock seconds since the start of fit")
    ax.set_ylabel("val top-1 (%)" + (" — synthetic data: not an accuracy" if env["synthetic"] else ""))
    ax.set_title(f"{env['device']}, {env['date'][:10]}, commit {env['commit']}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def prepare_data(args: argparse.Namespace) -> Path:
    """The data folder: ``--data-dir``, or a synthetic archive written once into the work folder."""
    if not args.synthetic:
        return args.data_dir.resolve()
    from cifar_resnet.data.synthetic import write_synthetic_archive

    n_train, n_test = args.synthetic_size
    data_dir = (args.work_dir / "data").resolve()
    marker = data_dir / "size.txt"
    if not marker.is_file() or marker.read_text() != f"{n_train},{n_test}":
        print(f"writing {n_train:,} + {n_test:,} synthetic images to {data_dir} ...", flush=True)
        write_synthetic_archive(data_dir, n_train=n_train, n_test=n_test, folder=True)
        marker.write_text(f"{n_train},{n_test}")
    return data_dir


def run_all(args: argparse.Namespace, runner: Runner) -> dict[str, Any]:
    """Every recipe and seed in turn; the report, written again after each run."""
    data_dir = prepare_data(args)
    report: dict[str, Any] = {"environment": environment(args), "thresholds": args.thresholds, "runs": []}
    total = len(args.configs) * args.seeds
    print(f"{runner.clock()} {len(args.configs)} recipes x {args.seeds} seeds on {report['environment']['device']}", flush=True)
    for config in args.configs:
        for seed in range(args.seeds):
            row = run_recipe(config, seed, args, data_dir, runner)
            report["runs"].append(row)
            done = len(report["runs"])
            print(f"{runner.clock()} [{done}/{total}] {row['recipe']} seed {seed}: {row['status']}" + _brief(row), flush=True)
            report["recipes"] = summarize(report["runs"])
            write_outputs(report, args.out)  # after every run: an interruption keeps the finished rows
    return report


def main(argv: list[str] | None = None, launch: Callable[..., Any] = subprocess.Popen) -> int:
    """The command; ``launch`` starts each fit and test (see :class:`Runner`)."""
    args = parse_args(argv)
    sys.path.insert(0, str(ROOT / "src"))  # cifar_resnet without installing it
    args.configs = [c.resolve() for c in args.configs]
    args.work_dir = args.work_dir.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    runner = Runner(args.max_minutes, launch)
    # Ctrl+C or a `timeout` ends the budget now: the run in progress is stopped and the report still written.
    handlers = {sig: signal.signal(sig, lambda *_: runner.end_now()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        report = run_all(args, runner)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
    print(markdown(report))
    print(f"wrote {args.out / 'reproduce.json'}, reproduce.md, reproduce.png")
    return 0


def _brief(row: dict[str, Any]) -> str:
    parts = []
    if row.get("fit_s") is not None:
        parts.append(f"fit {row['fit_s']:.1f} s (warm-up {row.get('warmup_s') or 0:.1f} s)")
    if row.get("test_top1") is not None:
        parts.append(f"test top-1 {100 * row['test_top1']:.2f} %")
    if row["status"] == "failed":
        parts.append(error_line(row["error"]))
    return ", " + ", ".join(parts) if parts else ""


def write_outputs(report: dict[str, Any], out: Path) -> None:
    """``reproduce.json``, ``reproduce.md`` and ``reproduce.png`` in ``out``."""
    (out / "reproduce.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "reproduce.md").write_text(markdown(report))
    plot(report, out / "reproduce.png")


if __name__ == "__main__":
    sys.exit(main())
