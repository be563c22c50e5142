"""Exact resume after a kill, determinism, and the data order that both rely on."""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import signal
from pathlib import Path

import pytest
import torch

from cifar_resnet.checkpointing import find_last_checkpoint
from cifar_resnet.cli import main
from cifar_resnet.data.datamodule import EpochShuffle
from cli_process import CliProcess
from conftest import env_with_tests, read_scalars, run_cli, tiny_args, warning_lines, without_figures
from faults import pause_point, wait_until_paused

# Timing scalars differ between any two runs; everything else must not.
TIMING = ("train/epoch_time", "train/images_per_sec", "time/elapsed_s", "time/warmup_s", "gpu/peak_memory_gib",
          "time/startup_s", "time/validation_s", "time/checkpoint_s", "time/figures_s")


def fit_args(cifar_dir: Path, save_dir: Path, *extra: str) -> list[str]:
    """A 3-epoch deterministic scratch run whose LR drops after epoch 2 (the seed's drop at 30, scaled down)."""
    return [
        "fit", "--config", without_figures("scratch.yaml"), *tiny_args(cifar_dir, save_dir),
        "--trainer.max_epochs", "3", "--trainer.deterministic", "true",
        "--model.init_args.lr_scheduler.init_args.milestones", "[2]", *extra,
    ]  # fmt: skip


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def metrics(run_dir: Path) -> dict[str, dict[int, float]]:
    """Scalars by tag and step, the later value winning, as TensorBoard draws them.

    A killed run may have logged the start of the epoch it died in (``train/lr``); the resumed
    run logs that step again.
    """
    return {tag: dict(values) for tag, values in read_scalars(run_dir).items() if tag not in TIMING}


