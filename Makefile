# Set-up and checks. `make demo` creates .venv, installs TextSeg and runs the demo on the bundled real CT;
# `make test` installs TextSeg with its test tools and runs ruff and pytest.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install test lint benchmark demo

$(BIN)/textseg: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

install: $(BIN)/textseg

demo: install
	$(BIN)/textseg demo --output textseg-demo

lint: install
	$(BIN)/ruff check .

test: lint
	$(BIN)/pytest

benchmark: install
	$(BIN)/python Benchmarks/benchmark.py
