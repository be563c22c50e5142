"""The modern recipes (configs/fast.yaml, configs/finetune_fast.yaml) and each technique they switch on."""

from __future__ import annotations

import math
import signal
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.functional as TF
import yaml
from lightning.pytorch import Callback, Trainer, seed_everything
from torch import nn

from cifar_resnet import CIFAR100DataModule, ScratchResNet
from cifar_resnet.averaging import EMAWeights
from cifar_resnet.classifier import parameter_groups
from cifar_resnet.data.order import epoch_order
from cifar_resnet.data.synthetic import write_synthetic_archive
from cifar_resnet.data.transforms import random_crops
from cifar_resnet.errors import UserError
from cifar_resnet.schedules import WarmupDecayLR
from cli_process import CliProcess
from conftest import CONFIGS, drop_figures, env_with_tests, read_scalars, run_cli
from faults import pause_point, wait_until_paused

# Lightning 2.6's own use of a torch API that newer torch deprecates (the CLI silences it too).
LIGHTNING_LEAFSPEC = pytest.mark.filterwarnings("ignore:`isinstance\\(treespec, LeafSpec\\)` is deprecated")
BATCH = 50  # the recipes' batches (512, 256) scaled down for 2 CPU cores


def short_ema_config(recipe: str, folder: Path, figures: bool = True) -> Path:
    """The recipe with an EMA memory of a few steps (its 0.99x suits ~1,000 steps, not 30); without the class
    figures if ``figures`` is false."""
    config = yaml.safe_load((CONFIGS / f"{recipe}.yaml").read_text())
    if not figures:
        drop_figures(config)
    (ema,) = [c for c in config["trainer"]["callbacks"] if c["class_path"].endswith("EMAWeights")]
    ema["init_args"]["decay"] = 0.8
    path = folder / f"{recipe}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def recipe_args(recipe: str, data_dir: Path, save_dir: Path, epochs: int = 5, *extra: str, figures: bool = True) -> list[str]:
    """A recipe shrunk to a few CPU seconds: small batches (same LR: steps are bounded by gradient clipping
    or small anyway), no compile, a short EMA memory."""
    save_dir.mkdir(parents=True, exist_ok=True)
    return [
        "--config", str(short_ema_config(recipe, save_dir, figures)),
        "--data.data_dir", str(data_dir), "--data.download", "false", "--data.val_size", "100",
        "--data.batch_size", str(BATCH), "--data.eval_batch_size", "100",
        "--trainer.accelerator", "cpu", "--trainer.devices", "1", "--trainer.max_epochs", str(epochs),
        "--trainer.log_every_n_steps", "1", "--trainer.enable_progress_bar", "false",
        "--trainer.logger.init_args.save_dir", str(save_dir), "--trainer.limit_test_batches", "2",
        "--model.init_args.compile", "false",
        *extra,
    ]  # fmt: skip


# ---- label smoothing ---------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:You are trying to `self.log\\(\\)`")  # the steps are called without a Trainer
def test_training_loss_is_label_smoothed_and_evaluation_loss_is_not() -> None:
    model = ScratchResNet(label_smoothing=0.2).eval()  # eval: dropout off, so every forward pass agrees
    images, labels = torch.randn(6, 3, 32, 32), torch.arange(6)
    logits = model(images)
    smoothed = F.cross_entropy(logits, labels, label_smoothing=0.2)
    plain = F.cross_entropy(logits, labels)
    assert not torch.isclose(smoothed, plain)
    assert torch.allclose(model.training_step((images, labels), 0), smoothed)
    assert torch.allclose(model.validation_step((images, labels), 0)["loss"], plain)
    with pytest.raises(UserError, match="label_smoothing"):
        ScratchResNet(label_smoothing=1.0)


# ---- per-step LR schedule ----------------------------------------------------------------------


def expected_factor(step: int, total: int, warmup: float, decay: str) -> float:
    """The schedule's formula, written out independently of the implementation."""
    w = round(warmup * total)
    if step < w:
        return (step + 1) / w
    p = (step - w) / (total - w)
    return 1 - p if decay == "linear" else 0.5 * (1 + math.cos(math.pi * p))


