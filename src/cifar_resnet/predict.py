"""Writing ``predict``'s results: the top-5 classes of each image as a CSV, and the first rows printed."""

from __future__ import annotations

import csv
import io
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

import torch.distributed as dist
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter

from cifar_resnet.atomic import atomic_write
from cifar_resnet.data.images import printable
from cifar_resnet.errors import UserError
from cifar_resnet.outputs import check_output

CSV_NAME = "predictions.csv"
STDOUT = "-"  # --prediction.output - : the CSV goes to standard output
OPTION = "--prediction.output"
TO_STDOUT = ", or `--prediction.output -` for standard output"


def spreadsheet_safe(cell: str) -> str:
    """``cell`` with a leading ``'`` where a spreadsheet would run it as a formula (``=``, ``+``, ``-``, ``@``...)."""
    return "'" + cell if cell[:1] in ("=", "+", "-", "@", "\t", "\r") else cell


def write_csv_atomically(path: Path, rows: Sequence[Sequence[str]]) -> None:
    """Write ``rows`` to a temporary file beside ``path``, then rename it over ``path``: an error never leaves
    a truncated CSV, nor truncates the one already there."""

    def write(file: BinaryIO) -> None:
        text = io.TextIOWrapper(file, encoding="utf-8", newline="")
        csv.writer(text).writerows(rows)
        text.flush()
        text.detach()  # the binary file stays open for atomic_write to flush to disk and rename

    atomic_write(path, write)


class PredictionWriter(BasePredictionWriter):
    """Writes ``predict``'s top-5 classes and probabilities per image to a CSV and prints the top-1 of the first rows.

    Columns: ``file``, then ``class_k`` and ``prob_k`` for k = 1..5, most likely first. File names that
    are not valid UTF-8 or hold control characters are written escaped (``\\xff``, ``\\n``); cells that a
    spreadsheet would run as a formula get a leading ``'``.
    """

    def __init__(self, output: str | None = None, rows_shown: int = 10) -> None:
        """
        Args:
            output: Where ``predict`` writes its CSV; default ``predictions.csv`` in the run's log folder; ``-``:
                standard output. An existing file is replaced only if it is an earlier CSV of predictions (or empty).
            rows_shown: How many images' top-1 predictions are printed (all go to the CSV).
        """
        super().__init__(write_interval="epoch")
        if rows_shown < 0:
            raise UserError(f"prediction.rows_shown must be 0 or more, got {rows_shown}.")
        if output is not None and output != STDOUT:
            check_output(Path(output), "predictions", OPTION, hint=TO_STDOUT)
        self.output = output
        self.rows_shown = rows_shown
        self._printout: str | None = None
        self._table: list[list[str]] | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.output == STDOUT and trainer.progress_bar_callback is not None:
            trainer.progress_bar_callback.disable()  # standard output carries the CSV alone

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
        class_names = [printable(name) for name in datamodule.class_names]
        top_k = len(rows[0][1]) if rows else 0
        table = [["file", *(f"{kind}_{k + 1}" for k in range(top_k) for kind in ("class", "prob"))]]
        for index, classes, probs in rows:
            cells = [value for c, p in zip(classes, probs) for value in (class_names[c], f"{p:.4f}")]
            table.append([spreadsheet_safe(cell) for cell in (item_names[index], *cells)])
        if self.output == STDOUT:
            self._table = table  # printed at teardown, once the progress bar is done with the terminal
            return
        path = Path(self.output) if self.output else Path(trainer.log_dir or trainer.default_root_dir) / CSV_NAME
        check_output(path, "predictions", OPTION, inputs=[getattr(trainer, "ckpt_path", None)], hint=TO_STDOUT)
        try:
            write_csv_atomically(path, table)
        except OSError as err:
            raise UserError(
                f"Cannot write the predictions to '{printable(str(path))}' ({err.strerror or err}); nothing was "
                "written there. Choose another `--prediction.output`, or free space or permissions in that folder."
            ) from err
        shown = rows[: self.rows_shown]
        width = max((len(item_names[i]) for i, _, _ in shown), default=4)
        lines = [f"{item_names[index]:<{width}}  {class_names[classes[0]]} ({probs[0]:.2f})" for index, classes, probs in shown]
        more = f" (first {len(shown)} shown)" if len(rows) > len(shown) else ""
        count = f"{len(rows)} image{'' if len(rows) == 1 else 's'}"
        self._printout = "\n".join([*lines, f"Wrote the top-{top_k} classes of {count}{more} to {printable(str(path))}"])

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """Print the first rows once the progress bar has closed."""
        if self._printout is not None:
            print(self._printout, flush=True)
            self._printout = None
        if self._table is not None:
            text = io.StringIO()
            csv.writer(text).writerows(self._table)
            sys.stdout.write(text.getvalue())
            sys.stdout.flush()
            self._table = None
