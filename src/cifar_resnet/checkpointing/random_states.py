"""The random generators' states, kept in checkpoints so a resumed run draws what an uninterrupted one would."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from lightning.pytorch import Callback
from torch import Tensor

from cifar_resnet.checkpointing.compatibility import damaged_part


class RandomStates(Callback):
    """Keeps the random generators' states in every checkpoint and restores them on resume, so a
    resumed run draws the same flips and dropout masks as an uninterrupted one."""

    def state_dict(self) -> dict[str, Tensor]:
        """The generators' states (saved into the checkpoint)."""
        return rng_states()

    def load_state_dict(self, state_dict: dict[str, Tensor]) -> None:
        """Restore the generators' states from a checkpoint."""
        set_rng_states(state_dict)


def rng_states() -> dict[str, Tensor]:
    """The CPU and current CUDA device's random generator states, as tensors (``weights_only``-safe).

    Under DDP every rank is seeded alike and draws alike, so rank 0's states (the ones a checkpoint
    keeps) are every rank's.
    """
    states = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state()
    return states


def set_rng_states(states: Mapping[str, Tensor]) -> None:
    """Restore what :func:`rng_states` returned."""
    for device, restore in (("cpu", torch.set_rng_state), ("cuda", torch.cuda.set_rng_state)):
        if device not in states or (device == "cuda" and not torch.cuda.is_available()):
            continue
        try:
            restore(states[device])
        except (TypeError, RuntimeError, ValueError) as err:
            raise damaged_part(f"random generator state ('{device}')", f"cannot be restored ({err})") from err
