"""TensorBoard's HPARAMS tab: every run's hyper-parameters next to its final metrics."""

from __future__ import annotations

import importlib
import inspect
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from torch.utils.tensorboard.summary import hparams

from cifar_resnet.compat import write_tensorboard_summary


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


def tensorboard(trainer: Trainer) -> TensorBoardLogger | None:
    """The trainer's TensorBoard logger, if it has one."""
    return next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)
