"""Callbacks: speed, per-class figures, hyper-parameters with results, and stopping safely on failures."""

from __future__ import annotations

import fcntl
import importlib
import inspect
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.loggers import TensorBoardLogger
from matplotlib.figure import Figure
from torch import Tensor
from torch.utils.tensorboard.summary import hparams

from cifar_resnet.compat import kill_launched_processes, write_tensorboard_summary
from cifar_resnet.checkpointing import checkpoint_host_seconds
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

IMPORTED_AT = time.time()


class SpeedMonitor(Callback):
    """Logs how fast training goes and how long a fit has taken.

    Each epoch: ``train/epoch_time`` (s) and ``train/images_per_sec`` (all devices together), and in
    the progress bar the running images/s of the epoch and the training loss. After each validation
    epoch (not the sanity check): ``time/elapsed_s``, wall seconds since the fit started, at the same
    step as ``val/top1``, so accuracy can be plotted against time; a resumed run's clock goes on from
    where its checkpoint left it (the checkpoint keeps it), so a run stopped and resumed reads as one. Once: ``time/warmup_s``, the wall
    seconds of the first training step plus the first validation batch, which is what compiling and
    cuDNN autotuning cost (fit time without them = last ``time/elapsed_s`` - ``time/warmup_s``). At
    the end of the fit, on CUDA: ``gpu/peak_memory_gib``. The clocks wait for the device only at
    these points, never in the steps between.
    """

    def __init__(self) -> None:
        self._start = 0.0
        self._images = 0
        self._fit_start = 0.0
        self._earlier_s = 0.0  # fit time of the commands before this one, for a resumed run
        self._warmup: dict[str, float] = {}
        self._batch_start: float | None = None

    @staticmethod
    def _now(pl_module: LightningModule) -> float:
        """Wall-clock seconds, once the device has finished the work queued so far."""
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        return time.perf_counter()

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)
        self._warmup, self._batch_start = {}, None
        self._fit_start = self._now(pl_module)

    def state_dict(self) -> dict[str, float]:
        """The run's fit time so far (saved in checkpoints)."""
        running = time.perf_counter() - self._fit_start if self._fit_start else 0.0
        return {"elapsed_s": self._earlier_s + running}

    def load_state_dict(self, state_dict: dict[str, float]) -> None:
        """Go on from a checkpoint's fit time (checkpoints are restored before ``on_fit_start``)."""
        self._earlier_s = float(state_dict.get("elapsed_s", 0.0))

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._start, self._images = self._now(pl_module), 0

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if "train" not in self._warmup:
            self._batch_start = self._now(pl_module)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._images += len(batch[1])
        if "train" not in self._warmup:
            self._warmup["train"] = self._now(pl_module) - self._batch_start
            self._log_warmup(trainer)
        # Showing a figure makes the host wait for the device, so the bar's figures change only every
        # `log_every_n_steps` steps (and at the end of the epoch), not every step.
        due = (batch_idx + 1) % trainer.log_every_n_steps == 0 or batch_idx + 1 == trainer.num_training_batches
        elapsed = time.perf_counter() - self._start
        if trainer.progress_bar_callback is not None and due and elapsed > 0:
            rate = self._images * trainer.world_size / elapsed
            pl_module.log("img/s", float(round(rate)), prog_bar=True, logger=False, on_step=True, on_epoch=False)
            pl_module.log("loss", outputs["loss"], prog_bar=True, logger=False, on_step=True, on_epoch=False)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        elapsed = self._now(pl_module) - self._start
        pl_module.log("train/epoch_time", elapsed, sync_dist=True, reduce_fx="max")
        pl_module.log("train/images_per_sec", self._images * trainer.world_size / elapsed, sync_dist=True, reduce_fx="min")

    def on_validation_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if trainer.state.fn == "fit" and "val" not in self._warmup:
            self._batch_start = self._now(pl_module)

    def on_validation_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if trainer.state.fn == "fit" and "val" not in self._warmup:
            self._warmup["val"] = self._now(pl_module) - self._batch_start
            self._log_warmup(trainer)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            pl_module.log("time/elapsed_s", self._earlier_s + self._now(pl_module) - self._fit_start, sync_dist=True, reduce_fx="max")

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if pl_module.device.type == "cuda":
            self._log_now(trainer, {"gpu/peak_memory_gib": torch.cuda.max_memory_allocated(pl_module.device) / 2**30})

    def _log_warmup(self, trainer: Trainer) -> None:
        """Log ``time/warmup_s`` when both the first training step and the first validation batch are timed."""
        if set(self._warmup) == {"train", "val"}:
            self._log_now(trainer, {"time/warmup_s": self._warmup["train"] + self._warmup["val"]})

    @staticmethod
    def _log_now(trainer: Trainer, metrics: dict[str, float]) -> None:
        """Write ``metrics`` to every logger at the current step (rank 0 only; outside Lightning's epoch bookkeeping)."""
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)


