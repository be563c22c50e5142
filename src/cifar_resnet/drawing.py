"""Drawing figures off the training thread, and delivering each finished one to where it goes.

A figure is delivered as ``(tag, figure, step)`` to a :data:`FigureSink`: :class:`TensorBoardFigures`,
:class:`MLflowFigures`, :class:`WandbFigures` and :class:`PNGFigures` (files in the run folder), chosen by
:func:`figure_sinks`.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from lightning.pytorch import Trainer
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from cifar_resnet.atomic import atomic_write

# Where a finished figure goes: called with its tag, the figure and the global step it belongs to.
FigureSink = Callable[[str, Figure, int], None]


def render(figure: Figure) -> np.ndarray:
    """The figure as an ``(H, W, 3)`` uint8 RGB image, as TensorBoard's ``add_figure`` renders it."""
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[:, :, :3].copy()


class TensorBoardFigures:
    """Delivers figures to a TensorBoard ``SummaryWriter`` (the IMAGES tab), each under its own step."""

    def __init__(self, writer: Any) -> None:
        self.writer = writer

    def __call__(self, tag: str, figure: Figure, step: int) -> None:
        self.writer.add_image(tag, render(figure), global_step=step, dataformats="HWC")


class MLflowFigures:
    """Delivers figures to an MLflow run as artifacts, ``<tag>/step_<step>.png`` (``MlflowClient.log_figure``)."""

    def __init__(self, logger: Any) -> None:
        self.logger = logger

    def __call__(self, tag: str, figure: Figure, step: int) -> None:
        self.logger.experiment.log_figure(self.logger.run_id, figure, f"{tag}/step_{step}.png")


class WandbFigures:
    """Delivers figures to a W&B run as ``wandb.Image``s under their tag, at ``trainer/global_step`` ``step``."""

    def __init__(self, logger: Any) -> None:
        self.logger = logger

    def __call__(self, tag: str, figure: Figure, step: int) -> None:
        self.logger.log_image(key=tag, images=[render(figure)], step=step)


class PNGFigures:
    """Writes figures as PNG files, ``<folder>/<tag>/step_<step>.png``, the pixels TensorBoard shows."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def __call__(self, tag: str, figure: Figure, step: int) -> None:
        image = Image.fromarray(render(figure))
        atomic_write(self.folder / tag / f"step_{step}.png", lambda f: image.save(f, format="PNG"))


# The loggers that take images, by class name (no import of the optional packages), and their sinks.
IMAGE_LOGGERS: dict[str, Callable[[Any], FigureSink]] = {
    "TensorBoardLogger": lambda logger: TensorBoardFigures(logger.experiment),
    "MLFlowLogger": MLflowFigures,
    "WandbLogger": WandbFigures,
}
FIGURES_FOLDER = "figures"


def figure_sinks(trainer: Trainer) -> list[FigureSink]:
    """Where finished figures go (rank 0 only; no broadcast): every logger of the trainer that takes images,
    and PNG files in the run folder's ``figures/``, so that a run without such a logger has them too."""
    if not trainer.is_global_zero:
        return []
    sinks = [IMAGE_LOGGERS[type(lg).__name__](lg) for lg in trainer.loggers if type(lg).__name__ in IMAGE_LOGGERS]
    # The run folder: TensorBoard's and CSV's version folder, else the program's (the Trainer's default_root_dir).
    folder = trainer.loggers[0].log_dir if trainer.loggers and trainer.loggers[0].log_dir else trainer.default_root_dir
    return [*sinks, PNGFigures(Path(folder) / FIGURES_FOLDER)]


def deliver(figures: Sequence[tuple[str, Figure]], step: int, sinks: Sequence[FigureSink]) -> None:
    """Hand each ``(tag, figure)`` to every sink, in order, under ``step``."""
    for tag, figure in figures:
        for sink in sinks:
            sink(tag, figure, step)


class BackgroundWorker:
    """Runs jobs one at a time, in the order given, on a daemon thread.

    The thread is a daemon so that a Ctrl-C or SIGTERM never waits for a job in flight; :meth:`wait`
    is where the program chooses to wait. The first error a job raises is raised again by :meth:`wait`.
    ``busy_s`` adds up the seconds the jobs took.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.busy_s = 0.0
        self._jobs: queue.Queue[Callable[[], None]] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def __reduce__(self) -> tuple[type, tuple[str]]:
        """A copy (``copy.deepcopy`` of a module that reaches the Trainer's callbacks) is a fresh, idle worker."""
        return type(self), (self.name,)

    def submit(self, job: Callable[[], None]) -> None:
        """Queue ``job`` (a function of no arguments) after the jobs already queued."""
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()
        self._jobs.put(job)

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            start = time.perf_counter()
            try:
                if self._error is None:
                    job()
            except BaseException as err:  # noqa: BLE001 (handed to the thread that waits)
                self._error = err
            finally:
                self.busy_s += time.perf_counter() - start
                self._jobs.task_done()

    def wait(self) -> None:
        """Block until every queued job has run; raise the first error one of them raised."""
        self._jobs.join()
        error, self._error = self._error, None
        if error is not None:
            raise error

    def cancel(self) -> None:
        """Drop the jobs not started yet (the one in flight finishes on its own)."""
        while True:
            try:
                self._jobs.get_nowait()
            except queue.Empty:
                return
            self._jobs.task_done()
