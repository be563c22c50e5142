"""What ``fit`` and ``test`` print at the end: the best checkpoint, and a test report saved as JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer
from torchmetrics.classification import MulticlassConfusionMatrix

from cifar_resnet.callbacks import class_info
from cifar_resnet.figures import per_class_accuracy, superclass_accuracy

REPORT_NAME = "test_report.json"


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
    """After ``test``: prints top-1, top-5, loss and the best and worst classes, and writes the metrics,
    every class's and superclass's accuracy to ``test_report.json`` in the run's log folder."""

    def __init__(self, num_classes_shown: int = 5) -> None:
        """
        Args:
            num_classes_shown: How many best and worst classes the printed table lists.
        """
        self.num_classes_shown = num_classes_shown
        self.confusion: MulticlassConfusionMatrix | None = None

    def on_test_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.confusion is None:
            self.confusion = MulticlassConfusionMatrix(pl_module.hparams.num_classes)
        self.confusion = self.confusion.to(pl_module.device)
        self.confusion.reset()

    def on_test_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self.confusion.update(outputs["logits"].argmax(dim=-1), batch[1])

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        confusion = self.confusion.compute().cpu()  # every process takes part in the reduction
        if not trainer.is_global_zero:
            return
        report = build_report(trainer, pl_module, confusion)
        path = Path(trainer.log_dir or trainer.default_root_dir) / REPORT_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=2) + "\n")
        print(format_report(report, self.num_classes_shown) + f"\nSaved to {path}", flush=True)


def build_report(trainer: Trainer, pl_module: LightningModule, confusion: Any) -> dict[str, Any]:
    """The test metrics, per-class and per-superclass accuracy, as plain JSON-ready values."""
    names, fine_to_coarse, super_names = class_info(trainer, pl_module.hparams.num_classes)
    counts = confusion.sum(dim=1)
    accuracy = per_class_accuracy(confusion)
    exact, coarse = superclass_accuracy(confusion, fine_to_coarse, len(super_names))
    seen = [i for i in range(len(names)) if counts[i] > 0]
    ranked = sorted(seen, key=lambda i: (-float(accuracy[i]), names[i]))
    return {
        "checkpoint": trainer.ckpt_path,
        "images": int(counts.sum()),
        "metrics": {k: float(v) for k, v in sorted(trainer.callback_metrics.items()) if k.startswith("test/")},
        "classes": {names[i]: {"accuracy": float(accuracy[i]), "images": int(counts[i])} for i in range(len(names))},
        "superclasses": {
            name: {"accuracy": float(exact[s]), "right_superclass": float(coarse[s])} for s, name in enumerate(super_names)
        },
        "best_classes": [names[i] for i in ranked],
        "worst_classes": [names[i] for i in reversed(ranked)],
    }


def format_report(report: dict[str, Any], shown: int) -> str:
    """A short plain-text table of a report from :func:`build_report`."""
    metrics = report["metrics"]
    lines = [f"Test report: {report['images']} images, checkpoint {report['checkpoint']}"]
    for key in ("test/top1", "test/top5", "test/loss"):
        if key in metrics:
            lines.append(f"  {key:<16}{metrics[key]:.4f}")
    for title, names in (("best classes", report["best_classes"]), ("worst classes", report["worst_classes"])):
        listed = ", ".join(f"{n} {report['classes'][n]['accuracy']:.2f}" for n in names[:shown])
        lines.append(f"  {title:<16}{listed}")
    return "\n".join(lines)
