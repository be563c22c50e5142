"""One LightningModule for training, evaluating and predicting, and its two networks."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Literal, get_args

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy

from cifar_resnet.checkpointing import check_checkpoint_fits
from cifar_resnet.errors import UserError
from cifar_resnet.metrics import ConfusionMatrix
from cifar_resnet.models import SeedResNet, load_imagenet_weights, resnet18_for_cifar
from cifar_resnet.schedules import WarmupDecayLR

STAGES = ("train", "val", "test")
CONFUSION = "confusion_matrix"


CompileMode = Literal["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"]


class ImageClassifier(LightningModule, ABC):
    """Cross-entropy classification with top-1/top-5 accuracy; subclasses only build the network."""

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
        """
        super().__init__()
        self.save_hyperparameters()
        if not 0 <= label_smoothing < 1:
            raise UserError(f"label_smoothing must lie in [0, 1), got {label_smoothing}.")
        if compile not in (False, True, *get_args(CompileMode)):
            raise UserError(f"compile must be true, false or one of {', '.join(get_args(CompileMode))}; got {compile!r}.")
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
        self.train_metrics = metrics.clone(prefix="train/")
        if tta:
            self.val_tta_metrics = metrics.clone(prefix="val/", postfix="_tta")
            self.test_tta_metrics = metrics.clone(prefix="test/", postfix="_tta")
        # Evaluation also keeps the confusion matrix, which the figures and reports read (not logged as a scalar).
        metrics.add_metrics({CONFUSION: ConfusionMatrix(num_classes, validate_args=False)})
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")
        self._fast_path_ready = False

    @abstractmethod
    def configure_network(self) -> nn.Module:
        """Build the network that maps normalised images to logits."""

    def setup(self, stage: str) -> None:
        """Prepare the network for speed before any stage runs."""
        self.prepare_network()

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

    def _step(self, batch: tuple[Tensor, Tensor], stage: str) -> dict[str, Tensor]:
        """Loss and metrics of one batch, logged under ``stage/``; returns the loss and the logits."""
        images, labels = batch
        logits = self(images)
        training = stage == "train"
        loss = (self.train_criterion if training else self.criterion)(logits, labels)
        metrics = getattr(self, f"{stage}_metrics")
        metrics.update(logits, labels)
        scalars = {name: m for name, m in metrics.items(keep_base=False, copy_state=False) if not name.endswith(CONFUSION)}
        # The training loss reaches the progress bar through SpeedMonitor, every so often: showing it
        # every step would make the host wait for the device every step.
        self.log(f"{stage}/loss", loss, on_step=training, on_epoch=True, prog_bar=not training, sync_dist=not training, batch_size=len(labels))
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

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        """One optimisation step's loss."""
        return self._step(batch, "train")["loss"]

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
        check_checkpoint_fits(self, checkpoint, getattr(self._trainer, "ckpt_path", None))

    def configure_optimizers(self) -> Any:
        """The optimizer and LR scheduler given in the config (see ``lr_scheduler`` for when it steps)."""
        optimizer = self.optimizer(parameter_groups(self, self.hparams.weight_decay_norm_and_bias))
        if self.lr_scheduler is None:
            return optimizer
        scheduler = self.lr_scheduler(optimizer)
        per_step = isinstance(scheduler, WarmupDecayLR)
        if per_step:
            scheduler.set_total_steps(self.trainer.estimated_stepping_batches)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {
                "scheduler": scheduler,
                "interval": "step" if per_step else "epoch",
                "name": "train/lr",
                "monitor": "val/loss",
            },
        }


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

    def __init__(self, dropout: float = 0.3, optimizer: OptimizerCallable = torch.optim.Adam, **kwargs: Any) -> None:
        """
        Args:
            dropout: Dropout probability after the stem.
            optimizer: Optimizer class and arguments (``class_path``/``init_args`` in YAML).
            kwargs: The settings of :class:`ImageClassifier`.
        """
        if not 0 <= dropout < 1:
            raise UserError(f"dropout must lie in [0, 1), got {dropout}.")
        self.dropout = dropout
        super().__init__(optimizer=optimizer, **kwargs)

    def configure_network(self) -> nn.Module:
        """The seed ResNet."""
        return SeedResNet(self.hparams.num_classes, self.dropout)


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
