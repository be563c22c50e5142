"""cifar-resnet: train and evaluate ResNets on CIFAR-100 with PyTorch Lightning."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("cifar-resnet")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "unknown"

from cifar_resnet.classifier import FineTunedResNet18, ImageClassifier, ScratchResNet
from cifar_resnet.data import CIFAR100DataModule

__all__ = ["CIFAR100DataModule", "FineTunedResNet18", "ImageClassifier", "ScratchResNet"]
