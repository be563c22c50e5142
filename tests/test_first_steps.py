"""What a new user meets first: the version, the help, a command without a recipe, the debug overlay."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cifar_resnet.cli import main
from conftest import CONFIGS, ROOT

RECIPES = ["configs/scratch.yaml", "configs/finetune.yaml", "configs/fast.yaml", "configs/finetune_fast.yaml"]


def test_the_recipes_named_are_the_recipes_there_are() -> None:
    assert sorted(f"configs/{p.name}" for p in CONFIGS.glob("*.yaml") if p.name != "debug.yaml") == sorted(RECIPES)


def test_version_answers_without_importing_torch() -> None:
    assert re.search(r'^cifar-resnet = "cifar_resnet\.entry:main"$', (ROOT / "pyproject.toml").read_text(), re.M)
    code = (
        "import sys; sys.argv = ['cifar-resnet', '--version']; from cifar_resnet.entry import main; main(); "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'lightning', 'torchvision')))"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    version, imported = proc.stdout.splitlines()
    assert re.fullmatch(r"cifar-resnet \d+\.\d+\.\d+\S*", version) and imported == "[]"


def test_fit_without_a_recipe_suggests_one(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["fit"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("cifar-resnet: error: no model or recipe given. Start from a recipe: cifar-resnet fit --config configs/")
    assert all(recipe in err for recipe in RECIPES) and "configs/debug.yaml" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("args", [["--help"], ["fit", "--help"], ["test", "--help"]])
def test_the_help_names_every_recipe(capsys, args: list[str]) -> None:
    with pytest.raises(SystemExit):
        main(args)
    text = " ".join(capsys.readouterr().out.split())
    assert all(Path(recipe).name in text for recipe in RECIPES) and "configs/debug.yaml" in text


def printed_config(capsys, *args: str) -> dict:
    with pytest.raises(SystemExit):
        main(["fit", *args, "--print_config"])
    return yaml.safe_load(capsys.readouterr().out)


@pytest.mark.parametrize("recipe", RECIPES)
def test_the_debug_overlay_composes_with_every_recipe(capsys, recipe: str) -> None:
    alone = printed_config(capsys, "--config", str(ROOT / recipe))
    debug = printed_config(capsys, "--config", str(ROOT / recipe), "--config", str(CONFIGS / "debug.yaml"))
    assert debug["trainer"]["accelerator"] == "cpu" and debug["trainer"]["limit_train_batches"] == 4
    assert debug["model"]["init_args"]["compile"] is False and debug["data"]["data_on_device"] is False
    logger = debug["trainer"]["logger"]
    assert logger["class_path"].endswith("CSVLogger") and logger["init_args"]["name"] == Path(recipe).stem
    # The recipe itself stays: network, optimizer, schedule, augmentation, callbacks (EMA included).
    for key in ("optimizer", "lr_scheduler", "dropout", "weights", "label_smoothing", "tta"):
        assert debug["model"]["init_args"].get(key) == alone["model"]["init_args"].get(key)
    assert debug["model"]["class_path"] == alone["model"]["class_path"]
    for key in ("hflip_prob", "vflip_prob", "crop_padding", "output_size", "mean", "std"):
        assert debug["data"][key] == alone["data"][key]
    assert debug["trainer"]["callbacks"] == alone["trainer"]["callbacks"]


@pytest.mark.slow
def test_a_recipe_under_the_debug_overlay_trains_on_the_cpu_without_figures(cifar_dir: Path, tmp_path: Path) -> None:
    main(["fit", "--config", str(CONFIGS / "fast.yaml"), "--config", str(CONFIGS / "debug.yaml"), "--data.data_dir", str(cifar_dir),
          "--data.download", "false", "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
          "--trainer.max_epochs", "1", "--trainer.enable_progress_bar", "false"])  # fmt: skip
    run_dir = tmp_path / "runs" / "fast" / "version_0"
    rows = (run_dir / "metrics.csv").read_text().splitlines()
    assert "val/top1" in rows[0] and len(rows) > 1 and (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert not list(run_dir.glob("events.out.tfevents.*")), "no TensorBoard, so no figures"


def test_make_smoke_uses_the_debug_overlay() -> None:
    makefile = (ROOT / "Makefile").read_text()
    smoke_args = re.search(r"^SMOKE_ARGS := (.*?)(?<!\\)$", makefile, re.M | re.S).group(1)
    assert "--config configs/debug.yaml" in smoke_args
    assert all("$(SMOKE_ARGS)" in line for line in makefile.splitlines() if "$(BIN)/cifar-resnet " in line and "SMOKE" in line)
