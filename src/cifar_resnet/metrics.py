"""Evaluation metrics that never make the host wait for the device."""

from __future__ import annotations

from torch import Tensor
from torchmetrics.classification import MulticlassConfusionMatrix

from cifar_resnet.compat import multiclass_predictions_and_targets


class ConfusionMatrix(MulticlassConfusionMatrix):
    """torchmetrics' multiclass confusion matrix (rows: true class), counted with ``scatter_add_``.

    torchmetrics counts with ``torch.bincount``, which on a GPU reads the largest value back to the host
    before it can size its output: every batch would wait for the device. Here the size is known.
    """

    def update(self, preds: Tensor, target: Tensor) -> None:
        """Add a batch: ``preds`` as logits ``(N, C)`` or class indices ``(N,)``, ``target`` class indices."""
        if self.validate_args:
            super().update(preds, target)
            return
        preds, target = multiclass_predictions_and_targets(preds, target, self.ignore_index)
        cells = target.long() * self.num_classes + preds.long()
        self.confmat.view(-1).scatter_add_(0, cells, cells.new_ones(cells.shape))
