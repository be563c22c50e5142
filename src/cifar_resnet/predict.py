"""Predicting on the user's own image files: reading them like CIFAR images, writing the top-5 as CSV."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

from cifar_resnet.errors import UserError

CSV_NAME = "predictions.csv"


def image_files(path: Path) -> list[Path]:
    """``path`` itself, or the files in the folder ``path`` (sorted; hidden files and subfolders skipped)."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise UserError(f"data.predict_path '{path}' does not exist: give an image file or a folder of images.")
    files = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise UserError(f"The folder '{path}' (data.predict_path) holds no files: put PNG or JPEG images in it.")
    return files


def read_image(path: Path, size: int = 32) -> Tensor:
    """One image as uint8 ``(3, size, size)``: upright (EXIF), RGB, centre-cropped to a square and resized."""
    with Image.open(path) as image:
        image.draft("RGB", (4 * size, 4 * size))  # JPEGs decode at a reduced scale: much faster for photos
        image = ImageOps.exif_transpose(image).convert("RGB")
        square = ImageOps.fit(image, (size, size), method=Image.Resampling.LANCZOS)
    return torch.from_numpy(np.asarray(square).copy()).permute(2, 0, 1)


def read_images(path: Path, size: int = 32) -> tuple[list[str], Tensor]:
    """Every image at ``path`` (a file or a folder) as uint8 ``(N, 3, size, size)``, with its file name.

    Any file that is not an image Pillow can read (PNG, JPEG and the other common formats) makes a
    :class:`UserError` that lists every such file.
    """
    files = image_files(path)
    images, bad = [], []
    for file in files:
        try:
            images.append(read_image(file, size))
        except UnidentifiedImageError:
            bad.append(f"'{file}' (not an image)")
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            bad.append(f"'{file}' (unreadable: {err})")
    if bad:
        raise UserError(
            f"Cannot predict on {len(bad)} of the {len(files)} files at data.predict_path '{path}': {'; '.join(bad)}. "
            "Remove or convert them: predict reads PNG and JPEG images (and other formats Pillow opens)."
        )
    names = [file.name if path.is_dir() else str(file) for file in files]
    return names, torch.stack(images)


class PredictionWriter(BasePredictionWriter):
    """Writes ``predict``'s top-5 classes and probabilities per image to a CSV and prints the top-1 of the first rows.

    The CSV goes to ``data.predict_output`` if set, else to ``predictions.csv`` in the run's log folder.
    Columns: ``file``, then ``class_k`` and ``prob_k`` for k = 1..5, most likely first.
    """

    def __init__(self, rows_shown: int = 10) -> None:
        """
        Args:
            rows_shown: How many images' top-1 predictions are printed (all go to the CSV).
        """
        super().__init__(write_interval="epoch")
        self.rows_shown = rows_shown

    def write_on_epoch_end(
        self, trainer: Trainer, pl_module: LightningModule, predictions: Sequence[Any], batch_indices: Sequence[Any]
    ) -> None:
        if batch_indices and batch_indices[0] and isinstance(batch_indices[0][0], list):
            batch_indices = batch_indices[0]  # Lightning nests them per dataloader; there is one
        rows = []
        for output, indices in zip(predictions, batch_indices):
            rows += zip(indices, output["classes"].tolist(), output["probs"].tolist())
        if dist.is_available() and dist.is_initialized():  # each process predicted its own shard
            shards: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(shards, rows)
            rows = [row for shard in shards for row in shard]
        if not trainer.is_global_zero:
            return
        rows = sorted({int(index): (int(index), classes, probs) for index, classes, probs in rows}.values())
        datamodule = trainer.datamodule
        item_names = datamodule.predict_names
        class_names = datamodule.class_names
        output = datamodule.hparams.get("predict_output")
        path = Path(output) if output else Path(trainer.log_dir or trainer.default_root_dir) / CSV_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        top_k = len(rows[0][1]) if rows else 0
        with path.open("w", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(["file", *(f"{kind}_{k + 1}" for k in range(top_k) for kind in ("class", "prob"))])
            for index, classes, probs in rows:
                cells = [value for c, p in zip(classes, probs) for value in (class_names[c], f"{p:.4f}")]
                writer.writerow([item_names[index], *cells])
        shown = rows[: self.rows_shown]
        width = max((len(item_names[i]) for i, _, _ in shown), default=4)
        for index, classes, probs in shown:
            print(f"{item_names[index]:<{width}}  {class_names[classes[0]]} ({probs[0]:.2f})")
        more = f" (first {len(shown)} shown)" if len(rows) > len(shown) else ""
        print(f"Wrote the top-{top_k} classes of {len(rows)} images{more} to {path}", flush=True)
