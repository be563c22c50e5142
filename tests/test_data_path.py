"""The batch path: slicing, DDP sharding through Lightning's sampler swap, and data_on_device."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.utilities.data import _update_dataloader
from torch.utils.data import DistributedSampler

from cifar_resnet.data import CIFAR100DataModule
from cifar_resnet.data.datamodule import TensorBatches


def test_a_batch_is_one_slice_of_the_split() -> None:
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 3, 32, 32).contiguous()
    batch_images, batch_labels = TensorBatches(images, torch.arange(10)).__getitems__([7, 2, 2, 9])
    assert batch_labels.tolist() == [7, 2, 2, 9]
    assert batch_images[:, 0, 0, 0].tolist() == [7, 2, 2, 9] and batch_images.shape == (4, 3, 32, 32)


def test_each_ddp_rank_reads_its_own_shard(cifar_dir: Path) -> None:
    dm = CIFAR100DataModule(data_dir=str(cifar_dir), val_size=100, batch_size=50)
    dm.setup("fit")
    loader = dm.train_dataloader()
    seen = []
    for rank in range(2):
        # What Lightning does to our DataLoader under DDP: same loader, a DistributedSampler.
        sampler = DistributedSampler(loader.dataset, num_replicas=2, rank=rank, shuffle=True, seed=0)
        sharded = _update_dataloader(loader, sampler)
        images, labels = zip(*sharded)
        assert all(i.dtype == torch.uint8 and len(i) == len(l) for i, l in zip(images, labels))
        seen.append(torch.cat(labels))
        assert len(seen[-1]) == 250
    # The two shards are disjoint and together cover the training split exactly once.
    indices = [list(DistributedSampler(loader.dataset, num_replicas=2, rank=r, seed=0)) for r in range(2)]
    assert not set(indices[0]) & set(indices[1]) and len(set(indices[0]) | set(indices[1])) == 500
    train_labels = dm.splits["train"].labels
    for rank in range(2):
        assert torch.equal(seen[rank], train_labels[indices[rank]])


def test_data_on_device_keeps_the_splits_on_the_trainers_device(cifar_dir: Path) -> None:
    # No GPU here: the "meta" device stands in for one (tensors there have shapes, no storage).
    dm = CIFAR100DataModule(data_dir=str(cifar_dir), val_size=100, batch_size=50, data_on_device=True)
    meta = SimpleNamespace(root_device=torch.device("meta"))
    dm.trainer = SimpleNamespace(strategy=meta, training=True, world_size=1, global_rank=0)
    dm.setup("fit")
    assert {split.images.device.type for split in dm.splits.values()} == {"meta"}
    loader = dm.train_dataloader()
    images, labels = next(iter(loader))
    assert images.device.type == labels.device.type == "meta" and images.shape == (50, 3, 32, 32)
    assert not loader.pin_memory


def test_pinned_memory_only_when_copying_to_a_gpu(cifar_dir: Path) -> None:
    dm = CIFAR100DataModule(data_dir=str(cifar_dir), val_size=100)
    dm.setup("fit")
    dm.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cuda", 0)))
    assert dm.train_dataloader().pin_memory
    dm.trainer = Trainer(accelerator="cpu", devices=1, logger=False)
    assert not dm.train_dataloader().pin_memory
    with pytest.raises(Exception, match="num_workers: 0"):
        CIFAR100DataModule(data_dir=str(cifar_dir), data_on_device=True, num_workers=2)
