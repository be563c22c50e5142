"""cifar-resnet: train and evaluate ResNets on CIFAR-100 with PyTorch Lightning."""

from cifar_resnet.classifier import FineTunedResNet18, ImageClassifier, ScratchResNet
from cifar_resnet.data import CIFAR100DataModule

__all__ = ["CIFAR100DataModule", "FineTunedResNet18", "ImageClassifier", "ScratchResNet"]
