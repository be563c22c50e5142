"""Every use of Lightning's and torch's private names, in one place.

Each entry says which version it was written against and what it works around, so that an upgrade is
checked here first (``make test-latest`` runs the suite against the newest Lightning release). Written
against Lightning 2.6.6, torchmetrics 1.x and torch 2.14. Everything else in the program uses public APIs only.
"""

from __future__ import annotations

import copy
import pickle
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import WeightAveraging
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.core.optimizer import LightningOptimizer
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies.launchers import _SubprocessScriptLauncher
from torch import Tensor
from torch.optim.lr_scheduler import LRScheduler
from torch.optim.swa_utils import AveragedModel

# ---- LightningCLI -------------------------------------------------------------------------------


class CLIInternals(LightningCLI):
    """The LightningCLI 2.6 methods this program changes that have no public hook.

    Subclasses fill ``subcommand_help`` (the one-line help of each subcommand in ``--help``),
    ``option_help`` (help texts of options by name) and ``subcommand_defaults`` (defaults per subcommand).
    """

    subcommand_help: dict[str, str] = {}
    option_help: dict[str, str] = {}
    subcommand_defaults: dict[str, dict[str, Any]] = {}

    def _parse_ckpt_path(self) -> None:
        """Leave the config as given.

        Lightning 2.6's LightningCLI loads the ``--ckpt_path`` checkpoint here (always with
        ``weights_only=True``, whatever ``--weights_only`` says) and silently replaces the config's model
        settings by the checkpoint's. This program keeps the config and checks the checkpoint against
        it in one place, when the Trainer loads it (:func:`checkpointing.check_checkpoint_fits`).
        """

    def _add_subcommands(self, parser: LightningArgumentParser, **kwargs: Any) -> None:
        """Lightning's subcommands, listed in ``--help`` with ``subcommand_help`` (2.6 takes the Trainer
        methods' docstrings and offers no way to change them)."""
        super()._add_subcommands(parser, **kwargs)
        for choice in parser._subcommands_action._choices_actions:
            choice.help = self.subcommand_help.get(choice.dest, choice.help)

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any) -> LightningArgumentParser:
        """The subcommand's parser with ``option_help`` and ``subcommand_defaults`` (2.6 has no public hook
        that knows which subcommand a parser is for)."""
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        parser.set_defaults(**self.subcommand_defaults.get(subcommand, {}))
        for action in parser._actions:
            action.help = self.option_help.get(action.dest, action.help)
        return parser


# ---- Lightning's Trainer, modules, optimizers, launchers and loggers ---------------------------------


def attached_trainer(module: LightningModule) -> Trainer | None:
    """The Trainer ``module`` is attached to, or None (``LightningModule.trainer`` raises then in 2.6)."""
    return module._trainer


@contextmanager
def counted_optimizer_step(optimizer: LightningOptimizer) -> Iterator[None]:
    """Count an optimizer step that does not go through ``LightningOptimizer.step`` (a CUDA graph replay).

    Lightning 2.6 counts optimizer steps (``trainer.global_step``, the progress a checkpoint records) in
    the two hooks its manual-optimization loop sets on the optimizer for ``step`` to call.
    """
    optimizer._on_before_step()
    yield
    optimizer._on_after_step()


def record_hyperparameters(module: Any) -> None:
    """Make a LightningModule's or LightningDataModule's ``hparams`` as they are now the ones Lightning records (``hparams.yaml``, checkpoints,
    loggers): Lightning 2.6 keeps a copy from ``save_hyperparameters`` in ``_hparams_initial``."""
    module._hparams_initial = copy.deepcopy(module.hparams)


def kill_launched_processes(trainer: Trainer, signum: int = getattr(signal, "SIGKILL", signal.SIGTERM)) -> None:
    """Kill the DDP ranks this process started. Lightning 2.6 does it itself only on Ctrl-C and SIGTERM,
    through its launcher's private class; otherwise the started ranks wait in a collective until its
    timeout (NCCL: 10 minutes and more), holding GPUs."""
    launcher = trainer.strategy.launcher
    if isinstance(launcher, _SubprocessScriptLauncher):
        launcher.kill(signum)


