"""The progress bar, with its numbers in a fixed format."""

from __future__ import annotations

from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import TQDMProgressBar


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
