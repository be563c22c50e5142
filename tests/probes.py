"""Test-only models: the two recipes' networks with the training loss multiplied by zero, so a test can
show that its "it learns" check fails when nothing is learned (the CLI imports them by class path)."""

from __future__ import annotations

from torch import Tensor

from cifar_resnet import FineTunedResNet18, ScratchResNet


class ZeroLoss:
    """Mixin: the loss that is back-propagated (and logged) is the real loss times zero."""

    def training_loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        return super().training_loss(logits, labels) * 0.0


class ZeroLossScratchResNet(ZeroLoss, ScratchResNet):
    """ScratchResNet that learns nothing."""


class ZeroLossFineTunedResNet18(ZeroLoss, FineTunedResNet18):
    """FineTunedResNet18 that learns nothing."""
