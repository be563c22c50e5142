"""The order of an epoch's training images: a fixed function of (seed, epoch), the same on any device."""

from __future__ import annotations

import torch
from torch import Tensor

_MASK = 0xFFFFFFFF


def _mix32(x: Tensor | int) -> Tensor | int:
    """A 32-bit integer hash (Wellons' "lowbias32") of a Python int or of each element of an int64 tensor,
    for values below 2**32.

    Products are taken in int64 and masked, so Python, CPU and CUDA give bit-identical results.
    """
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK
    return x ^ (x >> 16)


def epoch_order(size: int, seed: int, epoch: int, device: torch.device | str = "cpu") -> Tensor:
    """A permutation of ``range(size)`` drawn from ``(seed, epoch)``, computed on ``device``.

    Each position gets a hash of (seed, epoch, position) as its sort key; a stable sort of the keys is
    the order. Nothing here depends on the device's random generator, so the order on a GPU equals the
    order on the CPU, and it costs one small kernel per epoch instead of an index list sent every batch.
    """
    # The epoch's key is a Python int: a scalar argument of the kernels, not a tensor to copy to the device.
    key = _mix32((_mix32(seed & _MASK) ^ (epoch * 0x9E3779B1)) & _MASK)
    positions = torch.arange(size, dtype=torch.int64, device=device)
    keys = _mix32(_mix32(positions ^ key) ^ ((key * 0x85EBCA6B) & _MASK))
    return torch.sort(keys, stable=True).indices
