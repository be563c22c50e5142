"""Matplotlib figures of per-class results, ordered and coloured by CIFAR-100's 20 superclasses.

Pure functions of tensors and names; the callbacks decide when to draw and where to log. Figures are
built with ``matplotlib.figure.Figure`` (no pyplot): no window, no global state, safe off the main thread.
Layouts are fixed rather than ``constrained``: drawing 200 tick labels is slow enough already.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.colors import PowerNorm
from matplotlib.figure import Figure
from torch import Tensor


def superclass_order(fine_to_coarse: Tensor, class_names: Sequence[str]) -> Tensor:
    """Class indices sorted by superclass, then by name: neighbours in a figure share a superclass."""
    keys = sorted(range(len(class_names)), key=lambda i: (int(fine_to_coarse[i]), class_names[i]))
    return torch.tensor(keys)


def per_class_accuracy(confusion: Tensor) -> Tensor:
    """Recall of each class from a confusion matrix (rows: true class); 0 for classes never seen."""
    confusion = confusion.double()
    return confusion.diagonal() / confusion.sum(dim=1).clamp(min=1)


def superclass_accuracy(confusion: Tensor, fine_to_coarse: Tensor, num_superclasses: int) -> tuple[Tensor, Tensor]:
    """Per superclass: the share of its images given the exact class, and the share given any class of it."""
    confusion = confusion.double().cpu()
    onehot = torch.nn.functional.one_hot(fine_to_coarse.cpu(), num_superclasses).double()
    coarse = onehot.T @ confusion @ onehot  # (true superclass, predicted superclass) counts
    totals = coarse.sum(dim=1).clamp(min=1)
    exact = (onehot.T @ confusion.diagonal()) / totals
    return exact, coarse.diagonal() / totals


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
    rates = (counts / counts.sum(dim=1, keepdim=True).clamp(min=1)).numpy()
    coarse_sorted = fine_to_coarse.cpu()[order].numpy()
    edges, centres = _group_edges(coarse_sorted)
    names = [class_names[i] for i in order]
    n = len(names)

    fig = Figure(figsize=(14, 13))
    ax = fig.add_axes((0.08, 0.09, 0.74, 0.74))
    image = ax.imshow(rates, cmap="Blues", norm=PowerNorm(gamma=0.5, vmin=0, vmax=1), interpolation="nearest")
    for edge in edges:
        ax.axhline(edge, color="#999999", linewidth=0.5)
        ax.axvline(edge, color="#999999", linewidth=0.5)
    ticks = np.arange(n)
    ax.set_xticks(ticks, names, rotation=90, fontsize=6)
    ax.set_yticks(ticks, names, fontsize=6)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    groups = [superclass_names[int(coarse_sorted[round(c)])].replace("_", " ") for c in centres]
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
    """Accuracy of each class as bars, grouped and coloured by superclass, with the mean as a line."""
    order = superclass_order(fine_to_coarse, class_names)
    values = accuracy.double().cpu()[order].numpy()
    coarse_sorted = fine_to_coarse.cpu()[order].numpy()
    edges, centres = _group_edges(coarse_sorted)
    colours = colormaps["tab20"](coarse_sorted % 20)

    fig = Figure(figsize=(18, 7))
    ax = fig.add_axes((0.04, 0.16, 0.95, 0.52))
    ax.bar(np.arange(len(values)), values, color=colours, width=0.85)
    ax.axhline(float(accuracy.double().mean()), color="black", linestyle="--", linewidth=0.8, label="mean over classes")
    for edge in edges:
        ax.axvline(edge, color="#bbbbbb", linewidth=0.5)
    ax.set_xticks(np.arange(len(values)), [class_names[i] for i in order], rotation=90, fontsize=7)
    ax.set_xlim(-0.5, len(values) - 0.5)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy (top-1)")
    groups = [superclass_names[int(coarse_sorted[round(c)])].replace("_", " ") for c in centres]
    top = ax.secondary_xaxis("top")
    top.set_xticks(centres, groups, rotation=90, fontsize=7)
    ax.legend(loc="upper right", fontsize=8)
    fig.suptitle(title, fontsize=13, y=0.985)
    return fig


def superclass_accuracy_figure(exact: Tensor, coarse: Tensor, superclass_names: Sequence[str], title: str) -> Figure:
    """Per superclass: exact-class accuracy and right-superclass accuracy, worst superclass at the bottom."""
    order = torch.argsort(exact.double().cpu(), descending=False).numpy()
    y = np.arange(len(order))
    fig = Figure(figsize=(9, 7), layout="constrained")
    ax = fig.add_subplot()
    ax.barh(y + 0.2, coarse.cpu().numpy()[order], height=0.4, color="#9ecae1", label="predicted class in the right superclass")
    ax.barh(y - 0.2, exact.cpu().numpy()[order], height=0.4, color="#08519c", label="exact class")
    ax.set_yticks(y, [superclass_names[i].replace("_", " ") for i in order], fontsize=9)
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
