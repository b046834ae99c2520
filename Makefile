# The two commands of the README: `make demo` and `make test`. Each creates .venv when missing
# and (re)installs the project into it whenever pyproject.toml changes.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The torch build to install first. The default resolves to the CPU wheel on this project's build
# machines and to PyPI's (CUDA) build elsewhere; set TORCH_SPEC to pick another build.
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: demo test lint bench bench-ett install clean

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[test,dev,bench]"
	@touch $@

demo: $(STAMP)
	$(BIN)/forecaster demo --config configs/demo.yaml

# pytest exits 5 when it collects no test; that is a failure here like any other non-zero code.
test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

bench: $(STAMP)
	$(BIN)/python benchmarks/preprocess.py
	$(BIN)/python benchmarks/onnx_latency.py
	$(BIN)/python benchmarks/train_speed.py --threads 1
	$(BIN)/python benchmarks/step_parts.py --threads 1 2

# Accuracy on ETT (needs ../shared/data; about 45 minutes on two CPU cores at these settings).
bench-ett: $(STAMP)
	$(BIN)/python benchmarks/ett.py --datasets ETTh1 --horizons 96 192 336 720 \
		--models scrn scrn+lin336 mi_gru gru --methods feedback-matrix bptt --seeds 0 1 2 \
		--epochs 6 --patience 2 \
		--max-windows 2048

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
