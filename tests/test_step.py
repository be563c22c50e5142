"""The training step: the module's own step (``cuda_graph``, the step a CUDA graph captures) does the same
math as Lightning's; no step makes the host wait for the device; few operations outside the network; the
EMA and the learning rate that a captured step reads."""

from __future__ import annotations

import collections
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from lightning.pytorch import LightningModule
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from torch.utils._python_dispatch import TorchDispatchMode

from cifar_resnet import FineTunedResNet18, ScratchResNet
from cifar_resnet.averaging import EMAWeights
from cifar_resnet.checkpointing import SCHEMA_KEY
from cifar_resnet.schedules import WarmupDecayLR
from cifar_resnet.step import TrainStep, execution_settings, portable_optimizer_state, prepare_for_capture
from conftest import CONFIGS, env_with_tests, read_scalars, run_cli, without_figures

UNCAPTURED = "so each training step runs as one function, uncaptured"


def fit_args(recipe: str, data_dir: Path, save_dir: Path, *extra: str) -> list[str]:
    """A short deterministic fp32 CPU fit of ``recipe`` (two epochs of three batches)."""
    return [
        "fit", "--config", without_figures(recipe), "--data.data_dir", str(data_dir), "--data.download", "false",
        "--data.val_size", "100", "--data.batch_size", "20", "--data.eval_batch_size", "100",
        "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.precision", "32-true",
        "--trainer.deterministic", "true", "--trainer.max_epochs", "2", "--trainer.limit_train_batches", "3",
        "--trainer.limit_val_batches", "1", "--trainer.logger.init_args.save_dir", str(save_dir),
        "--trainer.enable_progress_bar", "false", "--model.init_args.compile", "false",
        "--trainer.log_every_n_steps", "1", *extra,
    ]  # fmt: skip


# ---- the module's own step does Lightning's math ---------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("recipe", "extra"),
    [
        # The seed's Adam + MultiStepLR, with the drop after the first epoch so that both epochs differ.
        ("scratch.yaml", ["--model.init_args.lr_scheduler.init_args.milestones", "[1]"]),
        # SGD + per-step warm-up/decay + gradient clipping + EMA (with its decay warm-up) + label smoothing + crops.
        ("fast.yaml", []),
    ],
)
def test_own_step_gives_the_weights_of_lightnings_step(recipe: str, extra: list[str], cifar_dir: Path, tmp_path: Path) -> None:
    runs, scalars = {}, {}
    for setting in ("false", "true"):
        proc = run_cli(*fit_args(recipe, cifar_dir, tmp_path / setting, *extra, "--model.init_args.cuda_graph", setting), cwd=tmp_path)
        assert (UNCAPTURED in proc.stderr + proc.stdout) == (setting == "true"), "the fallback is said in one line"
        (last,) = (tmp_path / setting).glob("*/version_0/checkpoints/last.ckpt")
        (first,) = (tmp_path / setting).glob("*/version_0/checkpoints/best-epoch=0-*.ckpt")
        runs[setting] = torch.load(last, weights_only=True), torch.load(first, weights_only=True)
        scalars[setting] = read_scalars(last.parent.parent)
    (lightning, lightning_epoch0), (own, _) = runs["false"], runs["true"]
    # The learning rate of every step (LearningRateMonitor) and the logged losses are Lightning's.
    lr_tags = sorted(tag for tag in scalars["false"] if tag.startswith("train/lr"))
    logged = 6 if recipe == "fast.yaml" else 2  # LearningRateMonitor: every step, or every epoch (the seed's)
    assert lr_tags and all(len(scalars["false"][tag]) == logged for tag in lr_tags)
    for tag in [*lr_tags, "train/loss_step", "train/top1", "train/top5"]:
        own_series, lightning_series = dict(scalars["true"][tag]), dict(scalars["false"][tag])
        assert own_series.keys() == lightning_series.keys(), tag
        assert list(own_series.values()) == pytest.approx(list(lightning_series.values()), rel=1e-5), tag
    if recipe == "fast.yaml":
        # Warm-up to the peak in step 0 (round(0.1 * 6) = 1 step), then a new, lower rate every step.
        assert len({lr for _, lr in scalars["true"]["train/lr/decay"]}) == 5, "a new learning rate every step"
    assert own["global_step"] == lightning["global_step"] == 6
    keys = ["state_dict", *(["current_model_state", "averaging_state"] if "averaging_state" in lightning else [])]
    for key in keys:
        for name, value in lightning[key].items():
            assert torch.allclose(own[key][name].double(), value.double(), rtol=0, atol=1e-6), (key, name)
    assert own["lr_schedulers"] == lightning["lr_schedulers"]
    assert own["optimizer_states"][0]["param_groups"] == lightning["optimizer_states"][0]["param_groups"]
    # Training changed the weights between the epochs (two steps that did nothing would also be equal).
    assert not all(torch.equal(v, lightning_epoch0["state_dict"][k]) for k, v in lightning["state_dict"].items())


