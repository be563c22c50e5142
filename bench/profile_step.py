"""Diagnosis (not a test): where one bare training step of the seed network spends its time.

Runs the plain PyTorch step (forward, loss, backward, optimizer step) of ``ScratchResNet`` under
``torch.profiler`` and prints the operators by device time and by host time, plus the wall time per
step, so a slow step can be told apart as device-bound (kernels) or host-bound (launches, syncs).

    python bench/profile_step.py --batch 512 --optimizer sgd --channels-last
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

from cifar_resnet.models import SeedResNet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rows", type=int, default=15)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.backends.cudnn.benchmark = True
    net = SeedResNet().to(device)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    net = net.to(memory_format=fmt)
    if args.optimizer == "sgd":
        optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    else:
        optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    images = torch.randn(args.batch, 3, 32, 32, device=device).contiguous(memory_format=fmt)
    labels = torch.randint(0, 100, (args.batch,), device=device)

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = F.cross_entropy(net(images), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(5):
        step()
    sync()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    sync()
    wall = (time.perf_counter() - start) / args.steps
    print(f"{args.device}, batch {args.batch}, {args.optimizer}, channels_last={args.channels_last}: "
          f"{1e3 * wall:.2f} ms/step, {args.batch / wall:,.0f} images/s")  # fmt: skip
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(5):
            step()
        sync()
    events = prof.key_averages()
    if device.type == "cuda":
        print(events.table(sort_by="self_cuda_time_total", row_limit=args.rows, max_name_column_width=60))
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
