"""Benchmark (not a test): the seed-style data pipeline against ours, and training throughput.

Runs offline on full-size synthetic CIFAR-100 (50,000 train + 10,000 test images written in the
official archive format). Prints tables and writes JSON. Run from the repository root:

    .venv/bin/python bench/benchmark.py                    # everything, on the best device present
    .venv/bin/python bench/benchmark.py --sections data    # data pipelines only

Figures:
- data: ready-to-train batches/s and host CPU time per image of (a) the seed-style pipeline
  (torchvision CIFAR100 + PIL transforms + DataLoader workers), (b) ours as the host sees it
  (uint8 batches sliced from memory; flips, normalisation and resize are device work), and (c) ours
  complete on the CPU (slicing + transforms on CPU), single-threaded for CPU per image and with as
  many threads as the seed-style pipeline has workers for images/s, for both recipes.
- train: images/s of the train step (forward, backward, optimizer step, metrics) and of evaluation
  for both models, in fp32, bf16, bf16+channels_last and bf16+channels_last+compile; the time of
  the on-device transforms against the step; a short Lightning ``fit`` for per-step overhead; and
  the wall time these project for the full seed recipes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import resource
import sys
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from torchvision import datasets
from torchvision import transforms as T

from cifar_resnet import CIFAR100DataModule, FineTunedResNet18, ScratchResNet
from cifar_resnet.data.archive import FOLDER_NAME
from cifar_resnet.data.synthetic import write_synthetic_archive
from cifar_resnet.data.transforms import CIFAR100_MEAN, CIFAR100_STD, BatchTransform

BATCH = 100
RECIPES = {
    # name: (output size, training images, validation images, epochs), as configs/*.yaml run them
    "scratch": (32, 45_000, 5_000, 50),
    "finetune": (224, 45_000, 5_000, 5),
}


class SeedCIFAR100(datasets.CIFAR100):
    """torchvision's CIFAR100 dataset, as the seed used it, without md5s (the files are synthetic)."""

    train_list = [["train", None]]
    test_list = [["test", None]]
    meta = {**datasets.CIFAR100.meta, "md5": None}


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (DataLoader workers)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def measure_batches(make_batches: Callable[[], Iterable], consume: Callable, n_batches: int, warmup: int = 3) -> dict:
    """Batches/s (wall) and host CPU µs per image over ``n_batches`` after ``warmup``.

    The iterator is created and discarded inside the timed region, so worker start-up counts and
    finished workers' CPU time is included.
    """
    wall = time.perf_counter()
    images = 0
    batches = iter(make_batches())
    for _ in range(warmup):
        consume(next(batches))
    warm_wall, warm_cpu = time.perf_counter(), cpu_seconds()
    for _ in range(n_batches):
        images += len(consume(next(batches)))
    end_wall = time.perf_counter()
    del batches
    end_cpu = cpu_seconds()
    startup = warm_wall - wall
    return {
        "batches_per_s": n_batches / (end_wall - warm_wall),
        "images_per_s": images / (end_wall - warm_wall),
        "host_cpu_us_per_image": 1e6 * (end_cpu - warm_cpu) / images,
        "startup_s": startup,
        "batches": n_batches,
    }


def seed_pipeline(data_dir: Path, size: int, workers: int) -> DataLoader:
    """The seed's way: per-image PIL transforms in DataLoader workers."""
    steps = [T.Resize(size)] if size != 32 else []
    steps += [T.RandomHorizontalFlip(0.2), T.RandomVerticalFlip(0.2), T.ToTensor(), T.Normalize(CIFAR100_MEAN, CIFAR100_STD)]
    dataset = SeedCIFAR100(str(data_dir), train=True, transform=T.Compose(steps), download=False)
    return DataLoader(dataset, batch_size=BATCH, shuffle=True, num_workers=workers, persistent_workers=False)


