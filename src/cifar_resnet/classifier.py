"""One LightningModule for training, evaluating and predicting, and its two networks."""

from __future__ import annotations

import functools
import inspect
from abc import ABC, abstractmethod
from contextlib import nullcontext
from typing import Any, ClassVar, Literal, get_args

import torch
from lightning.pytorch import Callback, LightningModule
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from cifar_resnet.averaging import EMAWeights
from cifar_resnet.compat import attached_trainer, counted_optimizer_step
from cifar_resnet.checkpointing import check_checkpoint_fits, check_optimizer_fits, stamp_schema
from cifar_resnet.checkpointing.compatibility import check_loops_fit
from cifar_resnet.errors import UserError
from cifar_resnet.metrics import ConfusionMatrix
from cifar_resnet.models import SeedResNet, load_imagenet_weights, resnet18_for_cifar
from cifar_resnet.schedules import WarmupDecayLR
from cifar_resnet.step import (
    TrainStep,
    clip_gradients,
    count_correct,
    execution_settings,
    portable_optimizer_state,
    prepare_for_capture,
)

CONFUSION = "confusion_matrix"


CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]
# Per-step hooks that run inside Lightning's automatic optimization; a captured step would run them once.
STEP_HOOKS = ("on_before_backward", "on_after_backward", "on_before_optimizer_step", "on_before_zero_grad")


