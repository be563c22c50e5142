"""The CIFAR-100 LightningDataModule: whole splits in memory as uint8, batches by slicing."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from cifar_resnet.data.archive import (
    NUM_CLASSES,
    NUM_SUPERCLASSES,
    Cifar100,
    Split,
    download_archive,
    find_archive,
    load_cifar100,
    missing_data_message,
    name_list_problem,
)
from cifar_resnet.data.images import read_images
from cifar_resnet.data.order import epoch_order
from cifar_resnet.data.transforms import CIFAR100_MEAN, CIFAR100_STD, BatchTransform, input_settings_problem
from cifar_resnet.errors import UserError


class TensorBatches(Dataset):
    """Images and labels held as tensors; a batch is one slice (``__getitems__``), not N lookups.

    With a :class:`DeviceShuffle` sampler, the indices a batch receives are positions in that
    sampler's on-device order, turned into rows on the device.
    """

    def __init__(self, images: Tensor, labels: Tensor, order: DeviceShuffle | None = None) -> None:
        self.images = images
        self.labels = labels
        self.order = order

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor]:
        images, labels = self.__getitems__([index])
        return images[0], labels[0]

    def __getitems__(self, indices: list[int]) -> tuple[Tensor, Tensor]:
        index = _index_tensor(indices, self.labels.device)
        if self.order is not None:  # positions in the epoch's order; those past the end pad a DDP shard
            index = self.order.rows().index_select(0, index.remainder(len(self.labels)))
        # index_select copies whole rows; advanced indexing (images[index]) is ~20x slower on CPU.
        return self.images.index_select(0, index), self.labels.index_select(0, index)


def _index_tensor(indices: list[int], device: torch.device) -> Tensor:
    """``indices`` as a tensor on ``device``; an evenly spaced run (a batch of positions, also a DDP
    rank's strided share of them) is made there by ``arange``, without a copy from the host."""
    if len(indices) > 1:
        start, step = indices[0], indices[1] - indices[0]
        if step > 0 and indices == list(range(start, start + step * len(indices), step)):
            return torch.arange(start, start + step * len(indices), step, device=device)
    return torch.as_tensor(indices).to(device, non_blocking=True)


class EpochShuffle(Sampler[int]):
    """A new random order each epoch, fixed by ``(seed, epoch)`` (:func:`epoch_order`), so a resumed run
    sees the same batches.

    Lightning calls :meth:`set_epoch` before every epoch (as for ``DistributedSampler``); under DDP it
    wraps this sampler and gives each process its share of the same order.
    """

    def __init__(self, size: int, seed: int = 0) -> None:
        self.size = size
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the order of ``epoch``."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        return iter(epoch_order(self.size, self.seed, self.epoch).tolist())

    def __len__(self) -> int:
        return self.size


class DeviceShuffle(DistributedSampler):
    """This process's share of an epoch's order that is computed and kept on the device holding the data.

    The order is :func:`epoch_order` of ``(seed, epoch)``, as for :class:`EpochShuffle`, so both give the
    same batches. This sampler hands out positions in that order, ``rank, rank + W, ...`` for rank
    ``rank`` of ``W`` processes (padded as ``DistributedSampler`` pads), which :class:`TensorBatches`
    turns into rows on the device: no index list crosses from the host, whose copy would make the host
    wait for the device each batch. Being a ``DistributedSampler``, Lightning does not wrap it again.
    """

    def __init__(self, size: int, seed: int, device: torch.device, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(range(size), num_replicas=num_replicas, rank=rank, shuffle=False, seed=seed)
        self.size = size
        self.device = device
        self._rows: tuple[int, Tensor] | None = None

    def rows(self) -> Tensor:
        """This epoch's order, on the device (computed once per epoch)."""
        if self._rows is None or self._rows[0] != self.epoch:
            self._rows = (self.epoch, epoch_order(self.size, self.seed, self.epoch, self.device))
        return self._rows[1]

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.total_size, self.num_replicas))