# ---- no host read in a training step, few operations around the network ----------------------------

# Operations that launch no kernel on a GPU (views and bookkeeping).
NO_KERNEL = {"detach", "view", "select", "unsqueeze", "squeeze", "t", "expand", "alias", "_unsafe_view",
             "_record_function_enter_new", "_record_function_exit", "unbind", "slice", "as_strided"}  # fmt: skip


class Count(TorchDispatchMode):
    """Counts the aten operations dispatched, by name."""

    def __init__(self) -> None:
        super().__init__()
        self.names: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.names[str(func)] += 1
        return func(*args, **(kwargs or {}))


def kernels(names: dict[str, int]) -> int:
    """How many of the operations ``names`` counts launch a kernel."""
    return sum(n for name, n in names.items() if name.split(".")[1] not in NO_KERNEL)


def network_operations(recipe: str, batch: int, precision: str) -> collections.Counter[str]:
    """The operations of the recipe's network alone: forward, loss and backward of one batch."""
    model = ScratchResNet() if recipe.startswith(("scratch", "fast")) else FineTunedResNet18(weights=None)
    images, labels = torch.randn(batch, 3, 32, 32), torch.randint(0, 100, (batch,))
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision.startswith("bf16"))
    with Count() as count:
        with autocast:
            loss = model.training_loss(model(images), labels)
        loss.backward()
    return count.names


CASES = [
    ("scratch.yaml", "auto"), ("finetune.yaml", "auto"), ("fast.yaml", "auto"), ("finetune_fast.yaml", "auto"),
    ("scratch.yaml", "true"), ("fast.yaml", "true"), ("finetune_fast.yaml", "true"),
]  # fmt: skip


@pytest.mark.slow
@pytest.mark.parametrize(("recipe", "cuda_graph"), CASES)
def test_a_training_step_never_waits_for_the_device(
    recipe: str, cuda_graph: str, cifar_dir: Path, resnet18_weights: Path, tmp_path: Path
) -> None:
    """Every recipe as shipped (cuda_graph auto: Lightning's step on a CPU) and with the module's own step."""
    out = tmp_path / "counts.json"
    extra = ["--model.init_args.weights_path", str(resnet18_weights)] if recipe.startswith("finetune") else []
    args = fit_args(recipe, cifar_dir, tmp_path / "runs", *extra)
    precision = yaml.safe_load((CONFIGS / recipe).read_text())["trainer"]["precision"]
    args += [
        "--trainer.precision", precision,
        "--data.batch_size", "10", "--data.output_size", "32", "--trainer.max_epochs", "1",
        "--trainer.limit_train_batches", "9", "--trainer.enable_progress_bar", "true",
        "--trainer.log_every_n_steps", "50",  # logging steps read the values they log
        "--model.init_args.cuda_graph", cuda_graph,
        "--trainer.callbacks+=faults.CountDeviceWork", "--trainer.callbacks.out", str(out),
        "--trainer.callbacks.first", "2", "--trainer.callbacks.last", "8",
    ]  # fmt: skip
    run_cli(*args, cwd=tmp_path, env=env_with_tests())
    counted = json.loads(out.read_text())
    assert counted["reads"] == [], f"host reads in training steps 2-7: {counted['reads']}"
    assert len(counted["ops"]) == 6 and min(counted["ops"]) > 100, "the counter saw the steps"
    network = network_operations(recipe, 10, precision)
    # The network's gradients are allocated on the step's first backward (set_to_none), not accumulated.
    around = {name: n - network.get(name, 0) for name, n in counted["names"].items()}
    around_kernels = kernels(counted["names"]) - kernels(network)
    print(f"{recipe} cuda_graph={cuda_graph}: {max(counted['ops'])} operations a step, {sum(network.values())} of them "
          f"the network's forward, loss and backward; around it {around_kernels} launching kernels")  # fmt: skip
    assert around_kernels <= 100, sorted(around.items(), key=lambda item: -abs(item[1]))[:20]


