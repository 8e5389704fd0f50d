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
	# The same pin for the rest: timm's torchvision would otherwise bring a CUDA torch of its own.
	$(BIN)/pip install -q -c constraints.txt -e ".[dev]"

setup: $(BIN)/python

demo: setup
	$(BIN)/python -m experiments.train_digits

test: setup
	$(BIN)/python -m pytest -n 2 -q

lint: setup
	$(BIN)/ruff check .
