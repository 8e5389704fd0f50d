# Two commands for users (README): `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test lint

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first and pinned: an open-ended requirement would pull a multi-GB CUDA build.
	$(BIN)/pip install -q -c constraints.txt torch
	$(BIN)/pip install -q -c constraints.txt -e ".[dev]"
	# timm (for tests/test_convert_models.py) imports torchvision, whose only wheel for torch 2.13 is
	# a CUDA build that cannot import on the CPU torch: installed in site-packages it would break every
	# `import torchvision` (torchmetrics, so lightning and `make demo`). So timm comes without its
	# dependencies, and torchvision's Python part in a folder of its own, which only that test adds.
	$(BIN)/pip install -q -c constraints.txt --no-deps "timm>=1.0"
	$(BIN)/pip install -q -c constraints.txt --no-deps --target $(VENV)/torchvision-python torchvision

setup: $(BIN)/python

demo: setup
	$(BIN)/python -m experiments.train_digits

test: setup
	$(BIN)/python -m pytest -n 2 -q

lint: setup
	$(BIN)/ruff check .