class WallClock(Callback):
    """Logs where a fit's wall time went, once, at its end, so that what keeps the device waiting shows:

    ``time/startup_s`` (from the start of the process to the first training step: imports, reading the
    archive, building the model, the sanity check), ``time/validation_s`` (all validation epochs of the
    fit), ``time/checkpoint_s`` (what writing checkpoints cost the training thread; with the recipes'
    :class:`~cifar_resnet.checkpointing.BackgroundCheckpointIO`, the copies and the final wait) beside
    ``time/warmup_s`` and ``train/epoch_time`` of :class:`SpeedMonitor` and ``time/figures_s`` of
    :class:`ClassFigures`. The clocks wait for the device only at the start and end of each validation.
    """

    def __init__(self) -> None:
        self._startup: float | None = None
        self._validation = 0.0
        self._validation_start = 0.0

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._startup, self._validation = None, 0.0

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self._startup is None:
            self._startup = time.time() - process_start_time()

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._validation_start = SpeedMonitor._now(pl_module)

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:
            self._validation += SpeedMonitor._now(pl_module) - self._validation_start

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # After Lightning's teardown, which waited for the checkpoints written in the background.
        metrics = {"time/validation_s": self._validation}
        if self._startup is not None:
            metrics["time/startup_s"] = self._startup
        checkpoint_s = checkpoint_host_seconds(trainer)
        if checkpoint_s is not None:
            metrics["time/checkpoint_s"] = checkpoint_s
        SpeedMonitor._log_now(trainer, metrics)


def process_start_time() -> float:
    """When this process started (``time.time()`` scale): from ``/proc`` on Linux, else when this program was imported."""
    try:
        started = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19]) / os.sysconf("SC_CLK_TCK")
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return time.time() - (uptime - started)
    except (OSError, ValueError, IndexError):
        return IMPORTED_AT


class FixedFormatProgressBar(TQDMProgressBar):
    """Lightning's progress bar with its numbers in a fixed format (``img/s=12345``, ``loss=4.6052``), so
    they do not jump between ``1.23e+3`` and ``987`` or change width from one update to the next."""

    def get_metrics(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, int | str | float | dict[str, float]]:
        return {name: fixed_format(name, value) for name, value in super().get_metrics(trainer, pl_module).items()}


def fixed_format(name: str, value: Any) -> Any:
    """Rates as whole numbers and other floats with 4 decimals; anything else as it is."""
    if not isinstance(value, float):
        return value
    return f"{value:.0f}" if name.endswith("/s") else f"{value:.4f}"


def tensorboard(trainer: Trainer) -> TensorBoardLogger | None:
    """The trainer's TensorBoard logger, if it has one."""
    return next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)


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


class HParamsSummary(Callback):
    """Lists every run in TensorBoard's HPARAMS tab: its hyper-parameters next to its final metrics.

    When ``fit`` or ``test`` starts, writes a session record with the module's and DataModule's
    hyper-parameters; when it ends, marks the session done and (after ``fit``) logs ``val/top1_best``,
    the best checkpoint's score. TensorBoard shows the last value of each scalar of a run as its
    metrics, so ``fit`` runs show train/val results and ``test`` runs test results. No "experiment"
    record is written, because TensorBoard uses the first one it finds and then ignores other runs'
    metrics; for the same reason the logger needs ``default_hp_metric: false`` (as in the configs).
    """

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._write(trainer, pl_module, start=True)

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._write(trainer, pl_module, start=True)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        checkpoint = trainer.checkpoint_callback
        logger = tensorboard(trainer)
        score = getattr(checkpoint, "best_model_score", None)
        if trainer.is_global_zero and logger is not None and score is not None and checkpoint.monitor:
            logger.log_metrics({f"{checkpoint.monitor}_best": float(score)}, step=trainer.global_step)
        self._write(trainer, pl_module, start=False)

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._write(trainer, pl_module, start=False)

    @staticmethod
    def _write(trainer: Trainer, pl_module: LightningModule, start: bool) -> None:
        """Write the session-start (with the hyper-parameters) or session-end record (rank 0)."""
        logger = tensorboard(trainer)
        if not trainer.is_global_zero or logger is None:
            return
        params = {"recipe": logger.name, "max_epochs": trainer.max_epochs, **pl_module.hparams_initial}
        if trainer.datamodule is not None:
            params.update(trainer.datamodule.hparams_initial)
        _, session_start, session_end = hparams(flat_hparams(without_unset_switches(params)), {})
        write_tensorboard_summary(logger, session_start if start else session_end)
        logger.experiment.flush()


def without_unset_switches(params: dict[str, Any]) -> dict[str, Any]:
    """``params`` less the arguments of its ``class_path``/``init_args`` entries (optimizer, LR scheduler) that
    are switches left at their off default, ``None`` or ``False`` (``foreach``, ``fused``, ``capturable``,
    ``differentiable``, ``maximize``, ...): columns nobody sets, that would crowd the HPARAMS tab."""
    kept = {}
    for key, value in params.items():
        if isinstance(value, dict) and isinstance(value.get("init_args"), dict) and "class_path" in value:
            defaults = _signature_defaults(str(value["class_path"]))
            unset = {k for k, v in value["init_args"].items() if k in defaults and defaults[k] in (None, False) and v is defaults[k]}
            value = {**value, "init_args": {k: v for k, v in value["init_args"].items() if k not in unset}}
        kept[key] = value
    return kept


