"""CIFAR-100 data: the archive reader, batched on-device transforms and the DataModule."""

from cifar_resnet.data.datamodule import CIFAR100DataModule

__all__ = ["CIFAR100DataModule"]
