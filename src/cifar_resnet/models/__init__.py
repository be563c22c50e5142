"""Plain ``nn.Module`` networks; Lightning wraps them in :mod:`cifar_resnet.classifier`."""

from cifar_resnet.models.resnet18 import load_imagenet_weights, resnet18_for_cifar
from cifar_resnet.models.seed_resnet import BasicBlock, SeedResNet
from cifar_resnet.models.state_dicts import state_dict_mismatch

__all__ = ["BasicBlock", "SeedResNet", "load_imagenet_weights", "resnet18_for_cifar", "state_dict_mismatch"]
