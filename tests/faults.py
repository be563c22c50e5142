"""Test-only callbacks that inject faults or watch a run; the CLI imports them by class path (``faults.RaiseOnRank``)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import select
import shutil
import signal
import threading
import time
import traceback
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from cifar_resnet.callbacks import ClassFigures
from cifar_resnet.checkpointing import AtomicCheckpointIO, atomic_write, wait_for_checkpoints
from cifar_resnet.drawing import deliver, render


class RaiseOnRank(Callback):
    """Raises in one process at one training step, as a crashing GPU or a bug on one rank would."""

    def __init__(self, rank: int = 1, step: int = 1) -> None:
        self.rank = rank
        self.step = step

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            raise RuntimeError(f"injected fault on rank {self.rank} at step {self.step}")


class PoisonWeights(Callback):
    """Sets the network's weights to NaN before one training step, as a diverging run would."""

    def __init__(self, step: int = 1) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                for p in pl_module.parameters():
                    p.fill_(float("nan"))


class HangOnRank(Callback):
    """Writes its process id to ``pid_file``, then blocks forever in one process at one step (a hung rank)."""

    def __init__(self, pid_file: str, rank: int = 1, step: int = 1) -> None:
        self.pid_file = pid_file
        self.rank = rank
        self.step = step

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.global_rank == self.rank:
            Path(self.pid_file).write_text(str(os.getpid()))

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            threading.Event().wait()  # never set


class SigtermAfterLastEpoch(Callback):
    """Sends its own process SIGTERM at the end of the last epoch, before Lightning's fit loop ends: a job's
    time running out just as the run finishes."""

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.current_epoch == trainer.max_epochs - 1:
            os.kill(os.getpid(), signal.SIGTERM)


class SlowDown(Callback):
    """Sleeps before every training batch, to give a test time to kill the run mid-epoch."""

    def __init__(self, seconds: float = 0.5) -> None:
        self.seconds = seconds

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        time.sleep(self.seconds)


class PauseAtStep(Callback):
    """Stops at a known point until the test acts, with no sleeps: at the start of training step ``step`` (default:
    the first step this process runs), writes one line into the FIFO ``fifo`` (:func:`pause_point`), the test's
    event that the run got there, then waits for SIGTERM or SIGINT (SIGKILL ends the run there). After SIGTERM
    the step goes on and Lightning stops at its end; SIGINT raises KeyboardInterrupt here. Pauses only while
    ``fifo`` exists, so a resumed run with the same arguments runs through once the test has removed it."""

    def __init__(self, fifo: str, step: int | None = None) -> None:
        self.fifo = fifo
        self.step = step
        self._paused = False

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self._paused or not os.path.exists(self.fifo) or self.step not in (None, trainer.global_step):
            return
        self._paused = True
        # Checkpoints are written in the background: the test acts once those asked for so far are on disk.
        wait_for_checkpoints(trainer)
        # A signal that comes before the wait starts must not be missed: Python writes the number of every signal
        # it handles into the wake-up pipe, which keeps it until it is read.
        wake_read, wake_write = os.pipe()
        os.set_blocking(wake_write, False)
        previous = signal.set_wakeup_fd(wake_write)
        try:
            with open(self.fifo, "w") as fifo:  # blocks until the test is listening (wait_until_paused)
                fifo.write(f"paused at step {trainer.global_step}, epoch {trainer.current_epoch}\n")
            while not {signal.SIGTERM, signal.SIGINT} & set(os.read(wake_read, 64)):
                pass  # another handled signal: wait on
        finally:
            signal.set_wakeup_fd(previous)
            os.close(wake_read)
            os.close(wake_write)


def pause_point(folder: Path) -> Path:
    """A new FIFO in ``folder`` for :class:`PauseAtStep` and :func:`wait_until_paused`."""
    path = folder / "pause.fifo"
    os.mkfifo(path)
    return path


def wait_until_paused(fifo: Path, process: Any, timeout: float = 300) -> str:
    """Block until the run ``process`` (a ``CliProcess``) reports from its :class:`PauseAtStep` through ``fifo``,
    then remove the FIFO (so that a resume does not pause) and return the line. Fails if the process ends first
    or ``timeout`` seconds pass: both are events too (its sentinel), so nothing here polls."""
    # Read and write: the open never blocks, and the FIFO gives no end-of-file before the run has written.
    fd = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)
    try:
        ready, _, _ = select.select([fd, process.sentinel], [], [], timeout)
        if fd not in ready:
            ended = process.poll() is not None
            raise AssertionError(f"the run {'ended' if ended else f'did not pause within {timeout} s'} (exit code {process.poll()})")
        return os.read(fd, 4096).decode().strip()
    finally:
        os.close(fd)
        fifo.unlink()


