"""One LightningModule for training, evaluating and predicting, and its two networks."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torchmetrics import MetricCollection
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

from cifar_resnet.checkpointing import rng_states, set_rng_states
from cifar_resnet.errors import UserError
from cifar_resnet.models import SeedResNet, load_imagenet_weights, resnet18_for_cifar, state_dict_mismatch

STAGES = ("train", "val", "test")
CONFUSION = "confusion_matrix"


class ImageClassifier(LightningModule, ABC):
    """Cross-entropy classification with top-1/top-5 accuracy; subclasses only build the network."""

    def __init__(
        self,
        num_classes: int = 100,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        channels_last: bool = False,
        compile: bool = False,
    ) -> None:
        """
        Args:
            num_classes: Number of output classes.
            optimizer: Optimizer class and arguments (``class_path``/``init_args`` in YAML).
            lr_scheduler: Optional LR scheduler class and arguments, stepped once per epoch.
            channels_last: Keep weights and activations in NHWC layout (faster with tensor cores).
            compile: Compile the network with ``torch.compile`` (worth it on a GPU for long runs).
        """
        super().__init__()
        self.save_hyperparameters()
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.net = self.configure_network()
        self.criterion = nn.CrossEntropyLoss()
        metrics = MetricCollection(
            {
                "top1": MulticlassAccuracy(num_classes, top_k=1, average="micro", validate_args=False),
                "top5": MulticlassAccuracy(num_classes, top_k=5, average="micro", validate_args=False),
            }
        )
        self.train_metrics = metrics.clone(prefix="train/")
        # Evaluation also keeps the confusion matrix, which the figures and reports read (not logged as a scalar).
        metrics.add_metrics({CONFUSION: MulticlassConfusionMatrix(num_classes, validate_args=False)})
        self.val_metrics = metrics.clone(prefix="val/")
        self.test_metrics = metrics.clone(prefix="test/")
        self._fast_path_ready = False

    @abstractmethod
    def configure_network(self) -> nn.Module:
        """Build the network that maps normalised images to logits."""

    def configure_model(self) -> None:
        """Apply the opt-in speed-ups (channels_last, torch.compile) once."""
        if self._fast_path_ready:
            return
        if self.hparams.channels_last:
            self.net.to(memory_format=torch.channels_last)
        if self.hparams.compile:
            self.net.compile()
        self._fast_path_ready = True

    def forward(self, images: Tensor) -> Tensor:
        """Logits for a batch of normalised images."""
        if self.hparams.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return self.net(images)

    def _step(self, batch: tuple[Tensor, Tensor], stage: str) -> dict[str, Tensor]:
        """Loss and metrics of one batch, logged under ``stage/``; returns the loss and the logits."""
        images, labels = batch
        logits = self(images)
        loss = self.criterion(logits, labels)
        metrics = getattr(self, f"{stage}_metrics")
        metrics.update(logits, labels)
        scalars = {name: m for name, m in metrics.items(keep_base=False, copy_state=False) if not name.endswith(CONFUSION)}
        training = stage == "train"
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
        return self._step(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> dict[str, Tensor]:
        """Test loss and accuracy; the logits go on to callbacks (confusion matrix, report)."""
        return self._step(batch, "test")

    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, Tensor]:
        """Top-5 class indices and probabilities of each image."""
        images = batch[0] if isinstance(batch, (tuple, list)) else batch
        probs, classes = self(images).float().softmax(dim=-1).topk(5, dim=-1)
        return {"classes": classes, "probs": probs}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the random generators' states, so a resumed run draws the same flips and dropout masks."""
        checkpoint["rng_states"] = rng_states()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse a checkpoint of another network with a short message (not a page of key names)."""
        details = state_dict_mismatch(self.state_dict(), checkpoint["state_dict"])
        if details:
            kind = checkpoint.get("hyper_parameters", {}).get("_class_path", "another model")
            path = getattr(self._trainer, "ckpt_path", None)
            raise UserError(
                f"The checkpoint{f' {path!r}' if path else ''} holds the weights of {kind}, which do not fit "
                f"{type(self).__name__} ({details}). "
                "Use the config the checkpoint was trained with (config.yaml in its run folder)."
            )
        set_rng_states(checkpoint.get("rng_states", {}))

    def configure_optimizers(self) -> Any:
        """The optimizer (and LR scheduler, stepped per epoch) given in the config."""
        optimizer = self.optimizer(self.parameters())
        if self.lr_scheduler is None:
            return optimizer
        scheduler = self.lr_scheduler(optimizer)
        return {
            "optimizer": optimizer,
            "lr_scheduler": {"scheduler": scheduler, "interval": "epoch", "name": "train/lr", "monitor": "val/loss"},
        }


class ScratchResNet(ImageClassifier):
    """The seed's ResNet for 32x32 images, trained from scratch."""

    def __init__(
        self,
        num_classes: int = 100,
        dropout: float = 0.3,
        optimizer: OptimizerCallable = torch.optim.Adam,
        lr_scheduler: LRSchedulerCallable | None = None,
        channels_last: bool = False,
        compile: bool = False,
    ) -> None:
        """
        Args:
            num_classes: Number of output classes.
            dropout: Dropout probability after the stem.
            optimizer: Optimizer class and arguments (``class_path``/``init_args`` in YAML).
            lr_scheduler: Optional LR scheduler class and arguments, stepped once per epoch.
            channels_last: Keep weights and activations in NHWC layout (faster with tensor cores).
            compile: Compile the network with ``torch.compile`` (worth it on a GPU for long runs).
        """
        if not 0 <= dropout < 1:
            raise UserError(f"dropout must lie in [0, 1), got {dropout}.")
        self.dropout = dropout
        super().__init__(num_classes, optimizer, lr_scheduler, channels_last, compile)

    def configure_network(self) -> nn.Module:
        """The seed ResNet."""
        return SeedResNet(self.hparams.num_classes, self.dropout)


class FineTunedResNet18(ImageClassifier):
    """torchvision ResNet18 with ImageNet weights and a new 100-way ``fc``, fine-tuned end to end."""

    def __init__(
        self,
        num_classes: int = 100,
        weights: str | None = "IMAGENET1K_V1",
        weights_path: str | None = None,
        optimizer: OptimizerCallable = torch.optim.SGD,
        lr_scheduler: LRSchedulerCallable | None = None,
        channels_last: bool = False,
        compile: bool = False,
    ) -> None:
        """
        Args:
            num_classes: Number of output classes.
            weights: torchvision weights name (downloaded once to torch's cache), or null for random init.
            weights_path: Local ``.pth`` state dict in torchvision's format; used instead of ``weights``.
            optimizer: Optimizer class and arguments (``class_path``/``init_args`` in YAML).
            lr_scheduler: Optional LR scheduler class and arguments, stepped once per epoch.
            channels_last: Keep weights and activations in NHWC layout (faster with tensor cores).
            compile: Compile the network with ``torch.compile`` (worth it on a GPU for long runs).
        """
        super().__init__(num_classes, optimizer, lr_scheduler, channels_last, compile)

    def configure_network(self) -> nn.Module:
        """ResNet18 with a ``num_classes``-way head (ImageNet weights come in :meth:`setup`)."""
        return resnet18_for_cifar(self.hparams.num_classes)

    def setup(self, stage: str) -> None:
        """Load the ImageNet weights when a fit starts from scratch; a checkpoint replaces them otherwise."""
        if stage == "fit" and self.trainer.ckpt_path is None:
            load_imagenet_weights(self.net, self.hparams.weights, self.hparams.weights_path)
