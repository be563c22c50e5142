"""Per-class figures (confusion matrix, class and superclass accuracy, misclassified images), drawn off
the training thread and delivered to every logger that takes images."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from matplotlib.figure import Figure
from torch import Tensor

from cifar_resnet.drawing import BackgroundWorker, FigureSink, deliver, figure_sinks
from cifar_resnet.errors import UserError
from cifar_resnet.figures import (
    class_accuracy_figure,
    confusion_matrix_figure,
    misclassified_figure,
    per_class_accuracy,
    superclass_accuracy,
    superclass_accuracy_figure,
)


def data_questions(trainer: Trainer) -> Any:
    """The DataModule, which answers the figures' questions (class names, superclasses, displayable images)."""
    datamodule = trainer.datamodule
    if not all(hasattr(datamodule, name) for name in ("class_names", "superclass_names", "fine_to_coarse", "displayable")):
        raise UserError(
            f"{type(datamodule).__name__} cannot name its classes: the figures and reports need a DataModule with "
            "class_names, superclass_names, fine_to_coarse and displayable(), as CIFAR100DataModule has."
        )
    return datamodule


class ClassFigures(Callback):
    """Per-class pictures, classes grouped by CIFAR-100's 20 superclasses, in every logger that takes images
    (TensorBoard's IMAGES tab, MLflow artifacts, W&B images) and as PNG files in the run folder's ``figures/``.

    After each validation epoch: ``val/confusion_matrix`` and ``val/class_accuracy``. After testing,
    the same for ``test/`` plus ``test/superclass_accuracy`` and ``test/misclassified``, a grid of
    wrongly classified test images captioned with the true and predicted class. The confusion matrix
    is the module's (a torchmetrics metric, so it covers every process's images under DDP); figures
    are drawn by rank 0.

    Drawing takes a second or two of host time per figure, so by default it happens on a background
    thread while training goes on: the hook only copies the numbers off the device (once) and queues
    the drawing; each figure is logged under the step it belongs to, in order. The end of the command
    waits for the drawings still queued; Ctrl-C and SIGTERM drop them. Once the drawings are done,
    ``time/figures_s`` is logged: the seconds the training thread spent on figures (copying, queuing
    and that final wait; all the drawing when ``background`` is false).
    """

    def __init__(self, every_n_epochs: int = 1, num_misclassified: int = 32, background: bool = True) -> None:
        """
        Args:
            every_n_epochs: Draw the validation figures every this many epochs (and always after the last).
            num_misclassified: Misclassified test images shown in the grid.
            background: Draw on a background thread while training goes on (false: on the training thread,
                which then waits for each drawing).
        """
        if every_n_epochs < 1:
            raise UserError(f"ClassFigures: every_n_epochs must be a positive number of epochs, got {every_n_epochs}.")
        if num_misclassified < 0:
            raise UserError(f"ClassFigures: num_misclassified must be 0 or more images, got {num_misclassified}.")
        self.every_n_epochs = every_n_epochs
        self.num_misclassified = num_misclassified
        self.background = background
        self._worker = BackgroundWorker("class-figures")
        self._wrong: tuple[Tensor, Tensor, Tensor, Tensor] | None = None  # images, true, predicted, is-wrong
        self.host_s = 0.0

    def sinks(self, trainer: Trainer) -> list[FigureSink]:
        """Where finished figures go (rank 0 only): every logger that takes images, and PNG files in the run folder."""
        return figure_sinks(trainer)

    def _draw_now(self, trainer: Trainer) -> bool:
        """Whether this validation epoch gets figures."""
        if trainer.sanity_checking:
            return False
        last = trainer.max_epochs is not None and trainer.current_epoch + 1 >= trainer.max_epochs
        return last or (trainer.current_epoch + 1) % self.every_n_epochs == 0

    def _submit(self, trainer: Trainer, draw: Callable[[], list[tuple[str, Figure]]]) -> None:
        """Draw (in the background, or now) and deliver the figures to ``sinks`` under the current step."""
        step, sinks = trainer.global_step, self.sinks(trainer)
        job = lambda: deliver(draw(), step, sinks)  # noqa: E731
        if self.background:
            self._worker.submit(job)
        else:
            job()

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._draw_now(trainer):
            return
        start = time.perf_counter()
        confusion = pl_module.confusion_matrix("val")  # every process must ask (DDP)
        if self.sinks(trainer):
            when = f"epoch {trainer.current_epoch}"
            self._submit(trainer, class_figures_job("val", confusion.cpu(), when, data_questions(trainer)))
        self.host_s += time.perf_counter() - start

    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._wrong = None

    def on_test_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        # The first misclassified images, kept on the device without asking how many there are (that would
        # make the host wait for the device every batch): this batch's candidates join the ones kept, and
        # a stable sort puts the wrong ones first.
        start = time.perf_counter()
        images, labels = batch
        predicted = outputs["logits"].argmax(dim=-1)
        wrong = predicted != labels
        first = torch.argsort((~wrong).to(torch.uint8), stable=True)[: self.num_misclassified]
        found = (images[first], labels[first], predicted[first], wrong[first])
        if self._wrong is not None:
            found = tuple(torch.cat(pair) for pair in zip(self._wrong, found))
            first = torch.argsort((~found[3]).to(torch.uint8), stable=True)[: self.num_misclassified]
            found = tuple(part[first] for part in found)
        self._wrong = found  # type: ignore[assignment]
        self.host_s += time.perf_counter() - start

    def on_test_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        start = time.perf_counter()
        confusion = pl_module.confusion_matrix("test")
        if self.sinks(trainer):
            data = data_questions(trainer)
            wrong = None
            if self._wrong is not None:
                images, true, predicted, is_wrong = self._wrong
                is_wrong = is_wrong.cpu()
                wrong = (data.displayable(images[is_wrong.to(images.device)]), true.cpu()[is_wrong], predicted.cpu()[is_wrong])
            self._submit(trainer, figures_after_test_job(confusion.cpu(), data, wrong))
        self._wrong = None
        self.host_s += time.perf_counter() - start

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Wait for the drawings in flight (before the loggers close), then log ``time/figures_s``."""
        start = time.perf_counter()
        self._worker.wait()
        self.host_s += time.perf_counter() - start
        if trainer.is_global_zero and stage in ("fit", "test"):
            for logger in trainer.loggers:
                logger.log_metrics({"time/figures_s": self.host_s}, step=trainer.global_step)
        self.host_s = 0.0

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        """Drop the drawings not started: a stopped command must not wait for pictures."""
        self._worker.cancel()


def class_figures_job(stage: str, confusion: Tensor, when: str, data: Any) -> Callable[[], list[tuple[str, Figure]]]:
    """A function that draws ``stage``'s confusion matrix and per-class accuracy from ``confusion`` (on the CPU)."""
    names, fine_to_coarse, super_names = list(data.class_names), data.fine_to_coarse.cpu(), list(data.superclass_names)

    def draw() -> list[tuple[str, Figure]]:
        images = int(confusion.sum())
        title = f"{stage} confusion matrix, {when}, {images} images (rows: true class, normalised; grouped by superclass)"
        matrix = confusion_matrix_figure(confusion, names, fine_to_coarse, super_names, title)
        title = f"{stage} accuracy per class, {when} (grouped and coloured by superclass)"
        bars = class_accuracy_figure(per_class_accuracy(confusion), names, fine_to_coarse, super_names, title)
        return [(f"{stage}/confusion_matrix", matrix), (f"{stage}/class_accuracy", bars)]

    return draw


def figures_after_test_job(
    confusion: Tensor, data: Any, wrong: tuple[Tensor, Tensor, Tensor] | None
) -> Callable[[], list[tuple[str, Figure]]]:
    """A function that draws the test figures from CPU tensors: per class, per superclass, misclassified images."""
    names, fine_to_coarse, super_names = list(data.class_names), data.fine_to_coarse.cpu(), list(data.superclass_names)
    per_class = class_figures_job("test", confusion, "test split", data)

    def draw() -> list[tuple[str, Figure]]:
        figures = per_class()
        exact, coarse = superclass_accuracy(confusion, fine_to_coarse, len(super_names))
        title = "Test accuracy per superclass: exact class (dark) and right superclass (light)"
        figures.append(("test/superclass_accuracy", superclass_accuracy_figure(exact, coarse, super_names, title)))
        if wrong is not None and len(wrong[0]):
            images, true, predicted = wrong
            title = "Misclassified test images: true class → predicted class"
            figure = misclassified_figure(images, [names[i] for i in true], [names[i] for i in predicted], title)
            figures.append(("test/misclassified", figure))
        return figures

    return draw