def write_tensorboard_summary(logger: TensorBoardLogger, summary: Any) -> None:
    """Write a raw summary protobuf (an HPARAMS session record) to the logger's event file: torch's
    ``SummaryWriter`` (2.x) only writes them through its file writer, which it does not expose."""
    logger.experiment._get_file_writer().add_summary(summary)


class WeightAveragingState(WeightAveraging):
    """Lightning's ``WeightAveraging`` (2.6) with the state its subclasses need as properties: it keeps
    the averaged model and when it last updated in private attributes."""

    @property
    def average_model(self) -> AveragedModel | None:
        """The averaged copy of the module (made when ``fit`` starts)."""
        return self._average_model

    @property
    def averages_buffers(self) -> bool:
        """Whether buffers (BatchNorm statistics) are averaged too."""
        return self._use_buffers

    @property
    def latest_update_step(self) -> int:
        """The optimizer step of the last update (saved in checkpoints)."""
        return self._latest_update_step

    @latest_update_step.setter
    def latest_update_step(self, step: int) -> None:
        self._latest_update_step = step

    @property
    def latest_update_epoch(self) -> int:
        """The epoch of the last end-of-epoch update."""
        return self._latest_update_epoch

    @latest_update_epoch.setter
    def latest_update_epoch(self, epoch: int) -> None:
        self._latest_update_epoch = epoch


def logged_hyperparameters(params: Any) -> dict[str, Any]:
    """``params`` flattened (``a/b`` keys) and converted as Lightning 2.6's loggers do before they log them
    (``MLFlowLogger.log_hyperparams``), so that what a logger holds can be compared with them."""
    from lightning.fabric.utilities.logger import _convert_params, _flatten_dict

    return _flatten_dict(_convert_params(params))


def multiclass_predictions_and_targets(preds: Tensor, target: Tensor, ignore_index: int | None) -> tuple[Tensor, Tensor]:
    """Logits or class indices and targets in the form torchmetrics 1.x counts them in a multiclass confusion
    matrix (its formatting step, which it keeps private)."""
    from torchmetrics.functional.classification.confusion_matrix import _multiclass_confusion_matrix_format

    return _multiclass_confusion_matrix_format(preds, target, ignore_index)


# ---- torch -------------------------------------------------------------------------------------


def set_last_lrs(scheduler: LRScheduler, lrs: list[float]) -> None:
    """Set what ``scheduler.get_last_lr()`` returns (torch 2.x keeps it in ``_last_lr``)."""
    scheduler._last_lr = lrs


def scale_and_add(tensors: list[Tensor], others: list[Tensor], weight: Tensor) -> None:
    """``t = weight * t + (1 - weight) * o`` for every pair, in a few multi-tensor kernels, with ``weight`` a
    device tensor that is never read on the host (torch's ``foreach`` ops are underscore-named; its
    ``_foreach_lerp_`` reads a tensor weight on the host)."""
    torch._foreach_mul_(tensors, weight)
    torch._foreach_add_(tensors, torch._foreach_mul(others, 1 - weight))


def copy_all(tensors: list[Tensor], others: list[Tensor]) -> None:
    """Copy every tensor of ``others`` into the matching one of ``tensors`` in one multi-tensor kernel."""
    torch._foreach_copy_(tensors, others)


def inductor_default_cache_dir() -> str:
    """The folder torch's Inductor uses for its caches when ``TORCHINDUCTOR_CACHE_DIR`` is not set (torch 2.x
    sets the variable to it on import, so only this tells a user's choice from the default). Imported
    here, when asked, because it loads the compiler."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    return default_cache_dir()


# The pure-Python pickler, whose dispatch table can be extended per class (the C one's cannot).
PythonPickler = pickle._Pickler
