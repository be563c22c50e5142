"""Matplotlib figures of per-class results, ordered and coloured by CIFAR-100's 20 superclasses.

A class without images (in a subset of CIFAR-100) has no accuracy (NaN here, ``null`` in the reports) and
is drawn as such, greyed out and marked "no images"; one that had no images to read its superclass off
has superclass -1 and goes last, under "superclass unknown".

Pure functions of tensors and names; the callbacks decide when to draw and where to log. Figures are
built with ``matplotlib.figure.Figure`` (no pyplot): no window, no global state, safe off the main thread.
Layouts are fixed rather than ``constrained``: drawing 200 tick labels is slow enough already.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.colors import PowerNorm
from matplotlib.figure import Figure
from torch import Tensor


UNKNOWN_GROUP = "superclass unknown"
NO_IMAGES = "#dddddd"  # the grey of classes without images


def superclass_order(fine_to_coarse: Tensor, class_names: Sequence[str]) -> Tensor:
    """Class indices sorted by superclass, then by name: neighbours in a figure share a superclass (the
    classes of no known superclass, -1, come last)."""
    keys = sorted(range(len(class_names)), key=lambda i: (int(fine_to_coarse[i]) < 0, int(fine_to_coarse[i]), class_names[i]))
    return torch.tensor(keys)


def per_class_accuracy(confusion: Tensor) -> Tensor:
    """Recall of each class from a confusion matrix (rows: true class); NaN for classes without images."""
    confusion = confusion.double()
    counts = confusion.sum(dim=1)
    return torch.where(counts > 0, confusion.diagonal() / counts.clamp(min=1), torch.nan)


def superclass_accuracy(confusion: Tensor, fine_to_coarse: Tensor, num_superclasses: int) -> tuple[Tensor, Tensor]:
    """Per superclass: the share of its images given the exact class, and the share given any class of it
    (NaN for a superclass without images). Classes of no known superclass (-1) belong to none."""
    confusion, fine_to_coarse = confusion.double().cpu(), fine_to_coarse.cpu()
    onehot = torch.nn.functional.one_hot(fine_to_coarse.clamp(min=0), num_superclasses).double()
    onehot *= (fine_to_coarse >= 0).double()[:, None]
    coarse = onehot.T @ confusion @ onehot  # (true superclass, predicted superclass) counts
    totals = onehot.T @ confusion.sum(dim=1)  # images per true superclass
    exact = (onehot.T @ confusion.diagonal()) / totals.clamp(min=1)
    nan = torch.tensor(torch.nan, dtype=torch.double)
    return torch.where(totals > 0, exact, nan), torch.where(totals > 0, coarse.diagonal() / totals.clamp(min=1), nan)


def _group_names(coarse_sorted: np.ndarray, centres: np.ndarray, superclass_names: Sequence[str]) -> list[str]:
    """The name of the superclass group around each of ``centres``."""
    codes = [int(coarse_sorted[round(c)]) for c in centres]
    return [superclass_names[code].replace("_", " ") if code >= 0 else UNKNOWN_GROUP for code in codes]


def _grey_out(labels: Sequence[Any], without_images: np.ndarray) -> None:
    """Grey the tick labels of the classes without images."""
    for label, empty in zip(labels, without_images):
        if empty:
            label.set_color("#999999")


def _group_edges(coarse_sorted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Boundaries between superclass groups and the centre of each group, in sorted-class positions."""
    starts = np.flatnonzero(np.r_[True, coarse_sorted[1:] != coarse_sorted[:-1]])
    ends = np.r_[starts[1:], len(coarse_sorted)]
    return starts[1:] - 0.5, (starts + ends - 1) / 2


def confusion_matrix_figure(
    confusion: Tensor, class_names: Sequence[str], fine_to_coarse: Tensor, superclass_names: Sequence[str], title: str
) -> Figure:
    """Row-normalised confusion matrix, classes grouped by superclass with the groups outlined."""
    order = superclass_order(fine_to_coarse, class_names)
    counts = confusion.double().cpu()[order][:, order]
    images = counts.sum(dim=1, keepdim=True)
    rates = torch.where(images > 0, counts / images.clamp(min=1), torch.nan).numpy()  # NaN: drawn grey
    coarse_sorted = fine_to_coarse.cpu()[order].numpy()
    edges, centres = _group_edges(coarse_sorted)
    names = [class_names[i] for i in order]
    n = len(names)

    fig = Figure(figsize=(14, 13))
    ax = fig.add_axes((0.08, 0.09, 0.74, 0.74))
    cmap = colormaps["Blues"].with_extremes(bad=NO_IMAGES)
    image = ax.imshow(rates, cmap=cmap, norm=PowerNorm(gamma=0.5, vmin=0, vmax=1), interpolation="nearest")
    for edge in edges:
        ax.axhline(edge, color="#999999", linewidth=0.5)
        ax.axvline(edge, color="#999999", linewidth=0.5)
    ticks = np.arange(n)
    ax.set_xticks(ticks, names, rotation=90, fontsize=6)
    ax.set_yticks(ticks, names, fontsize=6)
    without_images = (images[:, 0] == 0).numpy()
    _grey_out(ax.get_yticklabels(), without_images)
    _grey_out(ax.get_xticklabels(), without_images)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class" + (" (grey rows: no images)" if without_images.any() else ""))
    groups = _group_names(coarse_sorted, centres, superclass_names)
    top = ax.secondary_xaxis("top")
    top.set_xticks(centres, groups, rotation=90, fontsize=7)
    right = ax.secondary_yaxis("right")
    right.set_yticks(centres, groups, fontsize=7)
    fig.suptitle(title, fontsize=13, y=0.985)
    colorbar = fig.colorbar(image, cax=fig.add_axes((0.95, 0.3, 0.012, 0.4)))
    colorbar.set_label("share of the true class's images (square-root scale)", fontsize=9)
    return fig