@pytest.mark.parametrize("decay", ["linear", "cosine"])
def test_warmup_decay_lr_follows_its_formula_every_step(decay: str) -> None:
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.4)
    scheduler = WarmupDecayLR(optimizer, warmup=0.1, decay=decay)
    scheduler.set_total_steps(50)
    lrs = []
    for _ in range(50):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([0.4 * expected_factor(s, 50, 0.1, decay) for s in range(50)])
    assert lrs[0] == pytest.approx(0.08) and lrs[4] == max(lrs) == pytest.approx(0.4)  # 5 warm-up steps
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)  # decayed to zero after the last step
    with pytest.raises(UserError, match="warmup"):
        WarmupDecayLR(optimizer, warmup=1.0)


# ---- weight decay only on conv/linear weights --------------------------------------------------


def test_norm_weights_and_biases_get_no_weight_decay() -> None:
    model = ScratchResNet(optimizer=partial(torch.optim.SGD, lr=0.1, weight_decay=5e-4), weight_decay_norm_and_bias=False)
    optimizer = model.configure_optimizers()
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0
    by_id = {id(p): name for name, p in model.named_parameters()}
    decayed = {by_id[id(p)] for p in decay["params"]}
    not_decayed = {by_id[id(p)] for p in no_decay["params"]}
    assert decayed | not_decayed == set(by_id.values()) and not decayed & not_decayed
    norms = {f"{name}.{kind}" for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d) for kind in ("weight", "bias")}
    biases = {name for name in by_id.values() if name.endswith(".bias")}
    weights = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert norms and biases and weights
    assert not_decayed == norms | biases and decayed == weights
    # The switch's default keeps the seed's behaviour: one group, decay (if any) on everything.
    assert len(parameter_groups(model)) == 1


# ---- EMA through Lightning's callback ----------------------------------------------------------


