# lar-gen — `make help` lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON_BASE ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.13.0
export LARGEN_TINY_MODELS ?= $(CURDIR)/.cache/tiny-models
PYTEST_ARGS ?=

.PHONY: help install test lint tiny-models

help: ## list the targets
	@grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "}; {printf "  make %-12s %s\n", $$1, $$2}'

install: ## create .venv and install lar-gen with its dev extras (CPU torch when there is no CUDA)
	@test -x $(PY) || $(PYTHON_BASE) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	@if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then \
		echo "CUDA found: installing the default (CUDA) torch build"; \
		$(PY) -m pip install --quiet "torch>=2.4"; \
	else \
		echo "no CUDA: installing the CPU torch build torch==$(TORCH_VERSION)"; \
		$(PY) -m pip install --quiet "torch==$(TORCH_VERSION)"; \
	fi
	$(PY) -m pip install --quiet -e ".[dev]"
	@$(PY) -c "import torch, diffusers, transformers, ray, webdataset; print(f'torch {torch.__version__}, diffusers {diffusers.__version__}, transformers {transformers.__version__}, ray {ray.__version__}')"

tiny-models: ## generate the tiny offline model zoo into LARGEN_TINY_MODELS (default .cache/tiny-models)
	$(PY) scripts/make_tiny_models.py

lint: ## ruff over the whole project
	$(VENV)/bin/ruff check .

test: tiny-models ## run the whole test suite on CPU (pytest) and ruff
	$(VENV)/bin/ruff check .
	$(PY) -m pytest $(PYTEST_ARGS)
