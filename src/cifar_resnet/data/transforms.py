"""Augmentation, normalisation and resizing of whole uint8 batches, on whatever device they are on."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)


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


class BatchTransform(nn.Module):
    """uint8 ``(N, 3, 32, 32)`` -> normalised float ``(N, 3, S, S)``; random flips only in training.

    Matches torchvision's ``RandomHorizontalFlip``/``RandomVerticalFlip`` -> ``ToTensor`` ->
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
    ) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.output_size = output_size
        self.hflip_prob = hflip_prob
        self.vflip_prob = vflip_prob

    def forward(self, images: Tensor, train: bool = False) -> Tensor:
        """Transform one batch; ``train`` turns the random flips on."""
        if train:
            images = random_flips(images, self.hflip_prob, self.vflip_prob)
        x = images.to(torch.float32, copy=True).div_(255).sub_(self.mean).div_(self.std)
        if x.shape[-1] != self.output_size or x.shape[-2] != self.output_size:
            size = (self.output_size, self.output_size)
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        return x