class RecordWeights(Callback):
    """Keeps a copy of the parameters after every optimizer step."""

    def __init__(self) -> None:
        self.steps: list[list[torch.Tensor]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        self.steps.append([p.detach().clone() for p in pl_module.parameters()])


@LIGHTNING_LEAFSPEC
def test_ema_weights_follow_the_ema_formula(cifar_dir: Path, tmp_path: Path) -> None:
    seed_everything(0)
    decay = 0.7
    model = ScratchResNet(optimizer=partial(torch.optim.SGD, lr=0.02, momentum=0.9))
    data = CIFAR100DataModule(str(cifar_dir), val_size=100, batch_size=50, crop_padding=2)
    record = RecordWeights()
    trainer = Trainer(
        accelerator="cpu", max_epochs=1, limit_train_batches=5, limit_val_batches=0, logger=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
        callbacks=[record, EMAWeights(decay=decay)],
    )  # fmt: skip
    trainer.fit(model, data)
    assert len(record.steps) == 5
    ema = record.steps[0]  # the first update copies the weights
    for weights in record.steps[1:]:
        ema = [decay * e + (1 - decay) * w for e, w in zip(ema, weights)]
    assert not all(torch.equal(e, w) for e, w in zip(ema, record.steps[-1]))
    # After fit, the module holds the average (Lightning copies it in at the end of training).
    for expected, actual in zip(ema, model.parameters()):
        assert torch.allclose(actual, expected, rtol=1e-5, atol=1e-7)


# ---- batched random crops ------------------------------------------------------------------------


def test_random_crops_match_torchvision_reflect_padded_crops() -> None:
    images = torch.randint(0, 256, (32, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    offsets = torch.randint(0, 9, (32, 2), generator=torch.Generator().manual_seed(1))
    ours = random_crops(images, 4, offsets)
    # torchvision's RandomCrop(32, padding=4, padding_mode="reflect") with these (top, left) parameters:
    reference = torch.stack([
        TF.crop(TF.pad(image, [4], padding_mode="reflect"), int(top), int(left), 32, 32)
        for image, (top, left) in zip(images, offsets)
    ])  # fmt: skip
    assert torch.equal(ours, reference)


def test_each_image_gets_its_own_random_crop() -> None:
    image = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    crops = random_crops(image.expand(400, -1, -1, -1), 2)
    shifts = {TF.crop(TF.pad(image[0], [2], padding_mode="reflect"), t, l, 32, 32).numpy().tobytes(): (t, l) for t in range(5) for l in range(5)}
    seen = [shifts[crop.numpy().tobytes()] for crop in crops]  # every crop is one of the 25 translations
    assert len(set(seen)) == 25  # ... and all 25 occur (each has probability 1/25 in 400 draws)


# ---- test-time augmentation ----------------------------------------------------------------------


@LIGHTNING_LEAFSPEC
def test_tta_metrics_use_the_mean_of_the_logits_of_each_image_and_its_mirror(cifar_dir: Path, tmp_path: Path) -> None:
    seed_everything(0)
    model = ScratchResNet(tta=True)
    data = CIFAR100DataModule(str(cifar_dir), val_size=100, eval_batch_size=100)
    trainer = Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=tmp_path, limit_test_batches=1)  # fmt: skip
    trainer.test(model, data, verbose=False)
    images, labels = next(iter(data.test_dataloader()))
    images = data.transform(images)
    model.eval()  # as during the test (Lightning puts the module back in training mode afterwards)
    with torch.no_grad():
        plain, mirrored = model(images), model(images.flip(-1))
    assert torch.allclose(model.tta_logits(images), (plain + mirrored) / 2)
    metrics = trainer.callback_metrics
    assert float(metrics["test/top1"]) == pytest.approx(float((plain.argmax(1) == labels).float().mean()))
    assert float(metrics["test/top1_tta"]) == pytest.approx(float(((plain + mirrored).argmax(1) == labels).float().mean()))
    top5 = ((plain + mirrored).topk(5, dim=1).indices == labels[:, None]).any(1).float().mean()
    assert float(metrics["test/top5_tta"]) == pytest.approx(float(top5))


# ---- the epoch order on the device ---------------------------------------------------------------


def reference_order(size: int, seed: int, epoch: int) -> list[int]:
    """:func:`epoch_order` in plain Python integers (the hash, then a stable sort)."""
    mask = 0xFFFFFFFF

    def mix(x: int) -> int:
        x ^= x >> 16
        x = (x * 0x7FEB352D) & mask
        x ^= x >> 15
        x = (x * 0x846CA68B) & mask
        return x ^ (x >> 16)

    key = mix((mix(seed & mask) ^ (epoch * 0x9E3779B1)) & mask)
    keys = [mix(mix(i ^ key) ^ ((key * 0x85EBCA6B) & mask)) for i in range(size)]
    return sorted(range(size), key=lambda i: keys[i])


@pytest.mark.parametrize(("seed", "epoch"), [(0, 0), (0, 1), (7, 0), (2**32 - 1, 49)])
def test_epoch_order_equals_a_plain_python_reference_and_covers_every_image_once(seed: int, epoch: int) -> None:
    order = epoch_order(1000, seed, epoch)
    assert order.tolist() == reference_order(1000, seed, epoch)
    assert sorted(order.tolist()) == list(range(1000)) and order.tolist() != list(range(1000))


def test_device_order_gives_the_host_orders_batches_and_ddp_shards(cifar_dir: Path) -> None:
    def batches(on_device: bool, world: int = 1, rank: int = 0) -> list[torch.Tensor]:
        dm = CIFAR100DataModule(str(cifar_dir), val_size=100, batch_size=50, data_on_device=on_device)
        device = SimpleNamespace(root_device=torch.device("cpu"))
        dm.trainer = SimpleNamespace(strategy=device, world_size=world, global_rank=rank, training=False)
        dm.setup("fit")
        loader = dm.train_dataloader()
        loader.sampler.set_epoch(3)
        return [labels for _, labels in loader], dm.splits["train"].labels

    host, labels = batches(on_device=False)
    device, _ = batches(on_device=True)
    assert [b.tolist() for b in host] == [b.tolist() for b in device]
    assert torch.cat(device).tolist() == labels[epoch_order(len(labels), 0, 3)].tolist()
    shards = [torch.cat(batches(on_device=True, world=2, rank=rank)[0]) for rank in range(2)]
    assert len(shards[0]) == len(shards[1]) == 250
    # Rank r reads positions r, r + 2, ... of the same order: together the whole epoch, each image once.
    interleaved = torch.stack(shards, dim=1).flatten()
    assert interleaved.tolist() == torch.cat(device).tolist()


def test_device_batches_need_no_index_list_from_the_host(cifar_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    dm = CIFAR100DataModule(str(cifar_dir), val_size=100, batch_size=50, data_on_device=True)
    dm.trainer = SimpleNamespace(strategy=SimpleNamespace(root_device=torch.device("cpu")), world_size=1, global_rank=0)
    dm.setup("fit")
    copies = []
    real = torch.as_tensor
    monkeypatch.setattr(torch, "as_tensor", lambda *a, **k: copies.append(a) or real(*a, **k))
    assert sum(len(labels) for _, labels in dm.train_dataloader()) == 500
    assert not copies  # every batch's rows were computed from an arange on the data's device


# ---- compile modes -------------------------------------------------------------------------------


@pytest.mark.parametrize(("setting", "mode"), [(True, "default"), ("max-autotune", "max-autotune"), ("reduce-overhead", "reduce-overhead")])
def test_compile_takes_a_mode_with_static_shapes(setting: bool | str, mode: str, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(nn.Module, "compile", lambda self, **kwargs: calls.append((self, kwargs)))
    model = ScratchResNet(compile=setting)
    model.prepare_network()
    model.prepare_network()  # once only, whatever calls it again
    assert calls == [(model.net, {"mode": mode, "dynamic": False})]


def test_compile_refuses_unknown_modes() -> None:
    with pytest.raises(UserError, match="compile must be"):
        ScratchResNet(compile="fastest")


# ---- the recipes end to end ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def learnable_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_synthetic_archive(tmp_path_factory.mktemp("learnable"), n_train=600, n_test=200)


# Each recipe scaled down to a few CPU seconds: epochs (10 steps each) and its CLI overrides. ResNet18 learns in
# 5 epochs at the smallest size, 32 (at 64 it learns too, in 20 s instead of 12 s on 2 CPU cores).
SHRUNK = {"fast": (4, []), "finetune_fast": (5, ["--data.output_size", "32"])}


@pytest.mark.heavy
@pytest.mark.parametrize("recipe", ["fast", "finetune_fast"])
def test_recipe_learns_and_a_zeroed_loss_does_not(recipe: str, learnable_dir: Path, resnet18_weights: Path, tmp_path: Path) -> None:
    epochs, extra = SHRUNK[recipe]
    if recipe == "finetune_fast":
        extra = [*extra, "--model.init_args.weights_path", str(resnet18_weights)]
    steps = 10 * epochs
    scores = {}
    for name, faults in (("learns", []), ("zeroed", ["--trainer.callbacks+=faults.ZeroGradients"])):
        save_dir = tmp_path / name
        args = recipe_args(recipe, learnable_dir, save_dir, epochs, *extra, *faults)
        # The run that learns, and its test, go through the installed command itself.
        run_cli("fit", *args, cwd=tmp_path, env=env_with_tests(), timeout=600, installed=name == "learns")
        run_dir = save_dir / recipe / "version_0"
        scalars = read_scalars(run_dir)
        scores[name] = max(v for _, v in scalars["val/top1"])
        if name == "learns":
            # The LR changed every step, as the per-step formula says, over the run's steps.
            lrs = dict(scalars["train/lr/decay"])
            base, decay = {"fast": (0.2, "linear"), "finetune_fast": (0.05, "cosine")}[recipe]
            assert len(lrs) >= steps - 5 and len(set(lrs.values())) >= steps - 5
            for step, lr in lrs.items():
                assert lr == pytest.approx(base * expected_factor(step, steps, 0.1, decay), rel=1e-5), step
            last = run_dir / "checkpoints" / "last.ckpt"
            proc = run_cli("test", *args, "--ckpt_path", str(last), cwd=tmp_path, installed=True)
            test_scalars = read_scalars(save_dir / recipe / "version_0-test")
            assert {"test/top1", "test/top5", "test/top1_tta", "test/top5_tta"} <= test_scalars.keys()
            assert "test/top1" in proc.stdout
    # 100 classes: chance is 1 %.
    assert scores["learns"] >= 0.3, scores
    assert scores["zeroed"] <= 0.05, scores


def test_recipes_print_every_setting(tmp_path: Path) -> None:
    for recipe in ("fast", "finetune_fast"):
        proc = run_cli("fit", "--config", str(CONFIGS / f"{recipe}.yaml"), "--print_config", cwd=tmp_path)
        for key in ("label_smoothing: 0.1", "weight_decay_norm_and_bias: false", "tta: true", "compile: true",
                    "crop_padding: 4", "vflip_prob: 0.0", "data_on_device: true", "nesterov: true",
                    "cifar_resnet.schedules.WarmupDecayLR", "cifar_resnet.averaging.EMAWeights"):
            assert key in proc.stdout, (recipe, key)


# ---- exact resume with EMA and a per-step schedule -----------------------------------------------


@pytest.mark.heavy
@pytest.mark.parametrize("cuda_graph", ["auto", "true"])  # Lightning's step on a CPU; the module's own step
def test_killed_fast_run_resumes_to_the_same_weights_and_ema(cuda_graph: str, learnable_dir: Path, tmp_path: Path) -> None:
    def args(save_dir: Path, *extra: str) -> list[str]:
        return ["fit", *recipe_args("fast", learnable_dir, save_dir, 3, "--trainer.deterministic", "true",
                                    "--trainer.limit_train_batches", "4", "--model.init_args.cuda_graph", cuda_graph,
                                    *extra, figures=False)]  # fmt: skip

    run_cli(*args(tmp_path / "reference"), cwd=tmp_path)
    reference = torch.load(tmp_path / "reference" / "fast" / "version_0" / "checkpoints" / "last.ckpt", weights_only=True)

    save_dir = tmp_path / "killed"
    last = save_dir / "fast" / "version_0" / "checkpoints" / "last.ckpt"
    pause = ["--trainer.callbacks+=faults.PauseAtStep", "--trainer.callbacks.fifo", str(pause_point(tmp_path)),
             "--trainer.callbacks.step", "4"]  # fmt: skip
    proc = CliProcess(args(save_dir, *pause), tmp_path, env_with_tests())
    try:
        assert wait_until_paused(tmp_path / "pause.fifo", proc) == "paused at step 4, epoch 1"
        assert last.exists()
        proc.send_signal(signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate(timeout=30)
    killed_at = torch.load(last, weights_only=True)
    assert killed_at["global_step"] == 4, "the kill must land after the first epoch only"

    run_cli(*args(save_dir, "--ckpt_path", "last"), cwd=tmp_path)
    resumed = torch.load(last, weights_only=True)
    assert (resumed["epoch"], resumed["global_step"]) == (reference["epoch"], reference["global_step"]) == (2, 12)
    # state_dict holds the EMA weights, current_model_state the trained ones: both bit-identical.
    for key in ("state_dict", "current_model_state", "averaging_state"):
        assert resumed[key].keys() == reference[key].keys(), key
        for name, value in reference[key].items():
            assert torch.equal(resumed[key][name], value), (key, name)
    assert not all(torch.equal(reference["state_dict"][k], v) for k, v in reference["current_model_state"].items())
    assert resumed["lr_schedulers"] == reference["lr_schedulers"]


def test_a_checkpoints_input_settings_keep_the_configs_crops(cifar_dir: Path) -> None:
    data = CIFAR100DataModule(str(cifar_dir), crop_padding=4)
    state = data.state_dict()
    state["transform"]["output_size"] = 48  # a model trained at another size: its setting wins ...
    data.load_state_dict(state)
    assert data.transform.output_size == 48 and data.transform.crop_padding == 4  # ... and the crops stay