def class_accuracy_figure(
    accuracy: Tensor, class_names: Sequence[str], fine_to_coarse: Tensor, superclass_names: Sequence[str], title: str
) -> Figure:
    """Accuracy of each class as bars, grouped and coloured by superclass, with the mean as a line; a class
    without images (accuracy NaN) gets a grey bar marked "no images", not a bar at 0."""
    order = superclass_order(fine_to_coarse, class_names)
    values = accuracy.double().cpu()[order].numpy()
    coarse_sorted = fine_to_coarse.cpu()[order].numpy()
    edges, centres = _group_edges(coarse_sorted)
    colours = colormaps["tab20"](coarse_sorted % 20)
    seen, positions = ~np.isnan(values), np.arange(len(values))

    fig = Figure(figsize=(18, 7))
    ax = fig.add_axes((0.04, 0.16, 0.95, 0.52))
    ax.bar(positions[seen], values[seen], color=colours[seen], width=0.85)
    if not seen.all():
        ax.bar(positions[~seen], 1, color=NO_IMAGES, width=0.85, label="no images")
    if seen.any():
        label = "mean over classes" if seen.all() else f"mean over the {int(seen.sum())} classes with images"
        ax.axhline(float(values[seen].mean()), color="black", linestyle="--", linewidth=0.8, label=label)
    for edge in edges:
        ax.axvline(edge, color="#bbbbbb", linewidth=0.5)
    ax.set_xticks(positions, [class_names[i] for i in order], rotation=90, fontsize=7)
    _grey_out(ax.get_xticklabels(), ~seen)
    ax.set_xlim(-0.5, len(values) - 0.5)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy (top-1)")
    groups = _group_names(coarse_sorted, centres, superclass_names)
    top = ax.secondary_xaxis("top")
    top.set_xticks(centres, groups, rotation=90, fontsize=7)
    ax.legend(loc="upper right", fontsize=8)
    fig.suptitle(title, fontsize=13, y=0.985)
    return fig


def superclass_accuracy_figure(exact: Tensor, coarse: Tensor, superclass_names: Sequence[str], title: str) -> Figure:
    """Per superclass: exact-class accuracy and right-superclass accuracy, worst superclass at the bottom
    (those without images, accuracy NaN, at the top, marked "no images")."""
    order = torch.argsort(exact.double().cpu(), descending=False).numpy()  # NaN sorts last
    exact_sorted, coarse_sorted = exact.double().cpu().numpy()[order], coarse.double().cpu().numpy()[order]
    seen, y = ~np.isnan(exact_sorted), np.arange(len(order))
    fig = Figure(figsize=(9, 7), layout="constrained")
    ax = fig.add_subplot()
    ax.barh(y[seen] + 0.2, coarse_sorted[seen], height=0.4, color="#9ecae1", label="predicted class in the right superclass")
    ax.barh(y[seen] - 0.2, exact_sorted[seen], height=0.4, color="#08519c", label="exact class")
    if not seen.all():
        ax.barh(y[~seen], 1, height=0.8, color=NO_IMAGES, label="no images")
    ax.set_yticks(y, [superclass_names[i].replace("_", " ") for i in order], fontsize=9)
    _grey_out(ax.get_yticklabels(), ~seen)
    ax.set_xlim(0, 1)
    ax.set_xlabel("accuracy")
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(title, fontsize=12)
    return fig


def misclassified_figure(images: Tensor, true: Sequence[str], predicted: Sequence[str], title: str, columns: int = 8) -> Figure:
    """A grid of uint8 ``(N, 3, H, W)`` images, each captioned with its true and predicted class."""
    rows = max(1, -(-len(images) // columns))
    fig = Figure(figsize=(columns * 1.7, rows * 2.0), layout="constrained")
    axes = fig.subplots(rows, columns, squeeze=False)
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k < len(images):
            ax.imshow(images[k].permute(1, 2, 0).cpu().numpy(), interpolation="nearest")
            ax.set_title(f"{true[k]}\n→ {predicted[k]}", fontsize=7, color="#b30000")
    fig.suptitle(title, fontsize=11)
    return fig
