# make install: .venv with the pinned CPU stack (idempotent); make demo: run the demo pipeline; make test: all tests.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
UV_VERSION := 0.13.9
# The CPU torch wheel: this workplace's machines carry it in /opt/wheels; elsewhere, PyTorch's CPU index.
TORCH_SOURCE := $(if $(wildcard /opt/wheels/torch-*),--find-links /opt/wheels,--extra-index-url https://download.pytorch.org/whl/cpu)
STAMP := $(VENV)/.installed
# Test files run on two workers: much of an end-to-end test is one core busy (imports, server starts, waits).
TEST_WORKERS ?= 2
export MLFLOW_DISABLE_TELEMETRY := true
export VLLM_NO_USAGE_STATS := 1
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false

.PHONY: install demo test lint lock clean

install: $(STAMP)

$(STAMP): pyproject.toml requirements/cpu.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q "uv==$(UV_VERSION)"
	$(BIN)/uv pip sync --python $(BIN)/python requirements/cpu.lock $(TORCH_SOURCE) --index-strategy unsafe-best-match
	$(BIN)/uv pip install --python $(BIN)/python --no-deps -e .
	touch $(STAMP)

demo: install
	$(BIN)/distillery run demo

test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -v --durations=25 -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Re-resolve the lock from requirements/*.in (needs the registry).
lock:
	$(BIN)/uv pip compile requirements/cpu.in requirements/dev.in --override requirements/overrides.txt \
	  --python-version 3.11 --python-platform x86_64-manylinux_2_28 $(TORCH_SOURCE) \
	  --index-strategy unsafe-best-match -o requirements/cpu.lock

clean:
	rm -rf $(VENV) runs mlartifacts mlflow.db
