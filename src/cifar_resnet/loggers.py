"""What differs between loggers: who owns the run folder, and how a resumed run goes on logging into the same
MLflow run or W&B run.

TensorBoard and CSV keep their files in ``<save_dir>/<name>/version_N/``, which is the run folder. Other loggers
(MLflow, W&B, ...) keep theirs elsewhere (a tracking store, ``wandb/``), so the program owns a run folder of the
same shape, ``<default_root_dir or runs>/<recipe>/version_N/``, for checkpoints, ``config.yaml``, the lock,
reports and predictions, and writes into it which MLflow run and W&B run the logs went to (:data:`RUN_RECORD`),
so that ``--ckpt_path last`` appends to those runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from jsonargparse import Namespace
# Private, but what MLFlowLogger.log_hyperparams itself uses: the parameters are compared as MLflow got them.
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only

from cifar_resnet.atomic import atomic_write
from cifar_resnet.compat import logged_hyperparameters
from cifar_resnet.errors import UserError

# Loggers whose folders are <save_dir>/<name>/<version>/ and whose ``version`` may be a folder name.
VERSIONED_LOGGERS = ("TensorBoardLogger", "CSVLogger")
RUN_RECORD = "logger_runs.json"
# What identifies a logger's run, by logger class: (the attribute that gives it, the init argument that resumes it).
RUN_IDS = {"MLFlowLogger": ("run_id", "run_id"), "WandbLogger": ("version", "id")}


def class_name(logger: Any) -> str | None:
    """The class name of a logger config (``class_path`` ``lightning.pytorch.loggers.MLFlowLogger``: ``MLFlowLogger``)."""
    class_path = logger.get("class_path") if isinstance(logger, Namespace) else None
    return str(class_path).rsplit(".", 1)[-1] if class_path else None


def logger_configs(logger: Any) -> list[Namespace]:
    """The logger configs of ``trainer.logger`` (one, a list, or none)."""
    loggers = logger if isinstance(logger, list) else [logger]
    return [lg for lg in loggers if isinstance(lg, Namespace)]


def owns_its_folder(logger: Any) -> bool:
    """Whether the first logger (the one Lightning takes the run folder from) is TensorBoard or CSV."""
    configs = logger_configs(logger)
    return bool(configs) and class_name(configs[0]) in VERSIONED_LOGGERS


def resume_logger_runs(logger: Any, run_dir: Path) -> None:
    """Point the MLflow and W&B loggers of a resumed run at the runs its :data:`RUN_RECORD` names, unless the
    config names a run already."""
    path = run_dir / RUN_RECORD
    if not path.is_file():
        return
    try:
        recorded = json.loads(path.read_bytes().decode("utf-8"))
        problem = None
    except ValueError as err:  # not UTF-8, not JSON
        recorded, problem = [], err
    if not isinstance(recorded, list) or not all(e is None or (isinstance(e, dict) and {"logger", "id"} <= e.keys()) for e in recorded):
        problem = "not a list of runs"
    if problem is not None:
        raise UserError(
            f"'{path}' is damaged ({problem}): it records which MLflow/W&B run this run folder continues. Restore it, "
            "or delete it to log the resumed run as a new one."
        )
    for index, config in enumerate(logger_configs(logger)):
        name = class_name(config)
        entry = recorded[index] if index < len(recorded) else None
        if name not in RUN_IDS or not entry or entry.get("logger") != name:
            continue
        argument = RUN_IDS[name][1]
        if config.get("init_args") is None:
            config.init_args = Namespace()
        given = config.init_args.get(argument) or (config.init_args.get("version") if name == "WandbLogger" else None)
        if given is None:
            config.init_args[argument] = entry["id"]


def keep_logged_params(trainer: Trainer) -> None:
    """Let a resumed run's MLflow loggers log only the parameters the MLflow run has not got with another value:
    MLflow refuses to change a parameter (a resume with another ``--data.batch_size``, say, would fail). Which
    ones keep their first value there is said in one line; the run's ``config.yaml`` records the new ones."""
    for logger in trainer.loggers:
        if type(logger).__name__ == "MLFlowLogger":
            logger.log_hyperparams = _unchanged_params_only(logger, logger.log_hyperparams)