class CountHostReads(Callback):
    """Writes to ``out`` (JSON) every read of a tensor's value by the host (``.item()``, ``float()``,
    ``bool()``, ...) made during training steps ``first`` to ``last - 1``, with the code that made it.

    On a GPU each such read makes the host wait until the device has caught up.
    """

    READS = ("item", "tolist", "numpy", "__float__", "__int__", "__bool__", "__index__")

    def __init__(self, out: str, first: int = 2, last: int = 12) -> None:
        self.out, self.first, self.last = out, first, last
        self.reads: list[str] = []
        self._counting = False
        self._originals = {name: getattr(torch.Tensor, name) for name in self.READS}
        for name, original in self._originals.items():
            setattr(torch.Tensor, name, self._counted(name, original))

    def _counted(self, name: str, original: Any) -> Any:
        def counted(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            if self._counting:
                caller = traceback.extract_stack(limit=2)[0]
                self.reads.append(f"{name} at {caller.filename}:{caller.lineno}")
            return original(tensor, *args, **kwargs)

        return counted

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        # Counting stops at the start of the next step, so Lightning's end-of-step work is counted too.
        self._counting = self.first <= batch_idx < self.last
        if batch_idx == self.last:
            Path(self.out).write_text(json.dumps(self.reads))

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        for name, original in self._originals.items():
            setattr(torch.Tensor, name, original)


class ZeroGradients(Callback):
    """Zeroes every gradient after the backward pass: training with a loss multiplied by zero."""

    def on_after_backward(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for p in pl_module.parameters():
            if p.grad is not None:
                p.grad.zero_()


class FailingFile:
    """A file whose write calls ``fail()`` once more than ``limit`` bytes would have been written: what torch.save's
    zip writer sees of a disk that fills up, or of a Ctrl-C in the middle of a write."""

    def __init__(self, file: Any, fail: Any, limit: int = 64) -> None:
        self.file, self.fail, self.limit, self.written = file, fail, limit, 0

    def write(self, data: bytes) -> int:
        if self.written + len(data) > self.limit:
            self.fail()
        self.written += len(data)
        return self.file.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.file, name)


def disk_full() -> None:
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def ctrl_c() -> None:
    os.kill(os.getpid(), signal.SIGINT)  # Python raises KeyboardInterrupt in the main thread right after


class FullDiskCheckpointIO(AtomicCheckpointIO):
    """The program's checkpoint IO on a disk that fills up: from save number ``saves_before_full`` on
    (counting from 0), writing a checkpoint fails with ``ENOSPC`` after part of it is written (inside
    torch.save, whose zip writer then raises its own error). With ``interrupt``, Ctrl-C comes instead."""

    def __init__(self, saves_before_full: int = 0, interrupt: bool = False) -> None:
        super().__init__()
        self.saves_before_full = saves_before_full
        self.interrupt = interrupt
        self.saves = 0

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        self.saves += 1
        if self.saves <= self.saves_before_full:
            return super().save_checkpoint(checkpoint, path, storage_options)
        real_save = torch.save

        def save_until_full(obj: Any, f: Any, *args: Any, **kwargs: Any) -> None:
            real_save(obj, FailingFile(f, ctrl_c if self.interrupt else disk_full), *args, **kwargs)

        torch.save = save_until_full
        try:
            super().save_checkpoint(checkpoint, path, storage_options)
        finally:
            torch.save = real_save


class RecordedClassFigures(ClassFigures):
    """ClassFigures that also draws every figure on the training thread, and writes to ``out`` (JSON lines)
    each delivery: where it was drawn (``foreground`` or the ``background`` thread), its tag, step, the
    hash of its pixels and the training step reached when it was drawn. The first background drawing is
    held until training has gone on into the next epoch, so it cannot be drawn from numbers copied late."""

    def __init__(self, out: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.out = out
        self._trainer: Trainer | None = None
        self._go_on = threading.Event()
        self._held_epoch: int | None = None

    def _record(self, where: str) -> Any:
        def sink(tag: str, figure: Any, step: int) -> None:
            pixels = render(figure)
            entry = {"where": where, "thread": threading.current_thread().name, "tag": tag, "step": step,
                     "pixels": hashlib.sha256(pixels.tobytes()).hexdigest(), "shape": list(pixels.shape),
                     "trained_to": self._trainer.global_step}  # fmt: skip
            with open(self.out, "a") as f:
                f.write(json.dumps(entry) + "\n")

        return sink

    def sinks(self, trainer: Trainer) -> list[Any]:
        self._trainer = trainer
        return [*super().sinks(trainer), self._record("background" if self.background else "foreground")]

    def _submit(self, trainer: Trainer, draw: Any) -> None:
        self._trainer = trainer
        deliver(draw(), trainer.global_step, [self._record("foreground")])
        if self._held_epoch is None:
            self._held_epoch = trainer.current_epoch
            self._worker.submit(lambda: self._go_on.wait(timeout=120))
        super()._submit(trainer, draw)

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self._held_epoch is not None and trainer.current_epoch > self._held_epoch and batch_idx >= 1:
            self._go_on.set()


class HoldCheckpointWrites(Callback):
    """Holds the background writes of the checkpoints of one epoch, to see what training going on does to them.

    Saves to ``<folder>/snapshot.pt`` the weights and optimizer state at the end of epoch ``epoch`` (just before
    its checkpoints are asked for). Then, with ``stall`` false, holds their writes until training has taken two
    steps of the next epoch, writes them, copies each file into ``folder`` and notes in ``written.json`` the step
    training had reached; with ``stall`` true, writes part of the first one, writes a line into the FIFO
    ``<folder>/stalled`` (:func:`pause_point` of ``folder``, for :func:`wait_until_paused`) and blocks forever,
    for a test to kill the process in the middle of a background write.
    """

    def __init__(self, folder: str, epoch: int = 0, stall: bool = False) -> None:
        self.folder, self.epoch, self.stall = Path(folder), epoch, stall
        self._go_on = threading.Event()
        self._trainer: Trainer | None = None

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._trainer = trainer
        inner = trainer.strategy.checkpoint_io.checkpoint_io  # BackgroundCheckpointIO's writer
        write = inner.save_checkpoint

        def held(checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
            if checkpoint["epoch"] != self.epoch:
                return write(checkpoint, path, storage_options)
            if self.stall:
                atomic_write(path, self._write_part_then_stall)
            assert self._go_on.wait(timeout=120), "training did not go on while the checkpoint was held"
            write(checkpoint, path, storage_options)
            shutil.copy(path, self.folder / Path(path).name)
            with open(self.folder / "written.json", "a") as f:
                f.write(json.dumps({"file": Path(path).name, "step": self._trainer.global_step}) + "\n")

        inner.save_checkpoint = held

    def _write_part_then_stall(self, f: Any) -> None:
        f.write(b"PK\x03\x04 the first bytes of a checkpoint")
        f.flush()
        with open(self.folder / "stalled", "w") as fifo:  # a FIFO (pause_point): blocks until the test listens
            fifo.write("stalled writing a checkpoint\n")
        threading.Event().wait()  # forever

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if trainer.current_epoch == self.epoch and not trainer.sanity_checking:
            self.folder.mkdir(parents=True, exist_ok=True)
            state = {"state_dict": pl_module.state_dict(), "optimizer_states": [o.state_dict() for o in trainer.optimizers]}
            torch.save(state, self.folder / "snapshot.pt")

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.current_epoch > self.epoch and batch_idx >= 1:
            self._go_on.set()


# Operators that make the host wait for a CUDA device: they read a value back, or their output size depends on
# the values (``bincount`` reads the maximum first). On a CPU they wait for nothing, so they are counted by name.
WAITING_OPS = ("_local_scalar_dense", "nonzero", "bincount", "unique", "_unique", "_unique2", "unique_consecutive",
               "unique_dim", "masked_select", "repeat_interleave", "histc", "_assert_async", "equal", "is_nonzero")  # fmt: skip
WAITING_METHODS = ("cpu", "tolist", "numpy", "item")


class CountEvalWaits(Callback):
    """Writes to ``out`` (JSON) every operator or tensor method that would make the host wait for the device
    (:data:`WAITING_OPS`, :data:`WAITING_METHODS`), with the code that called it, from the start of the second
    validation or test batch to the end of the epoch's last batch (the epoch-end summing up is not counted).
    Give it last in the callbacks, so that the other callbacks' batch-end hooks are counted too."""

    def __init__(self, out: str) -> None:
        self.out = out
        self.waits: list[str] = []
        self._mode: Any = None
        self._originals = {name: getattr(torch.Tensor, name) for name in WAITING_METHODS}

    def _note(self, what: str) -> None:
        frames = [f for f in traceback.extract_stack()[:-3] if "/torch/" not in f.filename and "/faults.py" not in f.filename]
        self.waits.append(f"{what} at {frames[-1].filename}:{frames[-1].lineno}" if frames else what)

    def _start(self, batch_idx: int) -> None:
        if batch_idx < 1 or self._mode is not None:
            return
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
                if func._overloadpacket.__name__ in WAITING_OPS:
                    counter._note(f"aten.{func._overloadpacket.__name__}")
                return func(*args, **(kwargs or {}))

        for name, original in self._originals.items():
            setattr(torch.Tensor, name, self._counted(name, original))
        self._mode = Mode()
        self._mode.__enter__()

    def _counted(self, name: str, original: Any) -> Any:
        def counted(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            self._note(f"Tensor.{name}")
            return original(tensor, *args, **kwargs)

        return counted

    def _stop(self) -> None:
        if self._mode is not None:
            self._mode.__exit__(None, None, None)
            self._mode = None
            for name, original in self._originals.items():
                setattr(torch.Tensor, name, original)
            Path(self.out).write_text(json.dumps(self.waits))

    def on_validation_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        if not trainer.sanity_checking:
            self._start(batch_idx)

    def on_test_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self._start(batch_idx)

    def on_validation_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if batch_idx + 1 == trainer.num_val_batches[dataloader_idx]:
            self._stop()

    def on_test_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        if batch_idx + 1 == trainer.num_test_batches[dataloader_idx]:
            self._stop()


class HungClassFigures(ClassFigures):
    """ClassFigures whose drawings never finish: the first reports its tag through the FIFO ``fifo``
    (:func:`pause_point`; the test's event, read by :func:`wait_until_paused`), then every one blocks forever."""

    def __init__(self, fifo: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.fifo = fifo

    def sinks(self, trainer: Trainer) -> list[Any]:
        def hang(tag: str, figure: Any, step: int) -> None:
            if os.path.exists(self.fifo):
                with open(self.fifo, "w") as fifo:  # blocks until the test is listening
                    fifo.write(f"drawing {tag} at step {step}\n")
            threading.Event().wait()  # never set

        return [hang]


class CountDeviceWork(Callback):
    """Writes to ``out`` (JSON) what training steps ``first`` to ``last - 1`` ask of the device, counted by a
    ``TorchDispatchMode`` from the start of one step to the start of the next (Lightning's end-of-step work
    included): ``ops``, the aten operations of each step (each one a kernel launch on a GPU), and ``reads``,
    every read of a tensor's value by the host (``aten._local_scalar_dense``: ``.item()``, ``bool()``,
    ``.tolist()``, ...) with the code that made it, leaving out the work on an optimizer's step counters, which
    torch keeps on the CPU when they are not captured (no kernel, no wait on a GPU).
    """

    def __init__(self, out: str, first: int = 2, last: int = 12) -> None:
        self.out, self.first, self.last = out, first, last
        self.ops: list[int] = []
        self.reads: list[str] = []
        self.names: dict[str, int] = {}  # the operations of the last step counted, by name
        self._mode: Any = None

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        if self._mode is not None:
            self._mode.__exit__(None, None, None)
            self.ops.append(self._mode.count)
            self.names = self._mode.names
            self._mode = None
        if self.first <= batch_idx < self.last:
            counters = {id(s["step"]) for opt in trainer.optimizers for s in opt.state.values() if "step" in s}
            self._mode = _Counting(self.reads, counters)
            self._mode.__enter__()
        if batch_idx == self.last:
            Path(self.out).write_text(json.dumps({"ops": self.ops, "reads": self.reads, "names": self.names}))


from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402


class _Counting(TorchDispatchMode):
    """Counts aten operations and records host reads (see :class:`CountDeviceWork`)."""

    def __init__(self, reads: list[str], ignored: set[int]) -> None:
        super().__init__()
        self.count, self.reads, self.ignored = 0, reads, ignored
        self.names: dict[str, int] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        first = args[0] if args else None
        if any(id(t) in self.ignored for t in (first if isinstance(first, (list, tuple)) else [first])):
            return func(*args, **(kwargs or {}))  # work on the optimizer's CPU step counters: no GPU kernel
        self.count += 1
        self.names[str(func)] = self.names.get(str(func), 0) + 1
        if func is torch.ops.aten._local_scalar_dense.default:
            frames = [f for f in traceback.extract_stack()[:-1] if "/torch/" not in f.filename or "/torch/optim/" in f.filename]
            self.reads.append(" <- ".join(f"{Path(f.filename).name}:{f.lineno}" for f in frames[-3:][::-1]))
        return func(*args, **(kwargs or {}))
