# Set-up and checks. `make test` creates .venv, installs TextSeg with its test tools, runs ruff and pytest.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install test lint benchmark

$(BIN)/textseg: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

install: $(BIN)/textseg

lint: install
	$(BIN)/ruff check .

test: lint
	$(BIN)/pytest

benchmark: install
	$(BIN)/python Benchmarks/benchmark.py
