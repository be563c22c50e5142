"""Figures and reports of an archive where some classes have no images (a user's subset of CIFAR-100):
those classes are drawn and reported as having no images, never as 0 % (src/cifar_resnet/figures.py, reports.py)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from matplotlib.colors import to_hex

from cifar_resnet.data.archive import load_cifar100
from cifar_resnet.data.synthetic import fine_to_coarse, write_synthetic_archive
from cifar_resnet.drawing import render
from cifar_resnet.figures import (
    NO_IMAGES,
    UNKNOWN_GROUP,
    class_accuracy_figure,
    confusion_matrix_figure,
    per_class_accuracy,
    superclass_accuracy,
    superclass_accuracy_figure,
)
from cifar_resnet.reports import build_report, format_report
from conftest import CONFIGS, run_cli, tiny_args

SEEN = list(range(0, 100, 10))  # 10 of the 100 classes have images


def subset_results() -> tuple[torch.Tensor, torch.Tensor, list[str], list[str]]:
    """A confusion matrix of 10 classes with 4 images each (half right), the superclass map with the other 90
    classes unknown (-1), and the class and superclass names."""
    confusion = torch.zeros(100, 100, dtype=torch.long)
    for k, c in enumerate(SEEN):
        confusion[c, c] = 2
        confusion[c, SEEN[(k + 1) % 10]] = 2
    mapping = torch.full((100,), -1)
    mapping[SEEN] = torch.from_numpy(fine_to_coarse()[SEEN])
    return confusion, mapping, [f"class_{i:02d}" for i in range(100)], [f"super_{i:02d}" for i in range(20)]


def test_classes_and_superclasses_without_images_have_no_accuracy_not_zero() -> None:
    confusion, mapping, names, super_names = subset_results()
    accuracy = per_class_accuracy(confusion)
    assert accuracy[SEEN].tolist() == [0.5] * 10 and accuracy.isnan().sum() == 90
    exact, right = superclass_accuracy(confusion, mapping, 20)  # was: one_hot of -1, a crash
    occurring = sorted(set(fine_to_coarse()[SEEN].tolist()))
    assert exact.isnan().sum() == 20 - len(occurring) and not exact[occurring].isnan().any()
    assert float((exact[occurring] * torch.tensor([sum(mapping[SEEN] == s) for s in occurring])).sum()) == pytest.approx(5)

    trainer = SimpleNamespace(
        datamodule=SimpleNamespace(class_names=names, superclass_names=super_names, fine_to_coarse=mapping, displayable=None),
        ckpt_path="x.ckpt", callback_metrics={"test/top1": torch.tensor(0.5)},
    )  # fmt: skip
    report = json.loads(json.dumps(build_report(trainer, confusion), allow_nan=False))  # strict JSON: no NaN
    assert report["classes"]["class_01"] == {"accuracy": None, "images": 0}
    assert report["classes"]["class_10"] == {"accuracy": 0.5, "images": 4}
    assert sum(v["accuracy"] is None for v in report["superclasses"].values()) == 20 - len(occurring)
    assert set(report["best_classes"]) == {names[c] for c in SEEN}
    assert "class_01" not in format_report(report, 5)


def test_figures_mark_classes_without_images_and_name_no_superclass_wrongly() -> None:
    confusion, mapping, names, super_names = subset_results()
    bars = class_accuracy_figure(per_class_accuracy(confusion), names, mapping, super_names, "t")
    ax = bars.axes[0]
    legend = [text.get_text() for text in ax.get_legend().get_texts()]
    assert legend == ["mean over the 10 classes with images", "no images"]
    mean = [line for line in ax.get_lines() if line.get_linestyle() == "--"][0]
    assert mean.get_ydata()[0] == pytest.approx(0.5), "the mean is over the classes with images"
    grey = [p for p in ax.patches if to_hex(p.get_facecolor()) == NO_IMAGES]
    assert len(grey) == 90 and all(p.get_height() == 1 for p in grey)
    groups = [t.get_text() for t in ax.child_axes[0].get_xticklabels()] if ax.child_axes else []
    assert groups[-1] == UNKNOWN_GROUP and super_names[19] not in groups[-1:]  # was: "super 19" over 90 classes

    matrix = confusion_matrix_figure(confusion, names, mapping, super_names, "t")
    shown = matrix.axes[0].get_images()[0].get_array()
    assert np.ma.getmaskarray(shown).sum() + np.isnan(np.ma.getdata(shown)).sum() >= 90 * 100
    assert "no images" in matrix.axes[0].get_ylabel()

    exact, right = superclass_accuracy(confusion, mapping, 20)
    figure = superclass_accuracy_figure(exact, right, super_names, "t")
    assert "no images" in [text.get_text() for text in figure.axes[0].get_legend().get_texts()]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert all(render(fig).std() > 0 for fig in (bars, matrix, figure))  # drawn without a warning or an error


def test_a_class_without_training_images_takes_its_superclass_from_the_test_split(tmp_path: Path) -> None:
    write_synthetic_archive(tmp_path, n_train=100, n_test=50, classes=SEEN)
    data = load_cifar100(tmp_path / "cifar-100-python")
    mapping = data.fine_to_coarse()
    assert mapping[SEEN].tolist() == fine_to_coarse()[SEEN].tolist() and (mapping == -1).sum() == 90
    data.train.labels[data.train.labels == 10] = 20  # class 10 now only in the test split
    assert int(data.fine_to_coarse()[10]) == int(fine_to_coarse()[10])


@pytest.mark.slow
def test_an_archive_with_10_of_the_100_classes_fits_tests_and_draws(tmp_path: Path) -> None:
    data = write_synthetic_archive(tmp_path / "data", n_train=300, n_test=100, classes=SEEN)
    args = [*tiny_args(data, tmp_path / "runs"), "--trainer.precision", "32-true", "--data.val_size", "50"]
    run_cli("fit", "--config", str(CONFIGS / "scratch.yaml"), *args, cwd=tmp_path)
    proc = run_cli("test", "--config", str(CONFIGS / "scratch.yaml"), *args, "--ckpt_path", "last", cwd=tmp_path)
    assert "Test report: 100 images" in proc.stdout
    run = tmp_path / "runs" / "scratch" / "version_0-test"
    report = json.loads((run / "test_report.json").read_text())
    assert sum(c["accuracy"] is None for c in report["classes"].values()) == 90
    drawn = {p.parent.relative_to(run / "figures").as_posix() for p in (run / "figures").rglob("*.png")}
    assert {"test/confusion_matrix", "test/class_accuracy", "test/superclass_accuracy"} <= drawn