def _unchanged_params_only(logger: Any, log: Any) -> Any:
    def log_hyperparams(params: dict[str, Any] | Namespace) -> None:
        if rank_zero_only.rank != 0:
            return
        # Flattened and cut to 250 characters as Lightning's MLFlowLogger.log_hyperparams does.
        flat = logged_hyperparameters(params)
        logged = logger.experiment.get_run(logger.run_id).data.params
        changed = sorted(k for k, v in flat.items() if k in logged and logged[k] != str(v)[:250])
        if changed:
            rank_zero_info(
                f"MLflow keeps a run's parameters: {', '.join(changed)} keep{'s' if len(changed) == 1 else ''} the "
                "value of the run's start there (this command's values are in the run's config.yaml)."
            )
        log({k: v for k, v in flat.items() if k not in changed})

    return log_hyperparams


class LoggerRunRecord(Callback):
    """Writes which MLflow run and W&B run a run's logs go to into :data:`RUN_RECORD` in the run folder."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if not trainer.is_global_zero:
            return
        entries: list[dict[str, Any] | None] = []
        for logger in trainer.loggers:
            name = type(logger).__name__
            if name in RUN_IDS:
                if name == "WandbLogger":
                    logger.experiment  # noqa: B018 (starts the W&B run, which gives it its id)
                entries.append({"logger": name, "id": getattr(logger, RUN_IDS[name][0])})
            else:
                entries.append(None)
        if any(entries):
            text = json.dumps(entries, indent=1) + "\n"
            path = self.run_dir / RUN_RECORD
            if not path.is_file() or path.read_text() != text:
                self.run_dir.mkdir(parents=True, exist_ok=True)
                atomic_write(path, lambda f: f.write(text.encode()))


class RunSettings(Callback):
    """What TensorBoard's HPARAMS tab has (``callbacks.HParamsSummary``) beyond the model's and the data's
    settings, which Lightning itself logs to every logger: the recipe and ``max_epochs`` as MLflow parameters
    and W&B config, and after ``fit`` the best checkpoint's score as ``<monitor>_best`` (``val/top1_best``)."""

    def __init__(self, recipe: str) -> None:
        self.recipe = recipe

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._log(trainer, {"recipe": self.recipe, "max_epochs": trainer.max_epochs})

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._log(trainer, {"recipe": self.recipe})

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        checkpoint = trainer.checkpoint_callback
        score = getattr(checkpoint, "best_model_score", None)
        if trainer.is_global_zero and score is not None and checkpoint.monitor:
            for logger in _with_settings_store(trainer):
                logger.log_metrics({f"{checkpoint.monitor}_best": float(score)}, step=trainer.global_step)

    @staticmethod
    def _log(trainer: Trainer, params: dict[str, Any]) -> None:
        if trainer.is_global_zero:
            for logger in _with_settings_store(trainer):
                logger.log_hyperparams(params)


def _with_settings_store(trainer: Trainer) -> list[Any]:
    """The trainer's MLflow and W&B loggers."""
    return [logger for logger in trainer.loggers if type(logger).__name__ in RUN_IDS]


class RunFolderTrainer(Trainer):
    """Lightning's Trainer whose ``log_dir`` is the program's run folder when the program owns it (MLflow, W&B,
    no logger): Lightning's would be the tracking store's root, shared by every run."""

    program_run_dir: str | None = None

    @property
    def log_dir(self) -> str | None:
        if self.program_run_dir is None:
            return super().log_dir
        return self.strategy.broadcast(self.program_run_dir)


def user_message(err: BaseException) -> str | None:
    """A one-paragraph message for a logger's refusal that a user fixes with a setting, else ``None``."""
    text = str(err)
    if type(err).__name__ == "MlflowException" and "MLFLOW_ALLOW_FILE_STORE" in text:
        return (
            "MLflow refuses to write to a local file store (a folder such as ./mlruns, MLflow's default tracking URI): "
            "this MLflow version keeps that store in maintenance mode. Set MLFLOW_ALLOW_FILE_STORE=true in the "
            "environment (`MLFLOW_ALLOW_FILE_STORE=true cifar-resnet fit ...`), or log to an MLflow server or "
            "database with `--trainer.logger.init_args.tracking_uri http://HOST:5000` (or MLFLOW_TRACKING_URI)."
        )
    return None