def keep_batch(batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """Collate function for :class:`TensorBatches`: the slice already is the batch."""
    return batch


MAX_WORKERS = 64  # DataLoader worker processes; more would only start processes that wait


class CIFAR100DataModule(LightningDataModule):
    """CIFAR-100 from the official archive, with flips, normalisation and resizing done on the device."""

    def __init__(
        self,
        data_dir: str = "data",
        download: bool = False,
        batch_size: int = 100,
        eval_batch_size: int | None = None,
        val_size: int = 5000,
        split_seed: int = 0,
        hflip_prob: float = 0.2,
        vflip_prob: float = 0.2,
        crop_padding: int = 0,
        mean: tuple[float, float, float] = CIFAR100_MEAN,
        std: tuple[float, float, float] = CIFAR100_STD,
        output_size: int = 32,
        num_workers: int = 0,
        data_on_device: bool = False,
        drop_last: bool = False,
        predict_path: str | None = None,
    ) -> None:
        """
        Args:
            data_dir: Folder holding ``cifar-100-python/`` (extracted) or ``cifar-100-python.tar.gz``.
            download: Fetch the official archive into ``data_dir`` if it is not there (checks the md5).
            batch_size: Training batch size (per device).
            eval_batch_size: Batch size for validation, test and predict; defaults to ``batch_size``.
            val_size: Training images held out for validation, chosen with ``split_seed``. With 0, all
                50,000 images train (as the seed did) and validation runs on the test split.
            split_seed: Seed of the train/validation split; fixed so runs are comparable.
            hflip_prob: Probability of a horizontal flip per training image.
            vflip_prob: Probability of a vertical flip per training image.
            crop_padding: Random translation of each training image by up to this many pixels, with
                mirrored borders (torchvision's ``RandomCrop(32, crop_padding, padding_mode="reflect")``);
                0: none. Done on the device, a different offset per image.
            mean: Per-channel mean for normalisation (train and test).
            std: Per-channel standard deviation for normalisation (train and test).
            output_size: Side of the images the model sees: 32, or 224 for ImageNet fine-tuning.
            num_workers: DataLoader worker processes; 0 is right, since a batch is one slice in memory.
            data_on_device: Keep the uint8 splits in accelerator memory (about 180 MB), so batches are
                sliced there and nothing crosses the host link while training. Each DDP process holds
                its own copy and still reads only its shard. The epoch's order is then drawn on the device too.
            drop_last: Drop the last, smaller training batch of each epoch (a different set of images each
                epoch). With ``compile``, every batch then has one shape, so nothing is compiled twice.
            predict_path: An image file or a folder of images (PNG, JPEG) for ``predict``; each is centre-cropped
                to a square and resized to 32x32 like CIFAR, then transformed like the test images. Without
                it, ``predict`` runs on the test split. Predicting on files needs no CIFAR-100 archive: the
                checkpoint holds the class names and the input settings.
        """
        super().__init__()
        self.save_hyperparameters()
        if not 0 <= hflip_prob <= 1 or not 0 <= vflip_prob <= 1:
            raise UserError(f"Flip probabilities must lie in [0, 1], got hflip_prob={hflip_prob}, vflip_prob={vflip_prob}.")
        if batch_size < 1 or (eval_batch_size is not None and eval_batch_size < 1) or output_size < 1:
            raise UserError("batch_size, eval_batch_size and output_size must be positive integers.")
        if crop_padding < 0 or crop_padding >= 32:
            raise UserError(f"crop_padding must lie in [0, 31] (pixels of a 32x32 image), got {crop_padding}.")
        if val_size < 0:
            raise UserError(f"val_size must be 0 or more, got {val_size}.")
        problem = input_settings_problem(mean, std, output_size)
        if problem:
            raise UserError(problem)
        if num_workers < 0:
            raise UserError(f"num_workers must be 0 or more, got {num_workers}.")
        if num_workers > MAX_WORKERS:  # each is a process
            raise UserError(f"num_workers must lie in [0, {MAX_WORKERS}] (0 is right: a batch is one slice in memory), got {num_workers}.")
        if data_on_device and num_workers:
            raise UserError("data_on_device: true needs num_workers: 0 (worker processes cannot slice GPU tensors).")
        self.data_dir = Path(data_dir)
        self.transform = self._make_transform()
        self.dataset: Cifar100 | None = None
        self.splits: dict[str, Split] = {}
        self.predict_names: list[str] = []
        self._classes: ClassInfo | None = None  # from a checkpoint, else read from the archive on first use
        # Set by a module whose training step applies `transform` itself (inside a captured step).
        self.transform_in_step = False

    # The data questions a reader of results asks (callbacks, reports, the prediction writer).

    @property
    def class_names(self) -> list[str]:
        """The fine class names, in label order."""
        return self._class_info().names

    @property
    def superclass_names(self) -> list[str]:
        """The superclass (CIFAR-100 "coarse" class) names, in label order."""
        return self._class_info().superclass_names

    @property
    def fine_to_coarse(self) -> Tensor:
        """The superclass index of each class, ``(num_classes,)`` long."""
        return torch.tensor(self._class_info().fine_to_coarse)

    def displayable(self, images: Tensor) -> Tensor:
        """Model inputs (normalised, maybe resized) back to uint8 pixels on the CPU, for pictures."""
        images = images.float()
        mean, std = self.transform.mean.to(images.device), self.transform.std.to(images.device)
        return (images * std + mean).clamp(0, 1).mul(255).round().to(torch.uint8).cpu()

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint needs to predict without the archive: class names and the input settings."""
        info = self._class_info()
        return {
            "class_names": info.names,
            "superclass_names": info.superclass_names,
            "fine_to_coarse": info.fine_to_coarse,
            "transform": {key: self.hparams[key] for key in TRANSFORM_SETTINGS},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Take the class names and input settings of the checkpoint's model (they win over the config's)."""
        problem = checkpoint_state_problem(state_dict)
        if problem:  # read_checkpoint checks it first; a checkpoint read another way is checked here
            raise UserError(f"The checkpoint being loaded is damaged or was not written by this program: {problem}.")
        if "class_names" in state_dict:
            self._classes = ClassInfo(
                list(state_dict["class_names"]), list(state_dict["superclass_names"]), list(state_dict["fine_to_coarse"])
            )
        settings = state_dict.get("transform", {})
        changed = {k: (self.hparams[k], v) for k, v in settings.items() if k in TRANSFORM_SETTINGS and _differs(self.hparams[k], v)}
        if changed:
            rank_zero_info(
                "Using the checkpoint's input settings, which the model was trained with: "
                + ", ".join(f"data.{k} {new} (config: {old})" for k, (old, new) in changed.items())
            )
            for key, (_, value) in changed.items():
                self.hparams[key] = value
            self.transform = self._make_transform()

    def _make_transform(self) -> BatchTransform:
        """The batch transform of the current settings."""
        h = self.hparams
        return BatchTransform(h.mean, h.std, h.output_size, h.hflip_prob, h.vflip_prob, h.crop_padding)

    def _class_info(self) -> ClassInfo:
        """Class names and superclass map: the checkpoint's, else the archive's."""
        if self._classes is None:
            data = self._data()
            self._classes = ClassInfo(data.class_names, data.superclass_names, data.fine_to_coarse().tolist())
        return self._classes

    def _predicting_files(self) -> bool:
        """Whether this is ``predict`` on image files, which needs no archive."""
        return self.trainer is not None and self.trainer.state.fn == "predict" and self.hparams.predict_path is not None

    def prepare_data(self) -> None:
        """Download the archive (once per node) if asked to and it is missing (not for predicting on files)."""
        if self.hparams.download and not self._predicting_files() and find_archive(self.data_dir) is None:
            download_archive(self.data_dir)

    def setup(self, stage: str | None = None) -> None:
        """Read the archive and split off the validation images (for ``predict`` on files: read the files)."""
        if stage == "predict":
            if "predict" not in self.splits:
                self._setup_predict()
            return
        data = self._data()
        if "train" in self.splits:
            return
        train = data.train
        val_size = self.hparams.val_size
        if val_size >= len(train.labels):
            raise UserError(f"val_size={val_size} leaves no training images (the train split has {len(train.labels)}).")
        if val_size:
            order = torch.randperm(len(train.labels), generator=torch.Generator().manual_seed(self.hparams.split_seed))
            held, kept = order[:val_size], order[val_size:]
            self.splits["val"] = _subset(train, held)
            self.splits["train"] = _subset(train, kept)
        else:
            self.splits["train"] = train
            self.splits["val"] = data.test
        self.splits["test"] = data.test
        if self.hparams.data_on_device and self.trainer is not None:
            device = self.trainer.strategy.root_device
            self.splits = {name: _to(split, device) for name, split in self.splits.items()}

    def _setup_predict(self) -> None:
        """The images to predict on: the files at ``predict_path``, or the test split; and their names."""
        if self.hparams.predict_path is None:
            data = self._data()
            self.splits["predict"] = data.test
            self.predict_names = [f"test[{i}]" for i in range(len(data.test.labels))]
            return
        self.predict_names, images = read_images(Path(self.hparams.predict_path))
        unknown = torch.full((len(images),), -1, dtype=torch.long)
        self.splits["predict"] = Split(images, unknown, unknown)

    def _data(self) -> Cifar100:
        """The archive, read on first use."""
        if self.dataset is None:
            source = find_archive(self.data_dir)
            if source is None:
                raise UserError(missing_data_message(self.data_dir))
            self.dataset = load_cifar100(source)
        return self.dataset

    def _loader(self, split: str, train: bool = False) -> DataLoader:
        """A DataLoader that slices batches out of the in-memory split."""
        data = self.splits[split]
        on_gpu = self.trainer is not None and self.trainer.strategy.root_device.type == "cuda"
        # The run's seed (seed_everything), as Lightning's DistributedSampler uses it.
        seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
        sampler = None
        if train and self.hparams.data_on_device:
            world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer is not None else (1, 0)
            sampler = DeviceShuffle(len(data.labels), seed, data.images.device, world, rank)
        elif train:
            sampler = EpochShuffle(len(data.labels), seed)
        return DataLoader(
            TensorBatches(data.images, data.labels, sampler if isinstance(sampler, DeviceShuffle) else None),
            batch_size=self.hparams.batch_size if train else (self.hparams.eval_batch_size or self.hparams.batch_size),
            sampler=sampler,
            # Its own generator keeps the loader from drawing on the global one, which a checkpoint restores.
            generator=torch.Generator().manual_seed(seed),
            drop_last=train and self.hparams.drop_last,
            collate_fn=keep_batch,
            num_workers=self.hparams.num_workers,
            pin_memory=on_gpu and data.images.device.type == "cpu",
            persistent_workers=self.hparams.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches."""
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        """Validation batches (the held-out images, or the test split when ``val_size`` is 0)."""
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        """Test split batches."""
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        """Batches of the ``predict_path`` images, or of the test split without it."""
        return self._loader("predict")

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Flip (training only), normalise and resize the uint8 batch on its device (training batches stay
        uint8 when the module's step transforms them itself: ``transform_in_step``)."""
        images, labels = batch
        self.transform.to(images.device)
        training = self.trainer is not None and self.trainer.training
        if training and self.transform_in_step:
            return images, labels
        return self.transform(images, train=training), labels


TRANSFORM_SETTINGS = ("mean", "std", "output_size")
DEFAULT_INPUT = {"mean": CIFAR100_MEAN, "std": CIFAR100_STD, "output_size": 32}  # for a setting a checkpoint lacks


def checkpoint_state_problem(state: Any) -> str | None:
    """What in a checkpoint's DataModule part (what :meth:`CIFAR100DataModule.state_dict` wrote) no checkpoint of
    this program has, in a phrase; ``None``: nothing. The input settings pass the config's own checks."""
    if not isinstance(state, dict):
        return f"its data settings are a {type(state).__name__}"
    if "class_names" in state:
        for key, count in (("class_names", NUM_CLASSES), ("superclass_names", NUM_SUPERCLASSES)):
            problem = name_list_problem(state.get(key), count)
            if problem:
                return f"its {key} {problem}"
        mapping = state.get("fine_to_coarse")
        # -1: a class without images in the archive the run trained on (a subset of CIFAR-100).
        if type(mapping) is not list or len(mapping) != NUM_CLASSES or not all(type(v) is int and -1 <= v < NUM_SUPERCLASSES for v in mapping):
            return f"its fine_to_coarse is not {NUM_CLASSES} superclass indices in [0, {NUM_SUPERCLASSES - 1}] (or -1, a class without images)"
    settings = state.get("transform", {})
    if not isinstance(settings, dict) or not set(settings) <= set(TRANSFORM_SETTINGS):
        return f"its input settings are not {', '.join(TRANSFORM_SETTINGS)}"
    if settings:
        problem = input_settings_problem(*(settings.get(k, DEFAULT_INPUT[k]) for k in TRANSFORM_SETTINGS))
        if problem:
            return f"its input settings are out of range ({problem.rstrip('.')})"
    return None


@dataclass
class ClassInfo:
    """Class names, superclass names and each class's superclass index."""

    names: list[str]
    superclass_names: list[str]
    fine_to_coarse: list[int]


def _differs(a: Any, b: Any) -> bool:
    """Whether two settings differ (tuples and lists of the same values are equal)."""
    return list(a) != list(b) if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) else a != b


def _subset(split: Split, index: Tensor) -> Split:
    """The images of ``split`` at ``index``."""
    return Split(split.images[index], split.labels[index], split.coarse_labels[index])


def _to(split: Split, device: torch.device) -> Split:
    """``split`` moved to ``device``."""
    return Split(split.images.to(device), split.labels.to(device), split.coarse_labels.to(device))
