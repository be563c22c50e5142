"""An exponential moving average of the weights: Lightning's callback, averaging all tensors at once."""

from __future__ import annotations

from lightning.pytorch.callbacks import EMAWeightAveraging, WeightAveraging
from torch.optim.swa_utils import get_ema_multi_avg_fn


class EMAWeights(EMAWeightAveraging):
    """Lightning's ``EMAWeightAveraging``, with torch's multi-tensor EMA update.

    Lightning's callback hands ``AveragedModel`` a per-tensor averaging function, which updates the
    parameters and buffers one at a time (hundreds of small kernels a step); this passes torch's
    ``get_ema_multi_avg_fn`` too, which ``AveragedModel`` prefers: a few ``foreach`` kernels per step,
    the same arithmetic. Everything else (when to update, swapping the average in for validation,
    the average as the checkpoint's ``state_dict``, exact resume) is Lightning's.
    """

    def __init__(
        self,
        decay: float = 0.999,
        update_every_n_steps: int = 1,
        update_starting_at_step: int | None = None,
        update_starting_at_epoch: int | None = None,
        use_buffers: bool = True,
    ) -> None:
        """
        Args:
            decay: Weight of the old average at each update: the average remembers ~1 / (1 - decay) updates.
            update_every_n_steps: Update the average every this many optimizer steps.
            update_starting_at_step: First optimizer step that updates the average (default: the first).
            update_starting_at_epoch: First epoch that updates the average (default: the first).
            use_buffers: Average the BatchNorm statistics too (otherwise the average uses the model's).
        """
        # EMAWeightAveraging.__init__ (Lightning 2.6) always passes the per-tensor `avg_fn`, and
        # AveragedModel takes only one of the two, so its parent is set up here with the multi-tensor one,
        # and the three settings its `should_update` reads are set as it sets them.
        WeightAveraging.__init__(self, use_buffers=use_buffers, multi_avg_fn=get_ema_multi_avg_fn(decay))
        self.update_every_n_steps = update_every_n_steps
        self.update_starting_at_step = update_starting_at_step
        self.update_starting_at_epoch = update_starting_at_epoch
