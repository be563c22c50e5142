"""Callbacks that log what plain metrics do not: speed, per-class figures, hyper-parameters with results."""

from __future__ import annotations

import time
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from matplotlib.figure import Figure
from torch import Tensor
from torchmetrics.classification import MulticlassConfusionMatrix

from cifar_resnet.figures import (
    class_accuracy_figure,
    confusion_matrix_figure,
    misclassified_figure,
    per_class_accuracy,
    superclass_accuracy,
    superclass_accuracy_figure,
)


class SpeedMonitor(Callback):
    """Logs ``train/epoch_time`` (s) and ``train/images_per_sec`` (all devices together) each epoch,
    and shows the running images/s of the epoch in the progress bar."""

    def __init__(self) -> None:
        self._start = 0.0
        self._images = 0

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._start, self._images = time.perf_counter(), 0

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._images += len(batch[1])
        elapsed = time.perf_counter() - self._start
        if trainer.progress_bar_callback is not None and elapsed > 0:
            rate = self._images * trainer.world_size / elapsed
            pl_module.log("img/s", float(round(rate)), prog_bar=True, logger=False, on_step=True, on_epoch=False)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - self._start
        pl_module.log("train/epoch_time", elapsed, sync_dist=True, reduce_fx="max")
        pl_module.log("train/images_per_sec", self._images * trainer.world_size / elapsed, sync_dist=True, reduce_fx="min")


def tensorboard(trainer: Trainer) -> TensorBoardLogger | None:
    """The trainer's TensorBoard logger, if it has one."""
    return next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)


def class_info(trainer: Trainer, num_classes: int) -> tuple[list[str], Tensor, list[str]]:
    """Class names, each class's superclass and the superclass names, from the DataModule's archive."""
    dataset = getattr(trainer.datamodule, "dataset", None)
    if dataset is None:  # another DataModule: number the classes, one group
        return [str(i) for i in range(num_classes)], torch.zeros(num_classes, dtype=torch.long), ["all"]
    return dataset.class_names, dataset.fine_to_coarse(), dataset.superclass_names


class ClassFigures(Callback):
    """Per-class pictures in TensorBoard's IMAGES tab, classes grouped by CIFAR-100's 20 superclasses.

    After each validation epoch: ``val/confusion_matrix`` and ``val/class_accuracy``. After testing,
    the same for ``test/`` plus ``test/superclass_accuracy`` and ``test/misclassified``, a grid of
    wrongly classified test images captioned with the true and predicted class. The confusion matrix
    is a torchmetrics metric, so it covers every process's images under DDP; figures are drawn by rank 0.
    """

    def __init__(self, every_n_epochs: int = 1, num_misclassified: int = 32) -> None:
        """
        Args:
            every_n_epochs: Draw the validation figures every this many epochs (and always after the last);
                drawing takes about a second.
            num_misclassified: Misclassified test images shown in the grid.
        """
        self.every_n_epochs = every_n_epochs
        self.num_misclassified = num_misclassified
        self.confusion: MulticlassConfusionMatrix | None = None
        self._wrong: list[tuple[Tensor, Tensor, Tensor]] = []
        self._wrong_count = 0

    def _start(self, pl_module: LightningModule) -> None:
        """A fresh confusion matrix on the module's device."""
        if self.confusion is None:
            self.confusion = MulticlassConfusionMatrix(pl_module.hparams.num_classes)
        self.confusion = self.confusion.to(pl_module.device)
        self.confusion.reset()

    def _draw_now(self, trainer: Trainer) -> bool:
        """Whether this validation epoch gets figures."""
        if trainer.sanity_checking:
            return False
        last = trainer.max_epochs is not None and trainer.current_epoch + 1 >= trainer.max_epochs
        return last or (trainer.current_epoch + 1) % self.every_n_epochs == 0

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start(pl_module)

    def on_validation_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if self._draw_now(trainer):
            self.confusion.update(outputs["logits"].argmax(dim=-1), batch[1])

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._draw_now(trainer):
            self._log_class_figures(trainer, pl_module, "val", self.confusion.compute())

    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start(pl_module)
        self._wrong, self._wrong_count = [], 0

    def on_test_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        images, labels = batch
        predicted = outputs["logits"].argmax(dim=-1)
        self.confusion.update(predicted, labels)
        if self._wrong_count < self.num_misclassified:
            wrong = (predicted != labels).nonzero().flatten()[: self.num_misclassified - self._wrong_count]
            self._wrong.append((self._displayable(trainer, images[wrong]), labels[wrong].cpu(), predicted[wrong].cpu()))
            self._wrong_count += len(wrong)

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        confusion = self.confusion.compute()
        self._log_class_figures(trainer, pl_module, "test", confusion)
        writer = tensorboard(trainer)
        if not trainer.is_global_zero or writer is None:
            return
        names, fine_to_coarse, super_names = class_info(trainer, pl_module.hparams.num_classes)
        exact, coarse = superclass_accuracy(confusion, fine_to_coarse, len(super_names))
        step = trainer.global_step
        title = "Test accuracy per superclass: exact class (dark) and right superclass (light)"
        self._add(writer, "test/superclass_accuracy", superclass_accuracy_figure(exact, coarse, super_names, title), step)
        if self._wrong_count:
            images, true, predicted = (torch.cat(parts) for parts in zip(*self._wrong))
            title = "Misclassified test images: true class → predicted class"
            figure = misclassified_figure(images, [names[i] for i in true], [names[i] for i in predicted], title)
            self._add(writer, "test/misclassified", figure, step)

    def _log_class_figures(self, trainer: Trainer, pl_module: LightningModule, stage: str, confusion: Tensor) -> None:
        """The confusion matrix and per-class accuracy of ``stage``, drawn and logged by rank 0."""
        writer = tensorboard(trainer)
        if not trainer.is_global_zero or writer is None:
            return
        names, fine_to_coarse, super_names = class_info(trainer, pl_module.hparams.num_classes)
        when = f"epoch {trainer.current_epoch}" if stage == "val" else "test split"
        images = int(confusion.sum())
        title = f"{stage} confusion matrix, {when}, {images} images (rows: true class, normalised; grouped by superclass)"
        self._add(writer, f"{stage}/confusion_matrix", confusion_matrix_figure(confusion, names, fine_to_coarse, super_names, title), trainer.global_step)
        title = f"{stage} accuracy per class, {when} (grouped and coloured by superclass)"
        accuracy = per_class_accuracy(confusion)
        self._add(writer, f"{stage}/class_accuracy", class_accuracy_figure(accuracy, names, fine_to_coarse, super_names, title), trainer.global_step)

    @staticmethod
    def _add(logger: TensorBoardLogger, tag: str, figure: Figure, step: int) -> None:
        logger.experiment.add_figure(tag, figure, global_step=step, close=True)

    @staticmethod
    def _displayable(trainer: Trainer, images: Tensor) -> Tensor:
        """Normalised model inputs back to uint8 pixels (the DataModule's transform knows mean and std)."""
        transform = getattr(trainer.datamodule, "transform", None)
        images = images.float()
        if transform is not None:
            images = images * transform.std.to(images.device) + transform.mean.to(images.device)
        else:
            images = (images - images.amin()) / (images.amax() - images.amin()).clamp(min=1e-6)
        return images.clamp(0, 1).mul(255).round().to(torch.uint8).cpu()


