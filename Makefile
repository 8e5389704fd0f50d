# Two commands for users (README): `make demo` and `make test`; `make test-fast` for the edit loop.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# Every pip call passes it: an open-ended torch requirement would pull a multi-GB CUDA build.
PIP := $(BIN)/pip install -q -c constraints.txt

.PHONY: setup demo test test-fast lint

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned (the CPU build on a machine without CUDA), then every extra.
	$(PIP) torch==2.13.0
	$(PIP) -e ".[dev]"
	# timm (for tests/test_convert_models.py) imports torchvision, whose only wheel for torch 2.13 is
	# a CUDA build that cannot import on the CPU torch: installed in site-packages it would break every
	# `import torchvision` (torchmetrics, so lightning and `make demo`). So timm comes without its
	# dependencies, and torchvision's Python part in a folder of its own, which only that test adds.
	$(PIP) --no-deps "timm>=1.0"
	$(PIP) --no-deps --target $(VENV)/torchvision-python torchvision

setup: $(BIN)/python

demo: setup
	$(BIN)/python -m experiments.train_digits

test: setup
	$(BIN)/python -m pytest -n 2 -q

# Everything but the ahead-of-time compiles and the slow tests (fresh venvs, DDP).
test-fast: setup
	$(BIN)/python -m pytest -n 2 -q -m "not aot and not slow"

lint: setup
	$(BIN)/ruff check .
	$(BIN)/mypy
