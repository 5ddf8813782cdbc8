# qdllm developer entry points. `make setup` then `make test` is the whole set-up.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH_VERSION ?= 2.13.0

.PHONY: setup test lint bench run clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install "torch==$(TORCH_VERSION)"
	$(PIP) install -e ".[dev]"
	touch $@

test: setup
	WANDB_MODE=disabled HF_HUB_OFFLINE=1 $(PY) -m pytest

lint: setup
	$(PY) -m ruff check src tests experiments analysis run.py

bench: setup
	$(PY) experiments/bench_quant_core.py

run: setup
	$(PY) run.py

clean:
	rm -rf $(VENV) outputs multirun .pytest_cache