class HParamsSummary(Callback):
    """Puts the hyper-parameters and the run's final metrics in TensorBoard's HPARAMS tab.

    At the end of ``fit``: ``hp/best_<monitor>`` (the best checkpoint's score) and the last epoch's
    train/val metrics; at the end of ``test``: the test metrics. They are logged as ``hp/...`` scalars
    so that the training curves keep only real values. Needs the logger's ``default_hp_metric: false``
    (TensorBoard keeps the first metric list a run declares, and the default declares ``hp_metric``).
    """

    FIT_METRICS = ("train/loss_epoch", "train/top1", "train/top5", "val/loss", "val/top1", "val/top5")
    TEST_METRICS = ("test/loss", "test/top1", "test/top5")

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        metrics = self._pick(trainer, self.FIT_METRICS)
        checkpoint = trainer.checkpoint_callback
        score = getattr(checkpoint, "best_model_score", None)
        if score is not None:
            metrics[f"hp/best_{checkpoint.monitor.replace('/', '_')}"] = float(score)
        self._log(trainer, pl_module, metrics)

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._log(trainer, pl_module, self._pick(trainer, self.TEST_METRICS))

    @staticmethod
    def _pick(trainer: Trainer, names: tuple[str, ...]) -> dict[str, float]:
        """The named metrics that were logged, renamed ``hp/<stage>_<name>``."""
        found = trainer.callback_metrics
        return {"hp/" + name.replace("/", "_").removesuffix("_epoch"): float(found[name]) for name in names if name in found}

    @staticmethod
    def _log(trainer: Trainer, pl_module: LightningModule, metrics: dict[str, float]) -> None:
        """Write the module's and DataModule's hyper-parameters with ``metrics`` (rank 0)."""
        logger = tensorboard(trainer)
        if not trainer.is_global_zero or logger is None or not metrics:
            return
        params = dict(pl_module.hparams_initial)
        if trainer.datamodule is not None:
            params.update(trainer.datamodule.hparams_initial)
        logger.log_hyperparams(params, metrics=metrics, step=trainer.global_step)
        logger.experiment.flush()
