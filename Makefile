# Set-up is part of every target: a fresh clone needs only `make train` or `make test`.
VENV ?= .venv
BIN := $(VENV)/bin
# torchvision's wheels are built against PyPI's torch; point pip's find-links away from any
# local CPU-only torch wheel (as on some build machines) so both come from the index.
PIP := PIP_FIND_LINKS=$(CURDIR)/$(VENV) $(BIN)/python -m pip

.PHONY: setup train finetune test bench tensorboard

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

tensorboard: setup
	$(BIN)/tensorboard --logdir runs
