"""Benchmark (not a test): random crops + flips with a different random draw per image, on a whole batch.

Compares, per batch of uint8 32x32 images: ours (``cifar_resnet.data.transforms``: one gather for the
crops, ``torch.where`` for the flips), torchvision's v2 transforms (which draw one set of parameters per
call, so per-image randomness needs a loop over the images) and Kornia's batched augmentations (per-image
parameters, float images), when Kornia is installed. Prints a table and writes JSON. Run from the
repository root:

    .venv/bin/python bench/augment.py --device cuda     # or cpu
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torchvision.transforms import v2

from cifar_resnet.data.transforms import random_crops, random_flips


def ours(images: torch.Tensor) -> torch.Tensor:
    """The project's batched crops and flips."""
    return random_flips(random_crops(images, 4), 0.5, 0.0)


def torchvision_v2_loop() -> Callable[[torch.Tensor], torch.Tensor]:
    """torchvision v2, one call per image (a call on a batch would crop every image alike)."""
    transform = v2.Compose([v2.RandomCrop(32, padding=4, padding_mode="reflect"), v2.RandomHorizontalFlip(0.5)])
    return lambda images: torch.stack([transform(image) for image in images])


def kornia_batched() -> Callable[[torch.Tensor], torch.Tensor] | None:
    """Kornia's batched augmentations (per-image parameters); they take float images."""
    try:
        import kornia.augmentation as K
    except ImportError:
        return None
    augment = torch.nn.Sequential(K.RandomCrop((32, 32), padding=4, padding_mode="reflect"), K.RandomHorizontalFlip(p=0.5))
    return lambda images: augment(images.float())


def time_per_batch(fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, repeats: int) -> float:
    """Median milliseconds per call, the device synchronised around each."""
    times = []
    for i in range(repeats + 3):
        if images.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn(images)
        if images.is_cuda:
            torch.cuda.synchronize()
        if i >= 3:  # warm-up calls are not counted
            times.append(time.perf_counter() - start)
    return 1e3 * sorted(times)[len(times) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", type=Path, default=Path("bench/out/augment.json"))
    args = parser.parse_args()
    images = torch.randint(0, 256, (args.batch, 3, 32, 32), dtype=torch.uint8, device=args.device)
    candidates = {"ours (gather + where)": ours, "torchvision v2, loop over images": torchvision_v2_loop()}
    kornia = kornia_batched()
    results = {name: time_per_batch(fn, images, args.repeats) for name, fn in candidates.items()}
    if kornia is not None:
        results["kornia (batched, float)"] = time_per_batch(kornia, images, args.repeats)
    print(f"Random crop (reflect, padding 4) + horizontal flip, batch {args.batch}, {args.device}:")
    for name, ms in results.items():
        print(f"  {name:<36}{ms:9.3f} ms/batch  {args.batch / ms * 1e3:12,.0f} images/s")
    if kornia is None:
        print("  kornia: not installed (pip install kornia), not measured")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"device": args.device, "batch": args.batch, "ms_per_batch": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
