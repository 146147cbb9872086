# Two entry points, both from a fresh clone on Debian with Python 3.11+, make and apt:
#   make run    install, then serve the demo on http://127.0.0.1:8080 (memory backend)
#   make test   install (with Mosquitto and Chromium from apt), then run the whole suite

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
HOST   ?= 127.0.0.1
PORT   ?= 8080
# Every distribution in the workspace: the kernel, each plugin, each contrib package.
DISTS  := kernel $(patsubst %/pyproject.toml,%,$(wildcard plugins/*/pyproject.toml contrib/*/pyproject.toml))
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT    := DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get -y -q -o Dpkg::Use-Pty=0

.PHONY: run test install test-deps system-deps bench lint typecheck clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV) || { $(APT) update && $(APT) install python3-venv && $(PYTHON) -m venv $(VENV); }
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python $(wildcard kernel/pyproject.toml plugins/*/pyproject.toml contrib/*/pyproject.toml)
	$(BIN)/pip install -q $(addprefix -e ,$(DISTS))
	touch $@

install: $(VENV)/.installed

run: install
	$(BIN)/forge-streaming serve --host $(HOST) --port $(PORT)

system-deps:
	@command -v mosquitto >/dev/null && command -v chromium >/dev/null || \
	  { $(APT) update && $(APT) install --no-install-recommends mosquitto mosquitto-clients chromium fonts-dejavu-core; }

$(VENV)/.test-deps: $(VENV)/.installed pyproject.toml
	$(BIN)/pip install -q --group test
	touch $@

test-deps: system-deps $(VENV)/.test-deps

test: test-deps
	$(BIN)/python -m pytest $(PYTEST_ARGS)

typecheck: test-deps
	$(BIN)/mypy $(addsuffix /src,$(DISTS)) conftest.py
	for tests in tests $(wildcard plugins/*/tests contrib/*/tests); do $(BIN)/mypy $$tests || exit 1; done

lint: test-deps
	$(BIN)/ruff check kernel plugins contrib tests conftest.py

bench: test-deps
	$(BIN)/pip install -q -e 'contrib/bench[peers]'
	$(BIN)/python -m forge_streaming_bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV)
