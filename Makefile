# One command each, on a fresh clone: `make demo`, `make test`. Both create .venv and install what they need.
PYTHON ?= python3
VENV ?= .venv
# The torch release installed when the environment has none. An existing torch (your own CUDA build) is kept.
TORCH_VERSION ?= 2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.keel-installed

.PHONY: setup demo demo-quick test test-all lint clean

# `make setup` on a fresh clone of this 2-core machine: 51 s with uv, 175 s with pip alone (measured 2026-12-07); pip
# stays the fallback where uv cannot be installed. torch goes through pip so that a local wheel (pip's own
# find-links) is used, and uv keeps it: every extra's torch requirement is already met.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "torch==$(TORCH_VERSION)"
	$(BIN)/python -m pip install -q uv && $(BIN)/uv pip install -q --python $(BIN)/python -e ".[test]" \
		|| $(BIN)/python -m pip install -q -e ".[test]"
	touch $@

setup: $(STAMP)

demo: setup
	$(BIN)/keel demo

demo-quick: setup
	$(BIN)/keel demo --quick

# The default suite on TEST_WORKERS processes (pytest-xdist), each test file whole in one worker and each worker on
# one torch thread: two workers of two threads each on two cores made one recovery test 12x slower (10 s -> 132 s).
TEST_WORKERS ?= 2

test: setup
	OMP_NUM_THREADS=1 $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile

test-all: setup
	$(BIN)/python -m pytest -m "not gpu"

lint: setup
	$(BIN)/uv pip install -q --python $(BIN)/python ruff mypy 2>/dev/null || $(BIN)/python -m pip install -q ruff mypy
	$(BIN)/ruff check src tests examples
	$(BIN)/ruff format --check src tests examples
	$(BIN)/mypy

clean:
	rm -rf $(VENV) runs build *.egg-info src/*.egg-info