def _signature_defaults(class_path: str) -> dict[str, Any]:
    """The constructor defaults of the class at ``class_path`` ({} if it cannot be imported)."""
    module, _, name = class_path.rpartition(".")
    try:
        parameters = inspect.signature(getattr(importlib.import_module(module), name)).parameters
    except (ImportError, AttributeError, ValueError, TypeError):
        return {}
    return {k: p.default for k, p in parameters.items() if p.default is not inspect.Parameter.empty}


def flat_hparams(params: dict[str, Any], prefix: str = "") -> dict[str, bool | int | float | str]:
    """Nested hyper-parameters as ``a/b/c`` keys with values TensorBoard accepts (others become text)."""
    flat: dict[str, bool | int | float | str] = {}
    for key, value in params.items():
        if key.startswith("_"):
            continue
        if isinstance(value, dict):
            flat.update(flat_hparams(value, f"{prefix}{key}/"))
        else:
            flat[prefix + key] = value if isinstance(value, (bool, int, float, str)) else str(value)
    return flat


class StopOnNonFiniteLoss(Callback):
    """Stops training at the first NaN or infinite loss; no checkpoint ever holds what it did.

    Each step only copies its loss into a small buffer on the device: reading it every step would
    make the host wait for the device every step, which slows a GPU down. The buffer is read every
    ``check_every_n_steps`` steps, before each validation and before any checkpoint is written, so
    the checkpoints written so far stay those of good steps, and the run can resume from ``last.ckpt``.
    """

    def __init__(self, check_every_n_steps: int = 50) -> None:
        """
        Args:
            check_every_n_steps: How often to look at the losses (each look waits for the device).
        """
        if check_every_n_steps < 1:
            raise UserError(f"check_every_n_steps must be positive, got {check_every_n_steps}.")
        self.check_every_n_steps = check_every_n_steps
        self._losses: Tensor | None = None  # the losses since the last look, by step % check_every_n_steps
        self._positions: dict[int, tuple[int, int]] = {}  # step -> (epoch, batch), since the last look

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        # After the step (a captured step runs no hook in between); global_step already counts it.
        step, loss = trainer.global_step - 1, outputs["loss"].detach()
        if self._losses is None or self._losses.device != loss.device:
            self._losses = torch.zeros(self.check_every_n_steps, device=loss.device)
        self._losses[step % self.check_every_n_steps].copy_(loss)
        self._positions[step] = (trainer.current_epoch, batch_idx)
        if len(self._positions) == self.check_every_n_steps:
            self.check()

    def check(self) -> None:
        """Raise if a loss since the last look was not finite (waits for the device)."""
        if self._losses is None or not self._positions:
            return
        losses = self._losses.tolist()
        for step in sorted(self._positions):
            loss = losses[step % self.check_every_n_steps]
            if not math.isfinite(loss):
                epoch, batch = self._positions[step]
                raise UserError(
                    f"The training loss became {loss} at step {step} (epoch {epoch}, batch {batch}); training stopped, "
                    "and the checkpoints written so far (all from before that step) are kept. Start again with a "
                    "lower learning rate (or 32-true precision), or resume from last.ckpt with `--ckpt_path last` "
                    "if the cause was a passing fault."
                )
        self._positions.clear()

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.check()

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.check()

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        self.check()

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.check()


class StopChildProcessesOnError(Callback):
    """When the process that launched the DDP ranks fails, kill the ranks it started.

    Lightning already ends the job when a started rank dies; the other way round, the started
    ranks would wait in a collective until its timeout (NCCL: 10 minutes and more), holding GPUs.
    """

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        kill_launched_processes(trainer)


class RunFolderLock(Callback):
    """Locks the run's folder while a command writes into it, so that a second process (a second
    ``fit --ckpt_path last`` of the same run, say) stops with a clear error instead of mixing its logs
    and checkpoints in. The lock is an ``flock`` on ``<run folder>/.lock``, which the system releases
    however the process ends, so a crash never leaves a stale lock.
    """

    LOCK_NAME = ".lock"

    def __init__(self) -> None:
        self._file: IO[str] | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        log_dir = trainer.log_dir  # every process must ask: it broadcasts
        if not trainer.is_global_zero or log_dir is None or self._file is not None:
            return
        folder = Path(log_dir)
        folder.mkdir(parents=True, exist_ok=True)
        lock = open(folder / self.LOCK_NAME, "a")  # noqa: SIM115 (held until teardown)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.close()
            raise UserError(
                f"Another cifar-resnet process is writing into '{folder}'. Wait for it to finish (or stop it) "
                "before resuming this run; to train a separate run, leave out `--ckpt_path`."
            ) from None
        self._file = lock

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        self._release()

    def on_exception(self, trainer: Trainer, pl_module: LightningModule, exception: BaseException) -> None:
        self._release()

    def _release(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