@pytest.fixture(scope="module")
def uninterrupted(cifar_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run folder of a 3-epoch run that nothing interrupted."""
    tmp = tmp_path_factory.mktemp("uninterrupted")
    run_cli(*fit_args(cifar_dir, tmp / "runs"), cwd=tmp)
    return tmp / "runs" / "scratch" / "version_0"


@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGTERM])
def test_stopped_run_resumes_to_the_same_weights(cifar_dir: Path, uninterrupted: Path, tmp_path: Path, stop: signal.Signals) -> None:
    """A kill (SIGKILL), or a scheduler's SIGTERM, in the second epoch; then a resume."""
    save_dir = tmp_path / "runs"
    run_dir = save_dir / "scratch" / "version_0"
    last = run_dir / "checkpoints" / "last.ckpt"
    # Paused (without touching the numbers) at the first step of the second epoch, where the signal lands.
    pause = ["--trainer.callbacks+=faults.PauseAtStep", "--trainer.callbacks.fifo", str(pause_point(tmp_path)),
             "--trainer.callbacks.step", "2"]  # fmt: skip
    proc = CliProcess(fit_args(cifar_dir, save_dir, *pause), tmp_path, env_with_tests())
    try:
        assert wait_until_paused(tmp_path / "pause.fifo", proc, timeout=240) == "paused at step 2, epoch 1"
        assert last.exists()
        proc.send_signal(stop)
        stderr = proc.communicate(timeout=60)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    killed_at = load(last)
    assert killed_at["epoch"] == 0 and killed_at["global_step"] == 2, "the kill must land after the first epoch only"
    resume = fit_args(cifar_dir, save_dir, "--ckpt_path", "last")
    if stop == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
    else:  # a non-zero exit, so that a scheduler does not take the run for done, and the command that resumes
        assert proc.returncode == 128 + signal.SIGTERM
        message = stderr.strip().splitlines()[-1]
        assert message.startswith(f"cifar-resnet: fit stopped by SIGTERM in epoch 1, which starts again on resume. Resume from {last} with: cifar-resnet fit ")
        resume = shlex.split(message.split(" with: ", 1)[1])[1:]  # the printed command, exactly
        assert resume == [*fit_args(cifar_dir, save_dir, *pause), "--ckpt_path", str(last)]  # (its FIFO is gone)

    proc = run_cli(*resume, cwd=tmp_path, env=env_with_tests())
    assert f"Restoring states from the checkpoint path at {last}" in proc.stdout + proc.stderr
    assert sorted(p.name for p in run_dir.parent.iterdir()) == ["version_0"], "the resumed run continues its folder"

    resumed, reference = load(last), load(uninterrupted / "checkpoints" / "last.ckpt")
    assert (resumed["epoch"], resumed["global_step"]) == (reference["epoch"], reference["global_step"]) == (2, 6)
    # CPU, deterministic algorithms, the same data order and the same random draws: bit-for-bit equal.
    assert resumed["state_dict"].keys() == reference["state_dict"].keys()
    for key, value in reference["state_dict"].items():
        assert torch.equal(resumed["state_dict"][key], value), key
    for mine, theirs in zip(resumed["optimizer_states"][0]["state"].values(), reference["optimizer_states"][0]["state"].values()):
        assert all(torch.equal(mine[k], theirs[k]) for k in theirs)
    assert resumed["lr_schedulers"] == reference["lr_schedulers"]

    # The logs continue too, with the uninterrupted run's values and the LR drop after epoch 2. TensorBoard
    # buffers events, so what the killed run logged last (epoch 0's train metrics, logged just after its
    # checkpoint) may be lost with it; everything logged must match, and every step after the resume be there.
    scalars, reference = metrics(run_dir), metrics(uninterrupted)
    assert scalars.keys() == reference.keys()
    for tag, values in reference.items():
        assert scalars[tag] == {step: values[step] for step in scalars[tag]}, tag
        assert {step for step in values if step > killed_at["global_step"]} <= scalars[tag].keys(), tag
    assert list(reference["train/lr"].values()) == pytest.approx([1e-3, 1e-3, 1e-4])
    # The run's clock goes on from the checkpoint's time: the resumed epochs come after the first one.
    logged = read_scalars(run_dir)
    elapsed, epoch_times = dict(logged["time/elapsed_s"]), dict(logged["train/epoch_time"])
    before = killed_at["callbacks"]["SpeedMonitor"]["elapsed_s"]
    after = [step for step in elapsed if step > killed_at["global_step"]]
    assert before > 0 and after
    assert all(elapsed[step] >= before + epoch_times[step] for step in after), (before, elapsed, epoch_times)


@pytest.mark.slow
def test_last_ckpt_is_the_last_epoch_when_the_metric_stalls(cifar_dir: Path, tmp_path: Path) -> None:
    """With lr 0, val/top1 never improves after epoch 0: last.ckpt must still follow every epoch."""
    frozen = fit_args(cifar_dir, tmp_path / "runs", "--model.init_args.optimizer.init_args.lr", "0")
    run_cli(*frozen, cwd=tmp_path)
    checkpoints = tmp_path / "runs" / "scratch" / "version_0" / "checkpoints"
    assert [p.name.split("-top1=")[0] for p in checkpoints.glob("best-*.ckpt")] == ["best-epoch=0"]
    last = load(checkpoints / "last.ckpt")
    assert (last["epoch"], last["global_step"]) == (2, 6)
    run_cli(*frozen, "--trainer.max_epochs", "4", "--ckpt_path", "last", cwd=tmp_path)
    last = load(checkpoints / "last.ckpt")
    assert (last["epoch"], last["global_step"]) == (3, 8), "the resume continues after epoch 2, not after epoch 0"
    assert len(read_scalars(checkpoints.parent)["val/top1"]) == 4, "no epoch trained twice"


def test_two_seeded_deterministic_runs_log_identical_metrics(cifar_dir: Path, uninterrupted: Path, tmp_path: Path) -> None:
    run_cli(*fit_args(cifar_dir, tmp_path / "runs"), cwd=tmp_path)
    again = metrics(tmp_path / "runs" / "scratch" / "version_0")
    assert {"train/loss_epoch", "train/top1", "val/loss", "val/top1", "val/top5"} <= again.keys()
    assert again == metrics(uninterrupted)
    run_ckpt = load(tmp_path / "runs" / "scratch" / "version_0" / "checkpoints" / "last.ckpt")["state_dict"]
    ref_ckpt = load(uninterrupted / "checkpoints" / "last.ckpt")["state_dict"]
    assert all(torch.equal(run_ckpt[k], v) for k, v in ref_ckpt.items())


def test_resume_from_the_run_folder_alone(cifar_dir: Path, uninterrupted: Path, tmp_path: Path) -> None:
    """A run folder (config.yaml + checkpoints/), even moved elsewhere, is enough to train on."""
    run_dir = tmp_path / "moved" / "scratch" / "version_0"
    shutil.copytree(uninterrupted, run_dir)
    proc = run_cli("fit", "--config", str(run_dir / "config.yaml"), "--trainer.max_epochs", "4",
                   "--trainer.logger.init_args.save_dir", str(tmp_path / "moved"),
                   "--ckpt_path", str(run_dir / "checkpoints" / "last.ckpt"), cwd=tmp_path)  # fmt: skip
    assert not warning_lines(proc.stderr), proc.stderr  # writing into its own checkpoint folder is no mistake
    assert sorted(p.name for p in run_dir.parent.iterdir()) == ["version_0"]
    checkpoint = load(run_dir / "checkpoints" / "last.ckpt")
    assert checkpoint["epoch"] == 3 and checkpoint["global_step"] == 8
    assert [lr for _, lr in read_scalars(run_dir)["train/lr"]] == pytest.approx([1e-3, 1e-3, 1e-4, 1e-4])


def test_epoch_shuffle_is_a_fixed_function_of_seed_and_epoch() -> None:
    sampler = EpochShuffle(50, seed=3)
    orders = []
    for epoch in (0, 1, 0):
        sampler.set_epoch(epoch)
        orders.append(list(sampler))
    assert sorted(orders[0]) == list(range(50)) and len(sampler) == 50
    assert orders[0] == orders[2] and orders[0] != orders[1]
    torch.manual_seed(123)  # the global generator plays no part
    sampler.set_epoch(1)
    assert list(sampler) == orders[1]
    assert list(EpochShuffle(50, seed=4)) != orders[0]


@pytest.mark.slow
def test_ctrl_c_before_the_first_checkpoint_says_to_start_again(cifar_dir: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "runs" / "scratch" / "version_0"
    pause = ["--trainer.callbacks+=faults.PauseAtStep", "--trainer.callbacks.fifo", str(pause_point(tmp_path))]
    proc = CliProcess(fit_args(cifar_dir, tmp_path / "runs", *pause), tmp_path, env_with_tests())
    try:
        assert wait_until_paused(tmp_path / "pause.fifo", proc, timeout=240) == "paused at step 0, epoch 0"
        proc.send_signal(signal.SIGINT)
        stderr = proc.communicate(timeout=60)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 128 + signal.SIGINT, stderr[-3000:]
    assert stderr.strip().splitlines()[-1] == (
        "cifar-resnet: fit stopped by SIGINT in epoch 0 before any checkpoint was written; run the same command again to start over."
    )
    assert not list(run_dir.rglob("*.ckpt"))


def test_last_is_the_newest_complete_checkpoint(tmp_path: Path) -> None:
    """A kill while the very first last.ckpt was being written leaves its .tmp and the epoch's best checkpoint."""
    old = tmp_path / "version_0" / "checkpoints"
    new = tmp_path / "version_1" / "checkpoints"
    for folder in (old, new):
        folder.mkdir(parents=True)
    # Each file written a second after the one before (its time set, not waited for).
    written = iter(range(1_700_000_000, 1_700_000_100))

    def write(path: Path, content: bytes) -> None:
        path.write_bytes(content)
        seconds = next(written)
        os.utime(path, ns=(seconds * 10**9, seconds * 10**9))

    write(old / "last.ckpt", b"older run")
    write(new / "best-epoch=0-top1=0.0300.ckpt", b"complete")
    write(new / ".last.ckpt.abc123.tmp", b"torn")
    assert find_last_checkpoint(tmp_path) == new / "best-epoch=0-top1=0.0300.ckpt"
    write(new / "last.ckpt", b"complete, newer")
    assert find_last_checkpoint(tmp_path) == new / "last.ckpt"
    assert find_last_checkpoint(tmp_path / "nothing") is None


def test_last_skips_links_that_lead_nowhere_and_folders_saying_so(tmp_path: Path, caplog) -> None:
    checkpoints = tmp_path / "version_0" / "checkpoints"
    checkpoints.mkdir(parents=True)
    good = checkpoints / "best-epoch=0-top1=0.0300.ckpt"
    good.write_bytes(b"complete")
    os.utime(good, ns=(1_700_000_000 * 10**9,) * 2)
    (checkpoints / "last.ckpt").symlink_to(checkpoints / "gone.ckpt")  # newer than the good one, and dangling
    (checkpoints / "loop-a.ckpt").symlink_to(checkpoints / "loop-b.ckpt")
    (checkpoints / "loop-b.ckpt").symlink_to(checkpoints / "loop-a.ckpt")
    (checkpoints / "folder.ckpt").mkdir()
    with caplog.at_level(logging.INFO):
        assert find_last_checkpoint(tmp_path) == good
    skipped = [record.getMessage() for record in caplog.records if "so it was skipped" in record.getMessage()]
    assert len(skipped) == 4 and f"'{checkpoints / 'last.ckpt'}' is a link that leads nowhere" in " ".join(skipped)
    assert f"'{checkpoints / 'folder.ckpt'}' is a folder, not a file" in " ".join(skipped)


def test_a_kill_during_a_background_write_keeps_the_previous_checkpoint_and_resumes_exactly(
    cifar_dir: Path, uninterrupted: Path, tmp_path: Path
) -> None:
    """Epoch 1's checkpoints are written on a background thread while training goes on; the kill lands
    in the middle of that write."""
    save_dir, held = tmp_path / "runs", tmp_path / "held"
    run_dir = save_dir / "scratch" / "version_0"
    stall = ["--trainer.callbacks+=faults.HoldCheckpointWrites", "--trainer.callbacks.folder", str(held),
             "--trainer.callbacks.epoch", "1", "--trainer.callbacks.stall", "true"]  # fmt: skip
    held.mkdir()
    stalled = pause_point(held).rename(held / "stalled")
    proc = CliProcess(fit_args(cifar_dir, save_dir, *stall), tmp_path, env_with_tests())
    try:
        assert wait_until_paused(stalled, proc, timeout=240) == "stalled writing a checkpoint"
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    checkpoints = run_dir / "checkpoints"
    torn = [p.name for p in checkpoints.iterdir() if p.suffix == ".tmp"]
    assert len(torn) == 1 and torn[0].startswith((".last.ckpt.", ".best-epoch=1")), "the kill landed mid-write"
    killed_at = load(checkpoints / "last.ckpt")
    assert (killed_at["epoch"], killed_at["global_step"]) == (0, 2), "last.ckpt is still epoch 0's, whole"

    run_cli(*fit_args(cifar_dir, save_dir, "--ckpt_path", "last"), cwd=tmp_path)
    resumed, reference = load(checkpoints / "last.ckpt"), load(uninterrupted / "checkpoints" / "last.ckpt")
    assert (resumed["epoch"], resumed["global_step"]) == (reference["epoch"], reference["global_step"]) == (2, 6)
    for key, value in reference["state_dict"].items():
        assert torch.equal(resumed["state_dict"][key], value), key
    for mine, theirs in zip(resumed["optimizer_states"][0]["state"].values(), reference["optimizer_states"][0]["state"].values()):
        assert all(torch.equal(mine[k], theirs[k]) for k in theirs)


@pytest.mark.slow
def test_a_first_fit_with_ckpt_path_last_starts_from_scratch_and_says_so(cifar_dir: Path, tmp_path: Path, caplog) -> None:
    runs = tmp_path / "runs"
    args = ["fit", "--config", without_figures("scratch.yaml"), *tiny_args(cifar_dir, runs), "--ckpt_path", "last"]
    main(args)  # a job script may always pass `--ckpt_path last`
    said = [r.getMessage() for r in caplog.records if "`--ckpt_path last`" in r.getMessage()]
    assert said == [f"`--ckpt_path last`: no checkpoint in {runs / 'scratch'}/*/checkpoints/ yet, so this fit starts from scratch."]
    first = torch.load(runs / "scratch" / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
    caplog.clear()
    main([*args, "--trainer.max_epochs", "2"])  # the second time, it resumes that run
    assert not [r for r in caplog.records if "starts from scratch" in r.getMessage()]
    resumed = torch.load(runs / "scratch" / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)
    assert (first["epoch"], resumed["epoch"]) == (0, 1) and not (runs / "scratch" / "version_1").exists()