# ---- the EMA ------------------------------------------------------------------------------------


class Holder(LightningModule):
    """A module with one layer: parameters, a float buffer and an integer buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.BatchNorm1d(3)


@pytest.mark.parametrize("warmup", [False, True])
def test_ema_update_is_the_ema_formula(warmup: bool) -> None:
    torch.manual_seed(0)
    model, decay = Holder(), 0.9
    ema = EMAWeights(decay=decay, decay_warmup=warmup)
    ema._average_model = AveragedModel(model, use_buffers=True, multi_avg_fn=get_ema_multi_avg_fn(decay))
    expected = None
    for t in range(6):
        with torch.no_grad():
            for tensor in (model.layer.weight, model.layer.bias, model.layer.running_mean):
                tensor.copy_(torch.randn_like(tensor))
            model.layer.num_batches_tracked.fill_(t * 7)
        current = [model.layer.weight.clone(), model.layer.bias.clone(), model.layer.running_mean.clone()]
        d = min(decay, (1 + t) / (10 + t)) if warmup else decay
        expected = current if t == 0 else [d * e + (1 - d) * c for e, c in zip(expected, current)]
        with Count() as count:
            ema.update(model)
        assert not any("_local_scalar_dense" in name for name in count.names), "the update read a tensor on the host"
        averaged = ema._average_model.module.layer
        for e, a in zip(expected, (averaged.weight, averaged.bias, averaged.running_mean)):
            assert torch.allclose(a, e, rtol=1e-6, atol=1e-7), (t, a, e)
        assert int(averaged.num_batches_tracked) == t * 7, "integer buffers are copied"
        assert int(ema._average_model.n_averaged) == t + 1


def test_a_new_fit_averages_into_its_new_average() -> None:
    """Each fit's setup makes a new average; updates must go into it, not into the last fit's tensors."""
    model, ema = Holder(), EMAWeights(decay=0.5)
    for _ in range(2):
        ema.setup(None, model, "fit")
        average = ema._average_model
        with torch.no_grad():
            model.layer.weight.add_(1.0)
        ema.update(model)
        assert torch.equal(average.module.layer.weight, model.layer.weight), "the first update copies the weights"


def test_ema_settings_are_checked() -> None:
    from cifar_resnet.errors import UserError

    with pytest.raises(UserError, match="decay must lie in"):
        EMAWeights(decay=1.5)
    with pytest.raises(UserError, match="update_every_n_steps must be positive"):
        EMAWeights(update_every_n_steps=0)


# ---- the learning rate a captured step reads ------------------------------------------------------


def test_schedule_fills_the_learning_rate_tensor_the_step_reads() -> None:
    """A captured step reads each group's LR from one device tensor: the schedule must change that tensor in
    place, every step (a new float or a new tensor would leave the graph with the first step's LR)."""
    weight = nn.Parameter(torch.zeros(4))
    optimizer = torch.optim.SGD([weight], lr=0.5)
    configured = execution_settings(optimizer)
    scheduler = WarmupDecayLR(optimizer, warmup=0.25, decay="linear")
    scheduler.set_total_steps(8)
    prepare_for_capture(optimizer, torch.device("cpu"))
    lr = optimizer.param_groups[0]["lr"]
    assert isinstance(lr, torch.Tensor) and optimizer.param_groups[0]["fused"]
    for step in range(8):
        assert optimizer.param_groups[0]["lr"] is lr
        assert lr.item() == pytest.approx(0.5 * scheduler.factor(step))
        before = weight.detach().clone()
        weight.grad = torch.ones(4)
        optimizer.step()
        assert torch.allclose(before - weight.detach(), lr.expand(4)), "the step used the tensor's LR"
        scheduler.step()
    assert len({round(scheduler.factor(s), 6) for s in range(8)}) > 4, "the schedule did change the LR"
    # The checkpoint of a captured run holds the LR as a number and the optimizer as configured.
    state = portable_optimizer_state(optimizer.state_dict(), configured)
    assert isinstance(state["param_groups"][0]["lr"], float) and not state["param_groups"][0]["fused"]


def test_a_captured_runs_checkpoint_holds_the_optimizer_as_configured() -> None:
    """A captured step runs Adam ``capturable`` with tensor learning rates; its checkpoints must not, or they
    would not load on a CPU (or into an eager run)."""
    model = ScratchResNet()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model._configured_settings, model._capture = execution_settings(optimizer), True
    for group in optimizer.param_groups:  # what prepare_for_capture does on a GPU
        group["lr"], group["capturable"] = torch.tensor(1e-3), True
    checkpoint = {"optimizer_states": [optimizer.state_dict()]}
    model.on_save_checkpoint(checkpoint)
    (group,) = checkpoint["optimizer_states"][0]["param_groups"]
    assert group["lr"] == pytest.approx(1e-3) and isinstance(group["lr"], float) and group["capturable"] is False
    assert SCHEMA_KEY in checkpoint, "the schema stamp is still written"


def test_a_restored_checkpoint_drops_the_captured_graph(tmp_path: Path) -> None:
    """Restoring a checkpoint may replace tensors a captured graph reads (optimizer state, learning rates):
    the module's step then records its graph anew instead of replaying one that reads stale buffers."""
    model = ScratchResNet()
    step = TrainStep(lambda images, labels: images.sum(), capture=True)
    step._graphs[(2, 3, 32, 32)] = (object(), (torch.zeros(2, 3, 32, 32), torch.zeros(2)), torch.zeros(()))  # as after a capture
    step._eager_calls[(2, 3, 32, 32)] = 3
    model._train_step = step
    model.on_load_checkpoint({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)})
    assert not step.captured and not step._eager_calls


