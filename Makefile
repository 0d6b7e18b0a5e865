# Set-up and checks. `make demo` creates .venv, installs TextSeg and runs the demo on the bundled real CT;
# `make test` installs TextSeg with its test tools and the system packages the browser tests need, and runs ruff and
# pytest.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: install test lint benchmark demo system-packages

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

# Testing/test_web.py drives Debian's Chromium; the views render on Mesa (EGL, or OSMesa where EGL is missing).
# Testing/module/test_panel_qt.py runs PySide6 on Qt's offscreen platform, which loads libGL, fontconfig, GLib,
# xkbcommon, D-Bus and X11's client library.
# Installed with apt-get (as root, or through sudo) only when one is missing; elsewhere, install them by hand.
SYSTEM_PACKAGES := chromium libegl1 libgl1-mesa-dri libosmesa6 libgl1 libfontconfig1 libglib2.0-0 libxkbcommon0 \
	libdbus-1-3 libx11-6
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

system-packages:
	@if dpkg -s $(SYSTEM_PACKAGES) >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null; then \
		$(SUDO) apt-get update -q && \
		$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -q $(SYSTEM_PACKAGES); \
	else echo "make: install $(SYSTEM_PACKAGES) (or their equivalents) with your system's package manager"; exit 1; fi

test: lint system-packages
	$(BIN)/pytest

benchmark: install
	$(BIN)/python Benchmarks/benchmark.py