def best_of(repeats: int, *args, fastest: bool = False) -> dict:
    """The run of :func:`measure_batches` with the least CPU per image (other load only adds time),
    or with the most images/s when ``fastest``."""
    runs = [measure_batches(*args) for _ in range(repeats)]
    if fastest:
        return max(runs, key=lambda r: r["images_per_s"])
    return min(runs, key=lambda r: r["host_cpu_us_per_image"])


def bench_data(data_dir: Path, workers: int, n_batches: int, seed_batches: int, repeats: int) -> dict:
    """All data-pipeline figures, both recipes, in one run on the same data.

    This process runs single-threaded, as each DataLoader worker of the seed-style pipeline does,
    so CPU time per image compares like with like; images/s are compared on as many cores.
    """
    torch.set_num_threads(1)
    results = {}
    for recipe, (size, *_rest) in RECIPES.items():
        dm = CIFAR100DataModule(data_dir=str(data_dir), val_size=5000, batch_size=BATCH, output_size=size)
        dm.setup("fit")
        transform = BatchTransform(dm.hparams.mean, dm.hparams.std, size, 0.2, 0.2)
        n = seed_batches if size != 32 else n_batches

        def complete(batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
            transform(batch[0], train=True)
            return batch[1]

        row = {
            "seed_style": best_of(repeats, lambda: seed_pipeline(data_dir, size, workers), lambda b: b[1], n),
            "ours_host": best_of(repeats, dm.train_dataloader, lambda b: b[1], n_batches),
            "ours_complete_cpu": best_of(repeats, dm.train_dataloader, complete, n),
        }
        # The seed-style pipeline keeps `workers` cores busy; given as many threads, ours is as fast as:
        torch.set_num_threads(workers)
        row["ours_complete_cpu_same_cores"] = best_of(repeats, dm.train_dataloader, complete, n, fastest=True)
        torch.set_num_threads(1)
        seed, host = row["seed_style"], row["ours_host"]
        row["host_cost_ratio"] = seed["host_cpu_us_per_image"] / host["host_cpu_us_per_image"]
        row["complete_cpu_ratio"] = row["ours_complete_cpu_same_cores"]["images_per_s"] / seed["images_per_s"]
        row["complete_cpu_cost_ratio"] = seed["host_cpu_us_per_image"] / row["ours_complete_cpu"]["host_cpu_us_per_image"]
        results[recipe] = row
        print_data_row(recipe, row, workers)
    return results


def print_data_row(recipe: str, row: dict, workers: int) -> None:
    """One recipe's data-pipeline table."""
    print(f"\n[data] {recipe}: batches of {BATCH}, seed-style with {workers} workers")
    print(f"  {'pipeline':<30}{'batches/s':>12}{'images/s':>12}{'host CPU µs/img':>18}")
    for name in ("seed_style", "ours_host", "ours_complete_cpu", "ours_complete_cpu_same_cores"):
        r = row[name]
        print(f"  {name:<30}{r['batches_per_s']:>12.1f}{r['images_per_s']:>12.0f}{r['host_cpu_us_per_image']:>18.2f}")
    print(f"  host cost, seed / ours: {row['host_cost_ratio']:.0f}x lower")
    print(f"  complete on CPU, ours / seed: {row['complete_cpu_ratio']:.1f}x the images/s on {workers} cores, "
          f"{row['complete_cpu_cost_ratio']:.1f}x less CPU per image")  # fmt: skip


def build_module(recipe: str, channels_last: bool, compile: bool) -> torch.nn.Module:
    """The LightningModule each config builds (random weights), with the given speed options."""
    if recipe == "scratch":
        module = ScratchResNet(optimizer=lambda p: torch.optim.Adam(p, lr=1e-3), channels_last=channels_last, compile=compile)
    else:
        module = FineTunedResNet18(
            weights=None, optimizer=lambda p: torch.optim.SGD(p, lr=0.01), channels_last=channels_last, compile=compile
        )
    module.prepare_network()
    return module


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: torch.device, steps: int, warmup: int) -> float:
    """Seconds per call of ``fn`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    sync(device)
    return (time.perf_counter() - start) / steps


def bench_step(recipe: str, variant: str, device: torch.device, batch: int, eval_batch: int, steps: int, warmup: int) -> dict:
    """Train-step and eval images/s of one model in one precision/layout variant."""
    size = RECIPES[recipe][0]
    bf16 = variant != "fp32"
    module = build_module(recipe, channels_last="channels_last" in variant, compile="compile" in variant).to(device)
    optimizer = module.configure_optimizers()
    optimizer = optimizer["optimizer"] if isinstance(optimizer, dict) else optimizer
    transform = BatchTransform(output_size=size, hflip_prob=0.2, vflip_prob=0.2).to(device)
    raw = torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8, device=device)
    labels = torch.randint(0, 100, (batch,), device=device)
    images = transform(raw, train=True)
    eval_images = transform(torch.randint(0, 256, (eval_batch, 3, 32, 32), dtype=torch.uint8, device=device))
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)  # noqa: E731

    def train_step() -> None:
        with autocast():
            logits = module(images)
            loss = module.criterion(logits, labels)
        module.train_metrics.update(logits.detach(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    def eval_step() -> None:
        with torch.inference_mode(), autocast():
            module(eval_images)

    module.train()
    compile_start = time.perf_counter()
    train_s = timed(train_step, device, steps, warmup)
    warm_s = time.perf_counter() - compile_start - train_s * steps
    module.eval()
    eval_s = timed(eval_step, device, max(1, steps // 2), warmup)
    transform_s = timed(lambda: transform(raw, train=True), device, steps, warmup)
    return {
        "train_images_per_s": batch / train_s,
        "eval_images_per_s": eval_batch / eval_s,
        "transform_ms_per_batch": 1e3 * transform_s,
        "step_ms_per_batch": 1e3 * train_s,
        "transform_share_of_step": transform_s / (transform_s + train_s),
        "warmup_s": warm_s,
        "batch": batch,
        "eval_batch": eval_batch,
    }


def bench_fit(recipe: str, data_dir: Path, device: torch.device, batches: int, options: dict) -> dict:
    """Images/s and ms/step of a real ``Trainer.fit`` (data path, hooks, logging), after warm-up."""
    from lightning.pytorch import Callback, Trainer

    class StepClock(Callback):
        """Times steps ``first`` to ``last``, waiting for the device only there (not every step)."""

        def __init__(self, first: int, last: int) -> None:
            self.first, self.last = first, last
            self.marks: list[float] = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if batch_idx in (self.first, self.last):
                sync(device)
                self.marks.append(time.perf_counter())

    size = RECIPES[recipe][0]
    clock = StepClock(first=batches // 3, last=batches - 1)
    dm = CIFAR100DataModule(data_dir=str(data_dir), batch_size=BATCH, output_size=size, data_on_device=options["data_on_device"])
    trainer = Trainer(
        accelerator=device.type, devices=1, precision="bf16-mixed", max_epochs=1, limit_train_batches=batches,
        limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[clock], benchmark=True,
    )  # fmt: skip
    trainer.fit(build_module(recipe, options["channels_last"], options["compile"]), datamodule=dm)
    step_s = (clock.marks[1] - clock.marks[0]) / (clock.last - clock.first)
    return {"images_per_s": BATCH / step_s, "ms_per_step": 1e3 * step_s, "options": options, "batches": batches}


def project(recipe: str, train_ips: float, eval_ips: float) -> float:
    """Seconds for the full recipe at these speeds (training + one validation pass per epoch + test)."""
    _, n_train, n_val, epochs = RECIPES[recipe]
    return epochs * (n_train / train_ips + n_val / eval_ips) + 10_000 / eval_ips


def bench_train(data_dir: Path, device: torch.device, args: argparse.Namespace, results: dict) -> dict:
    """Throughput of both models in every variant, a Lightning fit, and the projected recipe times,
    filled into ``results`` as they come (an interrupted run keeps what it measured)."""
    variants = ["fp32", "bf16", "bf16+channels_last"] + ([] if args.skip_compile else ["bf16+channels_last+compile"])
    cuda = device.type == "cuda"
    for recipe in RECIPES:
        batch = BATCH if cuda else args.cpu_batch[recipe]
        eval_batch = 1000 if cuda else batch
        rows = {}
        results[recipe] = {"variants": rows}
        print(f"\n[train] {recipe} on {device_name(device)}: train batch {batch}, eval batch {eval_batch}")
        print(f"  {'variant':<28}{'train img/s':>12}{'eval img/s':>12}{'transform %':>13}{'warm-up s':>11}")
        for variant in variants:
            r = bench_step(recipe, variant, device, batch, eval_batch, args.steps, args.warmup)
            rows[variant] = r
            print(f"  {variant:<28}{r['train_images_per_s']:>12.0f}{r['eval_images_per_s']:>12.0f}"
                  f"{100 * r['transform_share_of_step']:>12.1f}%{r['warmup_s']:>11.1f}")  # fmt: skip
        best = max(rows, key=lambda v: rows[v]["train_images_per_s"])
        fast = {"channels_last": "channels_last" in best, "compile": "compile" in best, "data_on_device": cuda}
        fit = bench_fit(recipe, data_dir, device, args.fit_batches if cuda else 6, fast)
        print(f"  Lightning fit ({best}{', data_on_device' if cuda else ''}): {fit['images_per_s']:.0f} img/s, "
              f"{fit['ms_per_step']:.2f} ms/step")  # fmt: skip
        step_proj = project(recipe, rows[best]["train_images_per_s"], rows[best]["eval_images_per_s"])
        fit_proj = project(recipe, fit["images_per_s"], rows[best]["eval_images_per_s"])
        print(f"  projected full recipe: {step_proj:.0f} s from the step alone, {fit_proj:.0f} s with Lightning's fit loop")
        results[recipe].update(best=best, fit=fit, projected_recipe_s={"step": step_proj, "fit": fit_proj})
    return results


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def ensure_data(data_dir: Path) -> None:
    """Write the full-size synthetic archive once."""
    if not (data_dir / FOLDER_NAME / "train").is_file():
        print(f"writing 50,000 + 10,000 synthetic images to {data_dir} ...")
        write_synthetic_archive(data_dir, n_train=50_000, n_test=10_000, folder=True)


def main() -> None:
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=Path("bench/out/data"))
    parser.add_argument("--out", type=Path, default=Path("bench/out/results.json"))
    parser.add_argument("--sections", default="data,train", help="comma-separated: data, train")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="seed-style DataLoader workers")
    parser.add_argument("--batches", type=int, default=200, help="batches timed per pipeline")
    parser.add_argument("--seed-batches-224", type=int, default=20, help="batches timed for the 224 pipelines")
    parser.add_argument("--repeats", type=int, default=3, help="data runs per pipeline; the best is kept")
    parser.add_argument("--steps", type=int, default=None, help="timed train steps per variant")
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--fit-batches", type=int, default=150, help="batches of the Lightning fit (GPU)")
    parser.add_argument("--skip-compile", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    args.steps = args.steps or (50 if cuda else 3)
    args.warmup = args.warmup or (10 if cuda else 1)
    args.cpu_batch = {"scratch": 32, "finetune": 4}

    ensure_data(args.data_dir)
    report = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "device": device_name(device),
        "torch": torch.__version__,
    }
    try:
        if "data" in args.sections:
            report["data"] = bench_data(args.data_dir, args.workers, args.batches, args.seed_batches_224, args.repeats)
            torch.set_num_threads(os.cpu_count())
        if "train" in args.sections:
            bench_train(args.data_dir, device, args, report.setdefault("train", {}))
    except KeyboardInterrupt:  # Ctrl+C or a time limit: keep the figures measured so far
        report["interrupted"] = True
        print("\ninterrupted: writing the figures measured so far")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