class ImageClassifier(LightningModule, ABC):
    """Cross-entropy classification with top-1/top-5 accuracy; subclasses only build the network."""

    # Settings that change what the network is: a checkpoint loads only under the values it was trained with.
    # Any other setting, here or added later, may differ (checkpointing.check_checkpoint_fits).
    network_settings: ClassVar[frozenset[str]] = frozenset({"num_classes"})

    def __init__(
        self,
        num_classes: int = 100,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        label_smoothing: float = 0.0,
        weight_decay_norm_and_bias: bool = True,
        tta: bool = False,
        channels_last: bool = False,
        compile: bool | CompileMode = False,
        cuda_graph: bool | Literal["auto"] = False,
    ) -> None:
        """
        Args:
            num_classes: Number of output classes.
            optimizer: Optimizer class and arguments (``class_path``/``init_args`` in YAML).
            lr_scheduler: Optional LR scheduler class and arguments. torch's schedulers are stepped once
                per epoch (e.g. ``MultiStepLR``); ``cifar_resnet.schedules.WarmupDecayLR`` once per
                optimizer step, over the run's length as the Trainer computes it.
            label_smoothing: Label smoothing of the training loss, in [0, 1) (validation and test report
                the plain cross-entropy).
            weight_decay_norm_and_bias: Apply the optimizer's ``weight_decay`` to normalisation weights and
                biases too; false: only to convolution and linear weights.
            tta: Also evaluate with test-time augmentation (the mean of the logits of each image and its
                mirror image), logged apart as ``val/top1_tta``, ``test/top1_tta``, ...; ``predict`` uses it.
            channels_last: Keep weights and activations in NHWC layout (faster with tensor cores).
            compile: ``torch.compile`` the network: true (mode ``default``) or a mode (``reduce-overhead``,
                ``max-autotune``, ``max-autotune-no-cudagraphs``). Shapes are static: training and
                evaluation (and a last, smaller batch) each compile once.
            cuda_graph: Run each training step as one function (augmentation, forward, loss, backward,
                clipping, optimizer, schedule, EMA, metric counts), captured as one CUDA graph on a CUDA
                device: true, ``auto`` (on for a CUDA device, off elsewhere) or false (Lightning's automatic
                optimization). The math is the same. Where a graph cannot run, one line says why and the
                step runs uncaptured (CPU, DDP, compile modes with their own graphs) or as with false
                (gradient accumulation, 16-bit float scaling, callbacks with per-step optimizer hooks).
        """
        super().__init__()
        self.save_hyperparameters()
        if num_classes < 1:
            raise UserError(f"num_classes must be a positive number of classes, got {num_classes}.")
        if not 0 <= label_smoothing < 1:
            raise UserError(f"label_smoothing must lie in [0, 1), got {label_smoothing}.")
        if compile not in (False, True, *get_args(CompileMode)):
            raise UserError(f"compile must be true, false or one of {', '.join(get_args(CompileMode))}; got {compile!r}.")
        if cuda_graph not in (False, True, "auto"):
            raise UserError(f"cuda_graph must be true, false or auto; got {cuda_graph!r}.")
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.net = self.configure_network()
        self.train_criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)
        self.criterion = nn.CrossEntropyLoss()
        metrics = MetricCollection(
            {
                "top1": MulticlassAccuracy(num_classes, top_k=1, average="micro", validate_args=False),
                "top5": MulticlassAccuracy(num_classes, top_k=5, average="micro", validate_args=False),
            }
        )
        if tta:
            self.val_tta_metrics = metrics.clone(prefix="val/", postfix="_tta")
            self.test_tta_metrics = metrics.clone(prefix="test/", postfix="_tta")
        # Evaluation also keeps the confusion matrix, which the figures and reports read (not logged as a scalar).
        metrics.add_metrics({CONFUSION: ConfusionMatrix(num_classes, validate_args=False)})
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")
        self._fast_path_ready = False
        self._capture = False
        self._configured_settings: list[dict[str, Any]] | None = None  # the optimizer's, before a capture changes them
        self._train_step: TrainStep | None = None
        self._train_counts: Tensor | None = None  # top-1 and top-5 hits, on the device
        self._train_seen = 0  # training images this epoch
        self.updates_average_in_step = False  # read by EMAWeights

    @abstractmethod
    def configure_network(self) -> nn.Module:
        """Build the network that maps normalised images to logits."""

    def setup(self, stage: str) -> None:
        """Prepare the network for speed before any stage runs, and choose how training steps run."""
        self.prepare_network()
        if stage == "fit":
            self._choose_training_step()

    def prepare_network(self) -> None:
        """Apply the opt-in speed-ups (channels_last, torch.compile) once.

        Done in ``setup`` rather than ``configure_model``: weight-averaging callbacks copy the module
        before ``setup``, and their copy is only ever used for its weights, so it stays uncompiled.
        """
        if self._fast_path_ready:
            return
        if self.hparams.channels_last:
            self.net.to(memory_format=torch.channels_last)
        if self.hparams.compile:
            mode = "default" if self.hparams.compile is True else self.hparams.compile
            self.net.compile(mode=mode, dynamic=False)
        self._fast_path_ready = True

    def forward(self, images: Tensor) -> Tensor:
        """Logits for a batch of normalised images."""
        if self.hparams.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.net(images)

    def tta_logits(self, images: Tensor) -> Tensor:
        """Test-time augmentation: the mean of the logits of ``images`` and of their mirror images."""
        return self._plain_and_tta_logits(images)[1]

    def _plain_and_tta_logits(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """The logits of ``images``, and their mean with those of the mirror images, from one forward pass
        of the doubled batch (one large batch keeps the device busier than two)."""
        logits, mirrored = self(torch.cat([images, images.flip(-1)])).chunk(2)
        return logits, (logits.float() + mirrored.float()) / 2

    def _evaluate(self, batch: tuple[Tensor, Tensor], stage: str) -> dict[str, Tensor]:
        """Loss and metrics of one validation or test batch, logged under ``stage/``; returns the loss and logits.

        Nothing is read back to the host: the metrics add up on the device until the epoch ends.
        """
        images, labels = batch
        if self.hparams.tta:
            logits, tta = self._plain_and_tta_logits(images)
            tta_metrics = getattr(self, f"{stage}_tta_metrics")
            tta_metrics.update(tta, labels)
            self.log_dict(tta_metrics, on_step=False, on_epoch=True)
        else:
            logits = self(images)
        loss = self.criterion(logits, labels)
        metrics = getattr(self, f"{stage}_metrics")
        metrics.update(logits, labels)
        scalars = {name: m for name, m in metrics.items(keep_base=False, copy_state=False) if not name.endswith(CONFUSION)}
        self.log(f"{stage}/loss", loss, on_step=False, on_epoch=True, prog_bar=True, sync_dist=True, batch_size=len(labels))
        self.log_dict(scalars, on_step=False, on_epoch=True, prog_bar=stage != "test")
        return {"loss": loss, "logits": logits.detach()}

    def confusion_matrix(self, stage: str) -> Tensor:
        """``stage``'s (``val`` or ``test``) confusion matrix so far, rows the true class, summed over all
        processes (every process must ask)."""
        return getattr(self, f"{stage}_metrics")[CONFUSION].compute()

    def on_validation_epoch_start(self) -> None:
        """Start the confusion matrix afresh (Lightning resets only the metrics it logs)."""
        self.val_metrics[CONFUSION].reset()

    def on_test_epoch_start(self) -> None:
        """Start the confusion matrix afresh (Lightning resets only the metrics it logs)."""
        self.test_metrics[CONFUSION].reset()

    def training_loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        """The loss that is back-propagated (with ``label_smoothing``)."""
        return self.train_criterion(logits, labels)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor | dict[str, Tensor]:
        """One optimisation step: Lightning's (automatic optimization), or this module's own step (``cuda_graph``)."""
        images, labels = batch
        if self.automatic_optimization:
            logits = self(images)
            loss = self.training_loss(logits, labels)
            count_correct(self._counts(), logits.detach(), labels)
            self._train_seen += len(labels)
        else:
            loss = self._run_own_step(images, labels)
        # The loss reaches the logger every `log_every_n_steps` and the progress bar through SpeedMonitor:
        # showing it every step would make the host wait for the device every step.
        self.log("train/loss", loss.detach(), on_step=True, on_epoch=True, batch_size=len(labels))
        return loss if self.automatic_optimization else {"loss": loss}

    # ---- the training step as one function (cuda_graph) ------------------------------------------

    def _choose_training_step(self) -> None:
        """Use this module's own step (manual optimization) if ``cuda_graph`` asks for it and nothing forbids it.

        Lightning's automatic optimization calls hooks and steps the optimizer from Python between the
        backward pass and the next batch, so a graph could hold only the forward pass. With manual
        optimization the LightningModule runs the whole step itself, so all of it can be one graph,
        while Lightning's loops, callbacks, logging and checkpoints stay as they are. The choice is made
        here, in ``setup``, after Lightning has checked the Trainer's settings for automatic optimization
        (``gradient_clip_val`` is honoured by this step too).
        """
        setting, device = self.hparams.get("cuda_graph", False), self.trainer.strategy.root_device
        self.automatic_optimization, self._capture = True, False
        if setting is False or (setting == "auto" and device.type != "cuda"):
            return
        reason = self._reason_for_lightning_step()
        if reason:
            rank_zero_info(f"cuda_graph: {reason}, so training steps run as Lightning's automatic optimization.")
            return
        self.automatic_optimization = False
        reason = self._reason_not_to_capture(device)
        if reason:
            rank_zero_info(f"cuda_graph: {reason}, so each training step runs as one function, uncaptured.")
        self._capture = reason is None

    def _reason_for_lightning_step(self) -> str | None:
        """Why this module's own step cannot replace Lightning's, if it cannot."""
        trainer = self.trainer
        if trainer.accumulate_grad_batches != 1:
            return "gradient accumulation needs Lightning's optimizer loop"
        if "16" in str(trainer.precision) and "bf16" not in str(trainer.precision):
            return "16-mixed precision scales the loss and checks it on the host every step"
        hooked = [type(c).__name__ for c in trainer.callbacks if any(_overrides(c, name, Callback) for name in STEP_HOOKS)]
        hooked += [type(self).__name__] if any(_overrides(self, name, LightningModule) for name in STEP_HOOKS) else []
        if hooked:
            return f"{', '.join(hooked)} run per-step optimizer hooks ({', '.join(STEP_HOOKS)})"
        return None

    def _reason_not_to_capture(self, device: torch.device) -> str | None:
        """Why the step cannot be captured as a CUDA graph here, if it cannot."""
        if device.type != "cuda":
            return f"CUDA graphs need a CUDA device, this run is on {device.type}"
        if self.trainer.world_size > 1:
            return "a graph is not captured across several processes (DDP)"
        if self.hparams.compile in ("reduce-overhead", "max-autotune"):
            return f"compile mode {self.hparams.compile} captures its own CUDA graphs"
        return None

    def on_train_start(self) -> None:
        """Build this module's own step, once the checkpoint (if any) has been restored into the optimizer."""
        if self.automatic_optimization:
            return
        optimizer = self.optimizers().optimizer
        self._configured_settings = execution_settings(optimizer)
        if self._capture:
            prepare_for_capture(optimizer, self.device)
        averaging = [c for c in self.trainer.callbacks if isinstance(c, EMAWeights)]
        ema = averaging[0] if len(averaging) == 1 and averaging[0].every_step() else None
        self.updates_average_in_step = ema is not None
        datamodule = self.trainer.datamodule
        transform = getattr(datamodule, "transform", None) if hasattr(datamodule, "transform_in_step") else None
        if transform is not None:
            datamodule.transform_in_step = True
            transform.to(self.device)
        counts = self._counts()
        clip_value, clip_algorithm = self.trainer.gradient_clip_val, self.trainer.gradient_clip_algorithm
        parameters = [p for group in optimizer.param_groups for p in group["params"]]
        autocast = self._capture_autocast()

        def step(images: Tensor, labels: Tensor) -> Tensor:
            optimizer.zero_grad(set_to_none=True)
            if transform is not None:
                images = transform(images, train=True)
            with autocast:
                logits = self(images)
                loss = self.training_loss(logits, labels)
            self.manual_backward(loss)
            clip_gradients(parameters, clip_value, clip_algorithm)
            optimizer.step()
            if ema is not None:
                ema.update(self)
            count_correct(counts, logits.detach(), labels)
            return loss.detach()

        self._train_step = TrainStep(step, capture=self._capture)

    def _capture_autocast(self) -> Any:
        """The mixed-precision context of a captured step: Lightning's, without autocast's cache of cast
        weights, which would hand the graph the casts of the step before the capture."""
        kind = self.device.type
        if not self._capture or not torch.is_autocast_enabled(kind):
            return nullcontext()
        return torch.autocast(kind, dtype=torch.get_autocast_dtype(kind), cache_enabled=False)

    def _run_own_step(self, images: Tensor, labels: Tensor) -> Tensor:
        """Run this module's step, then count it as Lightning's optimizer step and step per-step schedules."""
        with counted_optimizer_step(self.optimizers()):  # a graph replay does not go through optimizer.step
            loss = self._train_step(images, labels)
        self._train_seen += len(labels)
        self._step_schedulers("step")
        return loss

    def _step_schedulers(self, interval: str) -> None:
        """Step the schedulers of ``interval``, where Lightning's automatic optimization steps them."""
        for config in self.trainer.lr_scheduler_configs:
            count = self.trainer.global_step if interval == "step" else self.current_epoch + 1
            if config.interval == interval and count % config.frequency == 0:
                config.scheduler.step()

    def _counts(self) -> Tensor:
        """The epoch's training hit counts on the module's device."""
        if self._train_counts is None or self._train_counts.device != self.device:
            self._train_counts = torch.zeros(2, dtype=torch.long, device=self.device)
        return self._train_counts

    def on_train_epoch_start(self) -> None:
        """Start the epoch's training accuracy counts afresh."""
        self._counts().zero_()
        self._train_seen = 0

    def on_train_epoch_end(self) -> None:
        """Log the epoch's training accuracy (the counts are read once, here); step per-epoch schedules."""
        top1, top5 = (self._counts().double() / max(1, self._train_seen)).unbind()
        self.log_dict({"train/top1": top1, "train/top5": top5}, prog_bar=True, sync_dist=True)
        if not self.automatic_optimization:
            self._step_schedulers("epoch")

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> dict[str, Tensor]:
        """Validation loss and accuracy; the logits go on to callbacks (confusion matrix)."""
        return self._evaluate(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> dict[str, Tensor]:
        """Test loss and accuracy; the logits go on to callbacks (confusion matrix, report)."""
        return self._evaluate(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        """Top-5 class indices and probabilities of each image (with test-time augmentation if ``tta``)."""
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        logits = self.tta_logits(images) if self.hparams.tta else self(images)
        probs, classes = logits.float().softmax(dim=-1).topk(5, dim=-1)
        return {"classes": classes, "probs": probs}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint of another model, version or settings with a short message."""
        trainer = attached_trainer(self)
        path = getattr(trainer, "ckpt_path", None)
        check_checkpoint_fits(self, checkpoint, path)
        if trainer is not None and trainer.state.fn == "fit":  # resuming: the optimizer state will be loaded
            groups = [group["params"] for group in parameter_groups(self, self.hparams.weight_decay_norm_and_bias)]
            shapes = [p.shape for params in groups for p in params]
            check_optimizer_fits(checkpoint, self._optimizer_name(), [len(params) for params in groups], path, shapes)
            check_loops_fit(checkpoint, {"fit_loop": trainer.fit_loop.state_dict()})
        if self._train_step is not None:  # a captured graph may read tensors that the restore replaces
            self._train_step.reset()

    def _optimizer_name(self) -> str:
        """The class name of the configured optimizer (as recorded from the config, else of ``self.optimizer``)."""
        recorded = self.hparams.get("optimizer")
        if isinstance(recorded, dict) and recorded.get("class_path"):
            return str(recorded["class_path"]).rsplit(".", 1)[-1]
        return getattr(getattr(self.optimizer, "func", self.optimizer), "__name__", type(self.optimizer).__name__)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Stamp the checkpoint with its layout's version; write the optimizer state as the configured optimizer
        would, whatever a captured step changed (learning rates as numbers, ``capturable``/``fused`` as set)."""
        stamp_schema(checkpoint)
        if self._capture and self._configured_settings is not None:
            settings = self._configured_settings
            checkpoint["optimizer_states"] = [portable_optimizer_state(s, settings) for s in checkpoint.get("optimizer_states", [])]

    @property
    def lr(self) -> float | None:
        """The optimizer's learning rate, which Lightning's ``LearningRateFinder`` reads and sets."""
        keywords = getattr(self.optimizer, "keywords", None)  # the config's optimizer: a partial with every init arg
        if keywords is not None:
            return keywords.get("lr")
        parameter = inspect.signature(self.optimizer).parameters.get("lr")  # a bare optimizer class
        return None if parameter is None else parameter.default

    @lr.setter
    def lr(self, value: float) -> None:
        """Set the learning rate of the optimizers built from now on, and in the recorded settings."""
        self.optimizer = functools.partial(self.optimizer, lr=value)
        recorded = self.hparams.get("optimizer")
        if isinstance(recorded, dict) and isinstance(recorded.get("init_args"), dict):
            recorded["init_args"]["lr"] = value

    def configure_optimizers(self) -> Any:
        """The optimizer and LR scheduler given in the config (see ``lr_scheduler`` for when it steps)."""
        optimizer = self.optimizer(parameter_groups(self, self.hparams.weight_decay_norm_and_bias))
        for group in optimizer.param_groups:
            # torch picks its multi-tensor (foreach) implementation by default on GPUs only; it is the same
            # arithmetic, and a few kernels a step instead of several per parameter, so use it everywhere.
            if group.get("foreach", False) is None and not group.get("fused"):
                group["foreach"] = True
        if self.lr_scheduler is None:
            return optimizer
        scheduler = self.lr_scheduler(optimizer)
        per_step = isinstance(scheduler, WarmupDecayLR)
        if per_step:
            scheduler.set_total_steps(self.trainer.estimated_stepping_batches)
        config = {"scheduler": scheduler, "interval": "step" if per_step else "epoch", "name": "train/lr"}
        if self.automatic_optimization:
            config["monitor"] = "val/loss"  # for schedules that watch a metric (ReduceLROnPlateau)
        elif isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            raise UserError(
                "ReduceLROnPlateau watches val/loss, which the module's own training step (cuda_graph) does not "
                "pass it. Set `--model.init_args.cuda_graph false` or choose another lr_scheduler."
            )
        return {"optimizer": optimizer, "lr_scheduler": config}


def _overrides(obj: object, name: str, base: type) -> bool:
    """Whether ``obj``'s class overrides ``base``'s method ``name``."""
    return getattr(type(obj), name, None) is not getattr(base, name, None)


def parameter_groups(module: nn.Module, decay_norm_and_bias: bool = True) -> list[dict[str, Any]]:
    """The parameters of ``module`` as optimizer groups.

    With ``decay_norm_and_bias`` false, normalisation weights and biases (every parameter of fewer
    than two dimensions) go into a group with ``weight_decay`` 0, so decay only pulls on convolution
    and linear weights. The groups are named, so ``LearningRateMonitor`` logs ``train/lr/decay``.
    """
    params = [p for p in module.parameters() if p.requires_grad]
    if decay_norm_and_bias:
        return [{"params": params}]
    return [
        {"params": [p for p in params if p.ndim >= 2], "name": "decay"},
        {"params": [p for p in params if p.ndim < 2], "name": "no_decay", "weight_decay": 0.0},
    ]


class ScratchResNet(ImageClassifier):
    """The seed's ResNet for 32x32 images, trained from scratch."""

    network_settings: ClassVar[frozenset[str]] = frozenset({"dropout"})

    def __init__(self, dropout: float = 0.3, optimizer: OptimizerCallable = torch.optim.Adam, **kwargs: Any) -> None:
        """
        Args:
            dropout: Dropout probability after the stem.
            optimizer: Optimizer class and arguments (``class_path``/``init_args`` in YAML).
            kwargs: The settings of :class:`ImageClassifier`.
        """
        if not 0 <= dropout < 1:
            raise UserError(f"dropout must lie in [0, 1), got {dropout}.")
        super().__init__(optimizer=optimizer, **kwargs)

    def configure_network(self) -> nn.Module:
        """The seed ResNet."""
        return SeedResNet(self.hparams.num_classes, self.hparams.dropout)


class FineTunedResNet18(ImageClassifier):
    """torchvision ResNet18 with ImageNet weights and a new 100-way ``fc``, fine-tuned end to end."""

    def __init__(
        self,
        weights: str | None = "IMAGENET1K_V1",
        weights_path: str | None = None,
        optimizer: OptimizerCallable = torch.optim.SGD,
        **kwargs: Any,
    ) -> None:
        """
        Args:
            weights: torchvision weights name (downloaded once to torch's cache), or null for random init.
            weights_path: Local ``.pth`` state dict in torchvision's format; used instead of ``weights``.
            optimizer: Optimizer class and arguments (``class_path``/``init_args`` in YAML).
            kwargs: The settings of :class:`ImageClassifier`.
        """
        super().__init__(optimizer=optimizer, **kwargs)

    def configure_network(self) -> nn.Module:
        """ResNet18 with a ``num_classes``-way head (ImageNet weights come in :meth:`setup`)."""
        return resnet18_for_cifar(self.hparams.num_classes)

    def setup(self, stage: str) -> None:
        """Load the ImageNet weights when a fit starts from scratch (a checkpoint replaces them otherwise),
        before the network is prepared for speed."""
        if stage == "fit" and self.trainer.ckpt_path is None:
            load_imagenet_weights(self.net, self.hparams.weights, self.hparams.weights_path)
        super().setup(stage)
