# Set-up is part of every target: a fresh clone needs only `make train` or `make test`.
VENV ?= .venv
BIN := $(VENV)/bin
# torchvision's wheels are built against PyPI's torch; point pip's find-links away from any
# local CPU-only torch wheel (as on some build machines) so both come from the index.
PIP := PIP_FIND_LINKS=$(CURDIR)/$(VENV) $(BIN)/python -m pip

.PHONY: setup train finetune test bench reproduce gpu-check tensorboard

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

test: setup  ## the test suite (a few minutes on 2 CPU cores)
	$(BIN)/pytest

bench: setup  ## data-pipeline and training-throughput benchmark
	$(BIN)/python bench/benchmark.py

# Every recipe's fit + test, time to accuracy: `make reproduce ARGS="--data-dir data --seeds 3"`;
# offline, speed only: `make reproduce ARGS="--synthetic --max-minutes 30"` (see bench/reproduce.py).
ARGS ?= --synthetic --seeds 1
reproduce: setup  ## time-to-accuracy table and plot for configs/*.yaml (bench/out/reproduce.*)
	$(BIN)/python bench/reproduce.py $(ARGS)

# Needs no venv: a GPU machine's own python3 (or PYTHON=...) will do; OUT_DIR defaults to bench/out/gpu_check.
GPU_PYTHON := $(if $(wildcard $(BIN)/python),$(abspath $(BIN)/python),python3)
gpu-check:  ## every speed figure in < 8 minutes on one GPU, offline (bench/gpu_check.sh)
	PYTHON="$${PYTHON:-$(GPU_PYTHON)}" bash bench/gpu_check.sh $(OUT_DIR)

tensorboard: setup
	$(BIN)/tensorboard --logdir runs
