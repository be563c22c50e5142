"""cifar-resnet: train and evaluate ResNets on CIFAR-100 with PyTorch Lightning."""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from typing import Any

try:
    __version__ = version("cifar-resnet")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "unknown"

# Imported when first used (PEP 562), so that `cifar-resnet --version` answers without importing torch.
_EXPORTS = {
    "CIFAR100DataModule": "cifar_resnet.data",
    "FineTunedResNet18": "cifar_resnet.classifier",
    "ImageClassifier": "cifar_resnet.classifier",
    "ScratchResNet": "cifar_resnet.classifier",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'cifar_resnet' has no attribute {name!r}")
