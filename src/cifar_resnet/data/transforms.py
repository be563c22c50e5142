"""Augmentation, normalisation and resizing of whole uint8 batches, on whatever device they are on."""

from __future__ import annotations

import math
import reprlib
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
MAX_OUTPUT_SIZE = 1024


def input_settings_problem(mean: Any, std: Any, output_size: Any) -> str | None:
    """What is wrong with the input settings (the config's ``data.mean``, ``data.std``, ``data.output_size``, or
    those a checkpoint carries), in a sentence; ``None`` when they can normalise and resize images."""

    def numbers(value: Any) -> bool:
        return (
            isinstance(value, (list, tuple)) and len(value) == 3
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
        )  # fmt: skip

    if not numbers(mean):
        return f"mean must be 3 finite numbers (one per channel R, G, B), got {reprlib.repr(mean)}."
    if not numbers(std) or min(std) <= 0:
        return f"std must be 3 finite numbers greater than 0 (one per channel R, G, B), got {reprlib.repr(std)}."
    if not isinstance(output_size, int) or isinstance(output_size, bool) or output_size < 1:
        return f"output_size must be a positive integer, got {reprlib.repr(output_size)}."
    if output_size > MAX_OUTPUT_SIZE:
        return f"output_size must be at most {MAX_OUTPUT_SIZE} (ImageNet models take 224), got {output_size}."
    return None


def random_flips(images: Tensor, hflip_prob: float, vflip_prob: float) -> Tensor:
    """Flip each image of an ``(N, C, H, W)`` batch left-right and/or upside-down, independently."""
    n = images.shape[0]
    hflip = torch.rand(n, device=images.device) < hflip_prob
    vflip = torch.rand(n, device=images.device) < vflip_prob
    return flip_by_mask(images, hflip, vflip)


def flip_by_mask(images: Tensor, hflip: Tensor, vflip: Tensor) -> Tensor:
    """Flip the images where the boolean ``(N,)`` masks say so, without ``nonzero()``, which would
    make the host wait for the device every batch."""
    shape = (images.shape[0], 1, 1, 1)
    images = torch.where(hflip.view(shape), images.flip(-1), images)
    return torch.where(vflip.view(shape), images.flip(-2), images)


def reflect_index(size: int, padding: int, offsets: Tensor) -> Tensor:
    """Source rows (or columns) of ``size``-long windows starting at ``offsets`` in a reflect-padded axis.

    Row ``k`` of the axis padded by ``padding`` on each side is row ``k - padding`` of the original,
    mirrored at the edges without repeating them (``padding_mode="reflect"``): -1 -> 1, size -> size - 2.
    Returns an ``(N, size)`` index tensor.
    """
    k = offsets.view(-1, 1) + torch.arange(size, device=offsets.device) - padding
    k = k.abs()
    return torch.where(k >= size, 2 * (size - 1) - k, k)


def random_crops(images: Tensor, padding: int, offsets: Tensor | None = None) -> Tensor:
    """Crop each image of an ``(N, C, H, W)`` batch at its own random offset from its reflect-padded copy.

    The same as torchvision's ``RandomCrop((H, W), padding, padding_mode="reflect")`` on each image,
    i.e. a random translation by up to ``padding`` pixels with mirrored borders, done as one gather for
    the whole batch on its device. ``offsets`` (``(N, 2)``: top, left in ``[0, 2 * padding]``) are drawn
    when not given.
    """
    if padding == 0:
        return images
    n, c, h, w = images.shape
    if offsets is None:
        offsets = torch.randint(0, 2 * padding + 1, (n, 2), device=images.device)
    rows = reflect_index(h, padding, offsets[:, 0])  # (N, H)
    cols = reflect_index(w, padding, offsets[:, 1])  # (N, W)
    batch = torch.arange(n, device=images.device).view(n, 1, 1, 1)
    channel = torch.arange(c, device=images.device).view(1, c, 1, 1)
    return images[batch, channel, rows.view(n, 1, h, 1), cols.view(n, 1, 1, w)]


class BatchTransform(nn.Module):
    """uint8 ``(N, 3, 32, 32)`` -> normalised float ``(N, 3, S, S)``; random crops and flips only in training.

    Matches torchvision's ``RandomCrop(32, crop_padding, padding_mode="reflect")`` ->
    ``RandomHorizontalFlip``/``RandomVerticalFlip`` -> ``ToTensor`` ->
    ``Normalize`` -> ``Resize(S)`` on each image, but runs once per batch on the batch's device.
    Normalising before resizing gives the same result because bilinear resizing is affine.
    """

    def __init__(
        self,
        mean: Sequence[float] = CIFAR100_MEAN,
        std: Sequence[float] = CIFAR100_STD,
        output_size: int = 32,
        hflip_prob: float = 0.0,
        vflip_prob: float = 0.0,
        crop_padding: int = 0,
    ) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.output_size = output_size
        self.hflip_prob = hflip_prob
        self.vflip_prob = vflip_prob
        self.crop_padding = crop_padding

    def forward(self, images: Tensor, train: bool = False) -> Tensor:
        """Transform one batch; ``train`` turns the random crops and flips on."""
        if train:
            images = random_crops(images, self.crop_padding)
            images = random_flips(images, self.hflip_prob, self.vflip_prob)
        x = images.to(torch.float32, copy=True).div_(255).sub_(self.mean).div_(self.std)
        if x.shape[-1] != self.output_size or x.shape[-2] != self.output_size:
            size = (self.output_size, self.output_size)
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        return x
