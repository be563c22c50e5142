"""A training step that can run as one CUDA graph: the step as one function, its capture and replay,
and the optimizer settings a captured step needs."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

StepFunction = Callable[[Tensor, Tensor], Tensor]


class TrainStep:
    """Runs ``step(images, labels) -> loss`` eagerly, or, with ``capture``, as one CUDA graph per batch shape.

    A shape's graph is recorded after ``warmup_steps`` eager steps of that shape on a side stream (which
    allocate the optimizer state and let cuDNN choose its kernels), and replayed for every later batch of
    that shape: the batch is copied into the graph's input buffers and the whole step (augmentation,
    forward, loss, backward, clipping, optimizer, EMA, metric counts) is one launch. Capturing does not
    run the work, so the capturing call replays too: every batch is trained on exactly once. An epoch's
    last, smaller batch (without ``drop_last``) gets its own graph once it has been seen that often.
    Everything a graph reads lives at fixed addresses; :meth:`reset` drops the graphs when they may have
    moved (a checkpoint restored into a new optimizer, say), and the next calls record anew.
    """

    def __init__(self, step: StepFunction, capture: bool = False, warmup_steps: int = 3) -> None:
        self.step = step
        self.capture = capture
        self.warmup_steps = warmup_steps
        self.reset()

    def reset(self) -> None:
        """Forget the graphs; the next steps warm up and record them again."""
        self._graphs: dict[tuple[int, ...], tuple[Any, tuple[Tensor, Tensor], Tensor]] = {}
        self._eager_calls: dict[tuple[int, ...], int] = {}

    @property
    def captured(self) -> bool:
        """Whether a graph has been recorded and is replayed."""
        return bool(self._graphs)

    def __call__(self, images: Tensor, labels: Tensor) -> Tensor:
        """One training step on this batch; returns its loss (the graph's output buffer once captured)."""
        if not self.capture:
            return self.step(images, labels)
        shape = tuple(images.shape)
        if shape not in self._graphs:
            if self._eager_calls.get(shape, 0) < self.warmup_steps:
                self._eager_calls[shape] = self._eager_calls.get(shape, 0) + 1
                return self._on_side_stream(images, labels)
            self._graphs[shape] = self._record(images, labels)
        graph, (static_images, static_labels), loss = self._graphs[shape]
        static_images.copy_(images)
        static_labels.copy_(labels)
        graph.replay()
        return loss

    # The only CUDA-specific lines: warm-up on a side stream, recording, replay (above).
    def _on_side_stream(self, images: Tensor, labels: Tensor) -> Tensor:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            loss = self.step(images, labels)
        torch.cuda.current_stream().wait_stream(stream)
        return loss

    def _record(self, images: Tensor, labels: Tensor) -> tuple[Any, tuple[Tensor, Tensor], Tensor]:
        inputs = (images.clone(), labels.clone())
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            loss = self.step(*inputs)
        return graph, inputs, loss


def prepare_for_capture(optimizer: Optimizer, device: torch.device) -> None:
    """Give ``optimizer`` what a captured step needs: each group's learning rate in a device tensor
    (schedulers ``fill_`` it in place, so the graph reads each step's value), Adam-style optimizers
    ``capturable`` (their step counts on the device), SGD ``fused`` (it takes a tensor learning rate
    without reading it on the host). The arithmetic is the same; only where it runs changes."""
    for group in optimizer.param_groups:
        if not isinstance(group["lr"], Tensor):
            group["lr"] = torch.tensor(float(group["lr"]), dtype=torch.float32, device=device)
        if "capturable" in group and not group.get("fused"):
            group["capturable"] = True
        elif isinstance(optimizer, torch.optim.SGD):
            group["fused"], group["foreach"] = True, False
    for state in optimizer.state.values():
        step = state.get("step")
        if isinstance(step, Tensor) and step.device != device:
            state["step"] = step.to(device=device, dtype=torch.float32)


def portable_optimizer_state(state: dict[str, Any], settings: list[dict[str, Any]]) -> dict[str, Any]:
    """An optimizer ``state_dict`` as the optimizer built from the config would write it: learning rates
    as numbers and ``capturable``/``fused``/``foreach`` as configured (``settings``: one dict per group),
    so a checkpoint of a captured run loads into any run, on any device."""
    for group, configured in zip(state["param_groups"], settings):
        if isinstance(group.get("lr"), Tensor):
            group["lr"] = float(group["lr"])
        group.update(configured)
    return state


def execution_settings(optimizer: Optimizer) -> list[dict[str, Any]]:
    """Each group's ``capturable``, ``fused`` and ``foreach`` as configured (before :func:`prepare_for_capture`)."""
    keys = ("capturable", "fused", "foreach")
    return [{key: group[key] for key in keys if key in group} for group in optimizer.param_groups]


def clip_gradients(parameters: list[Tensor], value: float | None, algorithm: str | None) -> None:
    """Clip gradients as Lightning's ``gradient_clip_val``/``gradient_clip_algorithm`` say, with device work only."""
    if not value:
        return
    grads = [p for p in parameters if p.grad is not None]
    if algorithm == "value":
        torch.nn.utils.clip_grad_value_(grads, value, foreach=True)
    else:
        torch.nn.utils.clip_grad_norm_(grads, value, foreach=True)


def count_correct(counts: Tensor, logits: Tensor, labels: Tensor) -> None:
    """Add a batch's top-1 and top-5 hits to ``counts`` (a device tensor of 2), without a host read."""
    hits = logits.topk(min(5, logits.shape[-1]), dim=-1).indices == labels.unsqueeze(-1)
    counts.add_(torch.stack([hits[:, 0].sum(), hits.sum()]))  # a label is at most once among the top 5
