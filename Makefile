# Set-up is part of every target: a fresh clone needs only `make train` or `make test`.
VENV ?= .venv
BIN := $(VENV)/bin
# torchvision's wheels are built against PyPI's torch; point pip's find-links away from any
# local CPU-only torch wheel (as on some build machines) so both come from the index.
PIP := PIP_FIND_LINKS=$(CURDIR)/$(VENV) $(BIN)/python -m pip

.PHONY: setup train finetune test test-fast test-latest docs-check smoke bench reproduce gpu-check tensorboard

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install -e ".[test]"
	touch $@

train: setup  ## fit the seed's scratch ResNet (downloads CIFAR-100 when online)
	$(BIN)/cifar-resnet fit --config configs/scratch.yaml

finetune: setup  ## fine-tune ImageNet ResNet18 at 224x224
	$(BIN)/cifar-resnet fit --config configs/finetune.yaml

test: setup  ## the test suite (one pytest-xdist worker per core; its size and time: bench/RESULTS.md)
	$(BIN)/pytest

# The unit tests: everything but the end-to-end runs (tests marked slow, and those that share a fitted run).
test-fast: setup  ## the fast tier: unit tests only (its time: bench/RESULTS.md)
	$(BIN)/pytest -m "not slow"

docs-check: setup  ## README and docs/: dead links and #anchors, commands that no longer parse (seconds; trains nothing)
	$(BIN)/pytest -n 0 -q tests/test_docs.py

# The suite against the newest Lightning release (and whatever newer dependencies it asks for), in a second
# venv that reuses the first one's other packages, so the `lightning<2.7` pin can be lifted the day it passes.
LATEST := .venv-latest
test-latest: setup  ## the test suite against the newest Lightning release
	python3 -m venv $(LATEST)
	$(BIN)/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" > \
		"$$($(LATEST)/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/zz-project-venv.pth"
	PIP_FIND_LINKS= $(LATEST)/bin/python -m pip install --quiet --upgrade lightning
	PIP_FIND_LINKS= $(LATEST)/bin/python -m pip install --quiet --no-deps -e .
	ln -sf "$(abspath $(BIN))/tensorboard" $(LATEST)/bin/tensorboard  # the tests start TensorBoard from beside python
	$(LATEST)/bin/python -c "import lightning, torch; print('lightning', lightning.__version__, 'torch', torch.__version__)"
	$(LATEST)/bin/python -m pytest

# A tiny CPU run of the whole flow on a generated archive (about a minute): fit, test, predict, with the
# configs/debug.yaml overlay (CPU, a few small batches, no compile, a CSV log instead of TensorBoard).
SMOKE := smoke
SMOKE_ARGS := --config configs/debug.yaml --data.data_dir $(SMOKE)/data --data.download false \
	--trainer.logger.init_args.save_dir $(SMOKE)/runs

smoke: setup  ## fit, test and predict on a generated archive, on the CPU, in about a minute
	$(BIN)/python -c "from cifar_resnet.data.synthetic import write_synthetic_archive as w; w('$(SMOKE)/data', 600, 200)"
	$(BIN)/python -c "import numpy as n, pathlib as p; from PIL import Image; d = p.Path('$(SMOKE)/photos'); d.mkdir(exist_ok=True); \
		[Image.fromarray(n.random.default_rng(i).integers(0, 256, (64, 64, 3), dtype=n.uint8)).save(d / f'photo{i}.png') for i in range(3)]"
	$(BIN)/cifar-resnet fit --config configs/scratch.yaml $(SMOKE_ARGS)
	$(BIN)/cifar-resnet test --config configs/scratch.yaml $(SMOKE_ARGS) --ckpt_path last
	$(BIN)/cifar-resnet predict --config configs/scratch.yaml $(SMOKE_ARGS) --ckpt_path last --data.predict_path $(SMOKE)/photos
	@echo "The run: $(SMOKE)/runs/scratch/ (metrics.csv, checkpoints/, test_report.json, predictions.csv)"

bench: setup  ## data-pipeline and training-throughput benchmark
	$(BIN)/python bench/benchmark.py

# Every recipe's fit + test, time to accuracy: `make reproduce ARGS="--data-dir data --seeds 3"`;
# offline, speed only: `make reproduce ARGS="--synthetic --max-minutes 30"` (see bench/reproduce.py).
ARGS ?= --synthetic --seeds 1
reproduce: setup  ## time-to-accuracy table and plot for configs/*.yaml (bench/out/reproduce.*)
	$(BIN)/python bench/reproduce.py $(ARGS)

# Needs no venv: a GPU machine's own python3 (or PYTHON=...) will do; OUT_DIR defaults to bench/out/gpu_check.
GPU_PYTHON := $(if $(wildcard $(BIN)/python),$(abspath $(BIN)/python),python3)
gpu-check:  ## every speed figure in < 10 minutes on one GPU, offline (bench/gpu_check.sh)
	PYTHON="$${PYTHON:-$(GPU_PYTHON)}" bash bench/gpu_check.sh $(OUT_DIR)

tensorboard: setup
	$(BIN)/tensorboard --logdir runs
