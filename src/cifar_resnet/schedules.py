"""Learning-rate schedules stepped every optimizer step, whose length is the run's."""

from __future__ import annotations

import math
from typing import Literal

from torch import Tensor
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from cifar_resnet.compat import set_last_lrs
from cifar_resnet.errors import UserError


class WarmupDecayLR(LRScheduler):
    """Linear warm-up from 0, then linear or cosine decay to ``final_fraction`` of the base LR, per step.

    Stepped after every optimizer step (not every epoch). The number of steps is not a setting: the
    LightningModule sets it from the Trainer (``trainer.estimated_stepping_batches``, i.e. epochs,
    batches, ``limit_train_batches`` and gradient accumulation together) with :meth:`set_total_steps`.
    The LR factor at step ``s`` of ``T`` (``w = round(warmup * T)`` warm-up steps):
    ``(s + 1) / w`` while ``s < w``; then with ``p = (s - w) / (T - w)``, ``1 - p`` (linear) or
    ``(1 + cos(pi * p)) / 2`` (cosine), scaled to end at ``final_fraction``.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        warmup: float = 0.05,
        decay: Literal["linear", "cosine"] = "linear",
        final_fraction: float = 0.0,
        last_epoch: int = -1,
    ) -> None:
        """
        Args:
            optimizer: The optimizer whose LR is scheduled.
            warmup: Share of all steps spent warming up linearly from 0 to the base LR, in [0, 1).
            decay: Shape of the decay after the warm-up: ``linear`` or ``cosine``.
            final_fraction: LR at the last step, as a fraction of the base LR (0: decay to zero).
            last_epoch: The last step done (-1: a new run); Lightning restores it when resuming.
        """
        if not 0 <= warmup < 1:
            raise UserError(f"WarmupDecayLR: warmup is a share of the run's steps and must lie in [0, 1), got {warmup}.")
        if not 0 <= final_fraction <= 1:
            raise UserError(f"WarmupDecayLR: final_fraction must lie in [0, 1], got {final_fraction}.")
        if decay not in ("linear", "cosine"):
            raise UserError(f"WarmupDecayLR: decay must be 'linear' or 'cosine', got {decay!r}.")
        self.warmup = warmup
        self.decay = decay
        self.final_fraction = final_fraction
        self.total_steps = 1
        super().__init__(optimizer, last_epoch)

    def set_total_steps(self, total_steps: int) -> None:
        """Fix the run's length in optimizer steps and set the LR of the current step accordingly."""
        if total_steps < 1:
            raise UserError(f"WarmupDecayLR needs at least one training step, got {total_steps}.")
        self.total_steps = int(total_steps)
        lrs = self.get_lr()
        set_last_lrs(self, lrs)
        for group, lr in zip(self.optimizer.param_groups, lrs):
            if isinstance(group["lr"], Tensor):  # a captured step reads it: change it in place
                group["lr"].fill_(lr)
            else:
                group["lr"] = lr

    def factor(self, step: int) -> float:
        """The LR at ``step`` (0-based) as a fraction of the base LR."""
        warmup_steps = round(self.warmup * self.total_steps)
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, self.total_steps - warmup_steps))
        shape = 1 - progress if self.decay == "linear" else (1 + math.cos(math.pi * progress)) / 2
        return self.final_fraction + (1 - self.final_fraction) * shape

    def get_lr(self) -> list[float]:
        """The LR of each parameter group at the current step."""
        return [base * self.factor(self.last_epoch) for base in self.base_lrs]
