"""What ``fit``, ``test`` and ``validate`` print at the end: the best checkpoint, and a report saved as JSON."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.trainer.states import TrainerFn
from torch import Tensor

from cifar_resnet.atomic import atomic_write_text
from cifar_resnet.callbacks import data_questions
from cifar_resnet.figures import per_class_accuracy, superclass_accuracy
from cifar_resnet.outputs import check_output

REPORT_NAMES = {"test": "test_report.json", "val": "val_report.json"}


class FitSummary(Callback):
    """At the end of ``fit``, prints one line: the best monitored score and the path of its checkpoint."""

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        checkpoint = trainer.checkpoint_callback
        if not trainer.is_global_zero or checkpoint is None:
            return
        if checkpoint.best_model_path:
            score = checkpoint.best_model_score
            value = f"{float(score):.4f}" if score is not None else "n/a"
            print(f"Best {checkpoint.monitor or 'checkpoint'}: {value}, checkpoint: {checkpoint.best_model_path}", flush=True)
        elif checkpoint.last_model_path:
            print(f"No best checkpoint ({checkpoint.monitor} was not logged); last checkpoint: {checkpoint.last_model_path}", flush=True)


class TestReport(Callback):
    """After ``test`` (and ``validate``): prints top-1, top-5, loss and the best and worst classes, and writes
    the metrics, every class's and superclass's accuracy to ``test_report.json`` (``val_report.json``) in
    the run's log folder. The table is printed once the progress bar has closed."""

    def __init__(self, num_classes_shown: int = 5) -> None:
        """
        Args:
            num_classes_shown: How many best and worst classes the printed table lists.
        """
        self.num_classes_shown = num_classes_shown
        self._printout: str | None = None

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._report(trainer, pl_module, "test")

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.state.fn == TrainerFn.VALIDATING:  # not the validation epochs of `fit`
            self._report(trainer, pl_module, "val")

    def _report(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Build and save the report; keep its table for :meth:`teardown`."""
        confusion = pl_module.confusion_matrix(stage).cpu()  # every process takes part in the reduction
        if not trainer.is_global_zero:
            return
        report = build_report(trainer, confusion, stage)
        path = Path(trainer.log_dir or trainer.default_root_dir) / REPORT_NAMES[stage]
        check_output(path, "report", "The report")
        atomic_write_text(path, json.dumps(report, indent=2) + "\n")
        self._printout = format_report(report, self.num_classes_shown) + f"\nSaved to {path}"

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Print the table: by now the progress bar is closed, so the table starts on its own line."""
        if self._printout is not None:
            print(self._printout, flush=True)
            self._printout = None


def build_report(trainer: Trainer, confusion: Tensor, stage: str = "test") -> dict[str, Any]:
    """``stage``'s metrics, per-class and per-superclass accuracy, as plain JSON-ready values (an accuracy
    is ``None`` for a class or superclass without images)."""
    data = data_questions(trainer)
    names, super_names = data.class_names, data.superclass_names
    counts = confusion.sum(dim=1)
    accuracy = per_class_accuracy(confusion)
    exact, coarse = superclass_accuracy(confusion, data.fine_to_coarse, len(super_names))
    seen = [i for i in range(len(names)) if counts[i] > 0]
    ranked = sorted(seen, key=lambda i: (-float(accuracy[i]), names[i]))
    return {
        "stage": stage,
        "checkpoint": trainer.ckpt_path,
        "images": int(counts.sum()),
        "metrics": {k: float(v) for k, v in sorted(trainer.callback_metrics.items()) if k.startswith(f"{stage}/")},
        "classes": {names[i]: {"accuracy": share(accuracy[i]), "images": int(counts[i])} for i in range(len(names))},
        "superclasses": {
            name: {"accuracy": share(exact[s]), "right_superclass": share(coarse[s])} for s, name in enumerate(super_names)
        },
        "best_classes": [names[i] for i in ranked],
        "worst_classes": [names[i] for i in reversed(ranked)],
    }


def share(value: Tensor) -> float | None:
    """An accuracy as JSON: ``None`` (``null``) where there were no images to measure it on (NaN)."""
    return None if math.isnan(float(value)) else float(value)


def format_report(report: dict[str, Any], shown: int) -> str:
    """A short plain-text table of a report from :func:`build_report`."""
    metrics, stage = report["metrics"], report.get("stage", "test")
    title = "Test report" if stage == "test" else "Validation report"
    lines = [f"{title}: {plural(report['images'], 'image')}, checkpoint {report['checkpoint']}"]
    for key in (f"{stage}/top1", f"{stage}/top1_tta", f"{stage}/top5", f"{stage}/top5_tta", f"{stage}/loss"):
        if key in metrics:
            lines.append(f"  {key:<16}{metrics[key]:.4f}")
    for title, names in (("best classes", report["best_classes"]), ("worst classes", report["worst_classes"])):
        listed = ", ".join(f"{n} {report['classes'][n]['accuracy']:.2f}" for n in names[:shown])
        lines.append(f"  {title:<16}{listed}")
    return "\n".join(lines)


def plural(count: int, noun: str) -> str:
    """``1 image``, ``2 images``."""
    return f"{count} {noun}{'' if count == 1 else 's'}"
