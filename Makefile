# Two entry points, both from a fresh clone on Debian with Python 3.11+, make and apt:
#   make run    install, then serve the demo on http://127.0.0.1:8080 (memory backend)
#   make test   install (with Mosquitto and Chromium from apt), then run the whole suite
# Everything lands in .venv: the commands are .venv/bin/forge-streaming, .venv/bin/pytest, ...

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
HOST   ?= 127.0.0.1
PORT   ?= 8080
# The demo plugin is opt-in (installing it changes nothing); this config turns it on for `make run`.
DEMO_CONFIG ?= contrib/demo/demo.yaml
# Every distribution in the workspace: the kernel, each plugin, each contrib package.
DISTS  := kernel $(patsubst %/pyproject.toml,%,$(wildcard plugins/*/pyproject.toml contrib/*/pyproject.toml))
SUDO   := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
APT    := DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get -y -q -o Dpkg::Use-Pty=0

.PHONY: run test install test-deps system-deps bench lint typecheck screenshot clean

$(BIN)/python:
	@echo "==> [1/3] creating the virtual environment $(VENV)"
	$(PYTHON) -m venv $(VENV) || { $(APT) update && $(APT) install python3-venv && $(PYTHON) -m venv $(VENV); }
	@echo "==> [2/3] upgrading pip in $(VENV)"
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed: $(BIN)/python $(wildcard kernel/pyproject.toml plugins/*/pyproject.toml contrib/*/pyproject.toml)
	@echo "==> [3/3] installing forge-streaming, its plugins and the contrib packages into $(VENV) (editable)"
	@echo "    the first time this downloads their dependencies: about two minutes"
	$(BIN)/pip install $(addprefix -e ,$(DISTS))
	touch $@
	@echo "==> installed: $(BIN)/forge-streaming (activate with: . $(BIN)/activate)"

install: $(VENV)/.installed

run: install
	@echo "==> serving the demo chat on http://$(HOST):$(PORT)/ with $(DEMO_CONFIG) (Ctrl-C stops it)"
	$(BIN)/forge-streaming serve --config $(DEMO_CONFIG) --host $(HOST) --port $(PORT)

system-deps:
	@command -v mosquitto >/dev/null && command -v chromium >/dev/null || \
	  { echo "==> installing Mosquitto and Chromium from apt (for the tests)"; \
	    $(APT) update && $(APT) install --no-install-recommends mosquitto mosquitto-clients chromium fonts-dejavu-core; }

$(VENV)/.test-deps: $(VENV)/.installed pyproject.toml
	@echo "==> installing the test tools (pytest, playwright, mypy, ruff, ...) into $(VENV)"
	$(BIN)/pip install --group test
	touch $@

test-deps: system-deps $(VENV)/.test-deps

test: test-deps
	$(BIN)/python -m pytest $(PYTEST_ARGS)

typecheck: test-deps
	$(BIN)/mypy $(addsuffix /src,$(DISTS)) conftest.py
	for tests in tests $(wildcard plugins/*/tests contrib/*/tests); do $(BIN)/mypy $$tests || exit 1; done

lint: test-deps
	$(BIN)/ruff check kernel plugins contrib tests conftest.py

# Refresh contrib/demo/screenshot.png (the README's picture); `make test` never rewrites it.
screenshot: test-deps
	FORGE_STREAMING_UPDATE_SCREENSHOT=1 $(BIN)/python -m pytest tests/test_browser_demo.py -k webtransport_page_joins

bench: test-deps
	$(BIN)/pip install -q -e 'contrib/bench[peers]'
	$(BIN)/python -m forge_streaming_bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV)
