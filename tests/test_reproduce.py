"""bench/reproduce.py and bench/gpu_check.sh on tiny synthetic data, on CPU; SpeedMonitor's time scalars."""

from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from PIL import Image

from cli_process import launch_like_popen
from conftest import ROOT, read_scalars, recipe_copy

SEEDS = 2
EXTRA = (
    "--data.val_size 100 --data.batch_size 50 --data.eval_batch_size 50 --data.output_size 32 "
    "--trainer.max_epochs 2 --trainer.limit_train_batches 2 --trainer.limit_val_batches 2 --trainer.limit_test_batches 2"
)


def load_reproduce() -> Any:
    spec = importlib.util.spec_from_file_location("reproduce", ROOT / "bench" / "reproduce.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def reproduce(tmp: Path, configs: list[Path], *options: str) -> tuple[dict, str]:
    out = tmp / "out"
    argv = [*map(str, configs), "--synthetic", "--synthetic-size", "300,100", "--out", str(out), "--work-dir", str(tmp / "work"),
            "--accelerator", "cpu", f"--extra={EXTRA}", *options]  # fmt: skip
    assert load_reproduce().main(argv, launch=launch_like_popen) == 0
    return json.loads((out / "reproduce.json").read_text()), (out / "reproduce.md").read_text()


@pytest.fixture(scope="module")
def two_recipes(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, str, Path]:
    """scratch and finetune (made tiny) x 2 seeds."""
    tmp = tmp_path_factory.mktemp("reproduce")
    configs = [recipe_copy("scratch.yaml", tmp / "configs"), recipe_copy("finetune.yaml", tmp / "configs")]
    report, md = reproduce(tmp, configs, "--seeds", str(SEEDS))
    return report, md, tmp / "out"


def test_report_numbers_are_the_runs_own_logged_metrics(two_recipes: tuple[dict, str, Path]) -> None:
    report, _, _ = two_recipes
    runs = report["runs"]
    assert [(r["recipe"], r["seed"], r["status"]) for r in runs] == [
        (recipe, seed, "ok") for recipe in ("scratch", "finetune") for seed in range(SEEDS)
    ]
    for run in runs:
        fit_dir = Path(run["run_dir"])
        fit = read_scalars(fit_dir)
        test = read_scalars(fit_dir.parent / f"seed{run['seed']}-test")
        elapsed = dict(fit["time/elapsed_s"])
        assert run["curve"] == [[elapsed[step], top1] for step, top1 in fit["val/top1"]]
        assert run["best_val_top1"] == max(top1 for _, top1 in fit["val/top1"])
        assert run["fit_s"] == fit["time/elapsed_s"][-1][1]
        assert run["warmup_s"] == fit["time/warmup_s"][0][1]
        assert run["fit_s_excl_warmup"] == run["fit_s"] - run["warmup_s"]
        assert run["images_per_s"] == statistics.median(v for _, v in fit["train/images_per_sec"])
        for key in ("test/top1", "test/top5", "test/loss"):
            assert run[key.replace("/", "_")] == test[key][-1][1]
        # The wall-clock breakdown: what the program logged (the recipe copies draw no figures).
        for column, tag in (("startup_s", "time/startup_s"), ("validation_s", "time/validation_s"), ("checkpoint_s", "time/checkpoint_s")):
            assert run[column] == fit[tag][-1][1], column
        assert run["figures_s"] is None and run["train_s"] == sum(v for _, v in fit["train/epoch_time"])
        # --seed and --accelerator reached the run
        config = yaml.safe_load((fit_dir / "config.yaml").read_text())
        assert config["seed_everything"] == run["seed"] and config["trainer"]["accelerator"] == "cpu"
        assert config["trainer"]["max_epochs"] == 2 == run["epochs"], "--extra reached the run"
    # The seeds are different runs: different weights, so different losses.
    assert runs[0]["test_loss"] != runs[1]["test_loss"]


def test_mean_and_std_per_recipe(two_recipes: tuple[dict, str, Path]) -> None:
    report, md, _ = two_recipes
    for recipe in ("scratch", "finetune"):
        runs = [r for r in report["runs"] if r["recipe"] == recipe]
        stats = report["recipes"][recipe]["stats"]
        for key in ("test_top1", "test_top5", "fit_s", "warmup_s", "images_per_s"):
            values = [r[key] for r in runs]
            assert stats[key] == {"mean": statistics.mean(values), "std": statistics.stdev(values), "n": SEEDS}, key
        row = next(line for line in md.splitlines() if line.startswith(f"| {recipe} |"))
        fit = stats["fit_s"]
        assert f"| {fit['mean']:.1f} ± {fit['std']:.1f} |" in row
        assert f"| {SEEDS}/{SEEDS} |" in row and "synthetic: not an accuracy" in row
        # Second table: where the wall time went, from the start-up on.
        breakdown = [line for line in md.splitlines() if line.startswith(f"| {recipe} |")][1]
        startup = stats["startup_s"]
        assert breakdown.startswith(f"| {recipe} | {startup['mean']:.1f} ± {startup['std']:.1f} |")
    assert "60.13 % in 3.5 h" in next(line for line in md.splitlines() if line.startswith("| scratch |"))
    assert "75.37 % in 1.5 h" in next(line for line in md.splitlines() if line.startswith("| finetune |"))
    env = report["environment"]
    assert env["device"].startswith("CPU") and env["versions"]["lightning"] and f"`{env['commit']}`" in md


def test_png_is_written(two_recipes: tuple[dict, str, Path]) -> None:
    _, _, out = two_recipes
    with Image.open(out / "reproduce.png") as image:
        assert image.format == "PNG" and image.width > 300 and image.height > 200


def test_speed_monitor_logs_elapsed_time_per_validation_epoch(two_recipes: tuple[dict, str, Path]) -> None:
    report, _, _ = two_recipes
    fit = read_scalars(Path(report["runs"][0]["run_dir"]))
    elapsed, val_top1 = fit["time/elapsed_s"], fit["val/top1"]
    assert [step for step, _ in elapsed] == [step for step, _ in val_top1], "one per validation epoch, same steps"
    assert len(elapsed) == 2, "not logged in the sanity check"
    assert 0 < elapsed[0][1] < elapsed[1][1]
    (warmup,) = fit["time/warmup_s"]
    assert 0 < warmup[1] < elapsed[0][1]
    assert "gpu/peak_memory_gib" not in fit, "CPU run"


def test_max_minutes_stops_and_keeps_finished_rows_and_failures_are_rows(
    two_recipes: tuple[dict, str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, _, _ = two_recipes
    # How long one tiny recipe takes on this machine now, so the budget fits it and the next one, with room
    # (the fastest row: the first one also started the process that the runs are forked from).
    quick_s = min(r["fit_process_s"] + r["test_process_s"] for r in first["runs"] if r["recipe"] == "scratch")
    budget_s = 1.5 * quick_s + 8
    configs = tmp_path / "configs"
    quick = recipe_copy("scratch.yaml", configs)
    bad = recipe_copy("scratch.yaml", configs, "bad", **{"model.init_args.dropout": 2.0})
    slow = recipe_copy("scratch.yaml", configs, "slow")
    config = yaml.safe_load(slow.read_text())
    config["trainer"]["callbacks"].append({"class_path": "faults.SlowDown", "init_args": {"seconds": 600}})
    slow.write_text(yaml.safe_dump(config))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]))

    report, md = reproduce(tmp_path, [quick, bad, slow, quick.with_name("scratch.yaml")], "--max-minutes", f"{budget_s / 60}")
    status = [(r["recipe"], r["status"]) for r in report["runs"]]
    assert status == [("scratch", "ok"), ("bad", "failed"), ("slow", "stopped"), ("scratch", "not run")]
    assert report["runs"][0]["test_top1"] is not None
    assert "dropout must lie in [0, 1)" in report["runs"][1]["error"]
    assert "| bad | 0/1 |" in md and "dropout must lie in [0, 1)" in md
    assert "slow**, seed 0: stopped" in md
    assert report["recipes"]["scratch"]["stats"]["test_top1"]["n"] == 1


@pytest.mark.slow
def test_gpu_check_without_a_gpu_says_so_and_starts_nothing(tmp_path: Path) -> None:
    out = tmp_path / "gpu_check"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHON": sys.executable, "GPU_CHECK_OUT": str(out)}
    proc = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh")], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    lines = (proc.stdout + proc.stderr).strip().splitlines()
    assert proc.returncode != 0
    assert len(lines) == 1 and "no CUDA GPU" in lines[0], lines
    assert not out.exists() or not any(out.iterdir()), "nothing was started"


def test_gpu_busy_time_counts_overlapping_device_work_once() -> None:
    spec = importlib.util.spec_from_file_location("probes", ROOT / "bench" / "probes.py")
    probes = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probes)
    # two overlapping kernels (0-15), one inside another stream's (20-30 holds 22-25), a gap of 5 between
    assert probes.union_length([(0, 10), (5, 15), (20, 30), (22, 25)]) == 25
    assert probes.union_length([]) == 0
