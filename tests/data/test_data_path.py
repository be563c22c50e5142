"""The batch path: slicing, DDP sharding through Lightning's own sampler injection, and data_on_device."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.fabric.utilities.data import _set_sampler_epoch
from lightning.fabric.utilities.distributed import DistributedSamplerWrapper
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.trainer.states import RunningStage
from torch.utils.data import DataLoader

from cifar_resnet.data import CIFAR100DataModule
from cifar_resnet.data.datamodule import EpochShuffle, TensorBatches


def test_a_batch_is_one_slice_of_the_split() -> None:
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 3, 32, 32).contiguous()
    batch_images, batch_labels = TensorBatches(images, torch.arange(10)).__getitems__([7, 2, 2, 9])
    assert batch_labels.tolist() == [7, 2, 2, 9]
    assert batch_images[:, 0, 0, 0].tolist() == [7, 2, 2, 9] and batch_images.shape == (4, 3, 32, 32)


def lightning_sharded_loader(dm: CIFAR100DataModule, rank: int) -> DataLoader:
    """The training loader as Lightning hands it to DDP process ``rank`` of 2: Lightning itself injects the
    distributed sampler, as it does in ``fit`` (no processes are started). Setting the rank also sets
    Lightning's global ``rank_zero_only.rank``: the test puts it back afterwards."""
    trainer = Trainer(accelerator="cpu", devices=2, strategy="ddp", logger=False, enable_progress_bar=False)
    trainer.strategy.cluster_environment.set_global_rank(rank)
    dm.trainer = trainer
    return trainer._data_connector._prepare_dataloader(dm.train_dataloader(), shuffle=True, mode=RunningStage.TRAINING)


def test_each_ddp_rank_reads_its_own_shard_of_the_epoch_order(cifar_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rank_zero_only, "rank", rank_zero_only.rank)  # restored after the test
    dm = CIFAR100DataModule(data_dir=str(cifar_dir), val_size=100, batch_size=50)
    dm.setup("fit")
    loaders = [lightning_sharded_loader(dm, rank) for rank in range(2)]
    for loader in loaders:
        # Lightning wraps the project's sampler (it keeps the per-epoch order) rather than replacing it.
        assert isinstance(loader.sampler, DistributedSamplerWrapper)
        assert isinstance(loader.sampler.dataset._sampler, EpochShuffle)
    train_labels = dm.splits["train"].labels
    orders = []
    for epoch in range(2):
        shards = []
        for loader in loaders:
            _set_sampler_epoch(loader, epoch)  # what the fit loop does before each epoch
            indices = list(loader.sampler)
            images, labels = zip(*loader)
            assert all(i.dtype == torch.uint8 and len(i) == len(l) for i, l in zip(images, labels))
            assert torch.equal(torch.cat(labels), train_labels[indices])
            shards.append(indices)
        # The two shards are disjoint and together cover the training split exactly once.
        assert len(shards[0]) == len(shards[1]) == 250
        assert not set(shards[0]) & set(shards[1]) and len(set(shards[0]) | set(shards[1])) == 500
        orders.append(shards)
    assert orders[0] != orders[1], "each epoch has a new order"
    assert rank_zero_only.rank == 1, "the last loader was process 1's (put back to 0 after the test)"


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