class FakeGraphStep(TrainStep):
    """``TrainStep``'s control flow on a CPU: recording keeps the inputs' buffers and runs nothing (as CUDA's
    capture does); a replay runs the step on whatever those buffers hold then."""

    def _on_side_stream(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.step(images, labels)

    def _record(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[Any, tuple[torch.Tensor, torch.Tensor], torch.Tensor]:
        inputs, loss = (images.clone(), labels.clone()), torch.zeros(())

        class Graph:
            def replay(graph) -> None:
                loss.copy_(self.step(*inputs))

        return Graph(), inputs, loss


def test_a_captured_step_trains_on_every_batch_once_and_a_graph_per_shape() -> None:
    seen: list[int] = []

    def step(images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        seen.extend(labels.tolist())
        return images.sum()

    graphed = FakeGraphStep(step, capture=True, warmup_steps=2)
    shapes = [4, 4, 4, 4, 2, 4, 2, 2, 4, 2]  # an epoch's last, smaller batch now and then
    expected, losses = [], []
    for index, size in enumerate(shapes):
        labels = torch.arange(size) + 100 * index
        expected += labels.tolist()
        losses.append(float(graphed(torch.full((size, 3), float(index)), labels)))
    assert seen == expected, "each batch trained on once, in order: the capturing call replays, warm-up steps count"
    assert losses == [3.0 * size * index for index, size in enumerate(shapes)], "each loss is its own batch's"
    assert sorted(graphed._graphs) == [(2, 3), (4, 3)] and graphed.captured


@pytest.mark.slow
@pytest.mark.parametrize(
    ("extra", "reason"),
    [
        (["--trainer.accumulate_grad_batches", "2"], "cuda_graph: gradient accumulation needs Lightning's optimizer loop"),
        (["--trainer.callbacks+=faults.ZeroGradients"], "cuda_graph: ZeroGradients run per-step optimizer hooks"),
    ],
)
def test_where_the_own_step_cannot_run_one_line_says_why(extra: list[str], reason: str, cifar_dir: Path, tmp_path: Path) -> None:
    """Never silently: Lightning's step runs instead, and the run says so."""
    proc = run_cli(*fit_args("scratch.yaml", cifar_dir, tmp_path, "--model.init_args.cuda_graph", "true", *extra),
                   cwd=tmp_path, env=env_with_tests())  # fmt: skip
    said = [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("cuda_graph:")]
    assert len(said) == 1 and said[0].startswith(reason) and said[0].endswith("so training steps run as Lightning's automatic optimization.")
    (last,) = tmp_path.glob("*/version_0/checkpoints/last.ckpt")
    # Two epochs of 3 batches: 6 optimizer steps, or 2 an epoch when every 2 batches make one (the last alone).
    assert torch.load(last, weights_only=True)["global_step"] == (4 if "accumulation" in reason else 6)
