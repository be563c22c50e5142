"""An exponential moving average of the weights: Lightning's callback, updated without host waits."""

from __future__ import annotations

import itertools
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from torch import Tensor
from torch.optim.swa_utils import get_ema_multi_avg_fn

from cifar_resnet.checkpointing import damaged_part
from cifar_resnet.compat import WeightAveragingState, copy_all, scale_and_add
from cifar_resnet.errors import UserError


class EMAWeights(WeightAveragingState):
    """An exponential moving average of the weights (Lightning's ``EMAWeightAveraging``), with an update that never makes the host wait for the device.

    torch's ``AveragedModel.update_parameters`` reads its update count on the host twice a step (to
    copy on the first update), which stops the host until the GPU has caught up. This update keeps
    the count on the device: the first update's decay is chosen there (``where(n == 0, 0, d)``: a copy),
    and the floating-point tensors are updated by ``foreach`` multiplies and adds, a few kernels in all; integer
    buffers (BatchNorm's batch counters) are copied. With ``decay_warmup`` the decay at update ``t``
    is ``min(decay, (1 + t) / (10 + t))``, as TensorFlow's and timm's EMAs do, so that a short run's
    average is not dominated by the random initial weights. Everything else (when to update,
    swapping the average in for validation, the average as the checkpoint's ``state_dict``, exact
    resume, the checkpoint format) is Lightning's.
    """

    def __init__(
        self,
        decay: float = 0.999,
        update_every_n_steps: int = 1,
        update_starting_at_step: int | None = None,
        update_starting_at_epoch: int | None = None,
        use_buffers: bool = True,
        decay_warmup: bool = False,
    ) -> None:
        """
        Args:
            decay: Weight of the old average at each update: the average remembers ~1 / (1 - decay) updates.
            update_every_n_steps: Update the average every this many optimizer steps.
            update_starting_at_step: First optimizer step that updates the average (default: the first).
            update_starting_at_epoch: First epoch that updates the average (default: the first).
            use_buffers: Average the BatchNorm statistics too (otherwise the average uses the model's).
            decay_warmup: Use the decay ``min(decay, (1 + t) / (10 + t))`` at update ``t`` (false: ``decay``
                from the first update on, which copies the weights).
        """
        if not 0 <= decay <= 1:
            raise UserError(f"EMAWeights: decay must lie in [0, 1], got {decay}.")
        if update_every_n_steps < 1:
            raise UserError(f"EMAWeights: update_every_n_steps must be positive, got {update_every_n_steps}.")
        # The averaging function is torch's EMA, for anything that calls `AveragedModel.update_parameters`;
        # this callback updates with `update` instead, which gives the same numbers without host reads.
        super().__init__(use_buffers=use_buffers, multi_avg_fn=get_ema_multi_avg_fn(decay))
        self.update_every_n_steps = update_every_n_steps
        self.update_starting_at_step = update_starting_at_step
        self.update_starting_at_epoch = update_starting_at_epoch
        self.decay = decay
        self.decay_warmup = decay_warmup
        self._pairs: tuple[list[Tensor], list[Tensor], list[Tensor], list[Tensor]] | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Lightning's: a new average when a fit starts (then the tensors to update are looked up anew)."""
        super().setup(trainer, pl_module, stage)
        self._pairs = None

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        """Whether to update after optimizer step ``step_idx`` or at the end of epoch ``epoch_idx``
        (the rule of Lightning's ``EMAWeightAveraging``)."""
        if step_idx is not None:
            started = self.update_starting_at_step is None or step_idx >= self.update_starting_at_step
            if started and step_idx % self.update_every_n_steps == 0:
                return True
        return epoch_idx is not None and self.update_starting_at_epoch is not None and epoch_idx >= self.update_starting_at_epoch

    def every_step(self) -> bool:
        """Whether the average is updated after every optimizer step (what a captured step can do)."""
        return self.update_every_n_steps == 1 and not self.update_starting_at_step and self.update_starting_at_epoch is None

    def update(self, pl_module: LightningModule) -> None:
        """Update the average with the module's current weights: device work only, no host read."""
        average = self.average_model
        if average is None:
            return
        if self._pairs is None:
            self._pairs = _pairs(average.module, pl_module, self.averages_buffers)
        ema_float, model_float, ema_other, model_other = self._pairs
        with torch.no_grad():
            n = average.n_averaged
            decay = (1 + n).div(10 + n).clamp_(max=self.decay) if self.decay_warmup else torch.full_like(n, self.decay, dtype=torch.float32)
            decay = torch.where(n == 0, 0.0, decay)  # the first update copies the weights
            if ema_float:
                scale_and_add(ema_float, model_float, decay)
            if ema_other:
                copy_all(ema_other, model_other)
            n.add_(1)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Update the average after an optimizer step, unless the module's own step already did."""
        step_idx = trainer.global_step - 1
        if trainer.global_step > self.latest_update_step and self.should_update(step_idx=step_idx):
            if not getattr(pl_module, "updates_average_in_step", False):
                self.update(pl_module)
            self.latest_update_step = trainer.global_step

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Go on from a checkpoint's update count (a count that is no step number means a damaged checkpoint)."""
        step = state_dict.get("latest_update_step")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise damaged_part("EMA state (EMAWeights' latest_update_step)", f"is {step!r}, not a step number")
        super().load_state_dict(state_dict)

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Update the average at the end of an epoch if ``update_starting_at_epoch`` asks for it."""
        if trainer.current_epoch > self.latest_update_epoch and self.should_update(epoch_idx=trainer.current_epoch):
            self.update(pl_module)
            self.latest_update_epoch = trainer.current_epoch


def _pairs(average: torch.nn.Module, model: torch.nn.Module, use_buffers: bool) -> tuple[list[Tensor], ...]:
    """The tensors of the average and of the model in the same order: those averaged (floating-point
    parameters, and buffers with ``use_buffers``) and those copied (the rest, as ``AveragedModel`` does)."""
    ema_tensors = itertools.chain(average.parameters(), average.buffers())
    model_tensors = itertools.chain(model.parameters(), model.buffers())
    parameters = sum(1 for _ in average.parameters())
    ema_float, model_float, ema_other, model_other = [], [], [], []
    for index, (ema, current) in enumerate(zip(ema_tensors, model_tensors, strict=True)):
        floating = ema.is_floating_point() and (use_buffers or index < parameters)
        (ema_float if floating else ema_other).append(ema.detach())
        (model_float if floating else model_other).append(current.detach())
    return ema_float, model_float, ema_other, model_other
