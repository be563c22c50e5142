"""The per-step LR schedule (src/cifar_resnet/schedules.py) as the LightningModule hands it to Lightning:
stepped after every optimizer step, over the run's length. A fit of a tiny network on a few random images
(under a second): stepping the schedule once per epoch instead fails here, not only in a recipe's fit."""

from __future__ import annotations

from functools import partial

import pytest
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from cifar_resnet.classifier import ImageClassifier
from cifar_resnet.schedules import WarmupDecayLR


class TinyClassifier(ImageClassifier):
    """The module's training logic (optimizer, schedule, steps) on a network of one linear layer."""

    def configure_network(self) -> nn.Module:
        return nn.Sequential(nn.Flatten(), nn.Linear(3 * 2 * 2, self.hparams.num_classes))


class RecordLR(Callback):
    """The learning rate each optimizer step uses (read before the step)."""

    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: object, batch_idx: int) -> None:
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


@pytest.mark.filterwarnings("ignore:You defined a `validation_step` but have no `val_dataloader`")
@pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated")  # Lightning 2.6 on newer torch
@pytest.mark.parametrize("cuda_graph", [False, True])  # Lightning's step; the module's own (uncaptured on a CPU)
def test_the_module_steps_the_per_step_schedule_after_every_optimizer_step(cuda_graph: bool) -> None:
    steps_per_epoch, epochs, base_lr = 4, 2, 0.5
    torch.manual_seed(0)
    images, labels = torch.randn(4 * steps_per_epoch, 3, 2, 2), torch.randint(0, 100, (4 * steps_per_epoch,))
    model = TinyClassifier(
        optimizer=partial(torch.optim.SGD, lr=base_lr),
        lr_scheduler=partial(WarmupDecayLR, warmup=0.5, decay="linear"),  # warm-up: the first epoch; decay: the second
        cuda_graph=cuda_graph,
    )
    record = RecordLR()
    trainer = Trainer(
        accelerator="cpu", max_epochs=epochs, limit_val_batches=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[record],
    )  # fmt: skip
    trainer.fit(model, DataLoader(TensorDataset(images, labels), batch_size=4))

    lrs = record.lrs
    assert len(lrs) == steps_per_epoch * epochs
    warmup, decay = lrs[:steps_per_epoch], lrs[steps_per_epoch:]
    # Per step: the LR rises at every step of the warm-up epoch and falls at every step of the decay epoch
    # (stepped per epoch, it would stay the same within each epoch).
    assert all(a < b for a, b in zip(warmup, warmup[1:])), lrs
    assert all(a > b for a, b in zip(decay, decay[1:])), lrs
    assert max(lrs) == base_lr
    # Over the run's length (the Trainer's estimated_stepping_batches): after the last step it reaches the end
    # of its decay, 0 (final_fraction), not some point halfway.
    assert trainer.optimizers[0].param_groups[0]["lr"] == 0.0
