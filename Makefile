# onejump: make serve | test | setup | assets | fit | lint
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check
# torch 2.13.0 (CPU) lies on disk on these machines; elsewhere pip fetches it from PyPI.
WHEELS := $(if $(wildcard /opt/wheels),--find-links /opt/wheels,)

.PHONY: setup assets serve fit test test-fast lint bench

setup: $(VENV)/.installed
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q $(WHEELS) "torch==2.13.0"
	$(PIP) install -q $(WHEELS) -e ".[serve,dev]"
	touch $@

assets: setup
	$(VENV)/bin/onejump assets

serve: assets
	$(PY) -m service

fit: assets
	$(VENV)/bin/onejump fit --out-dir runs/smollm2

bench: assets
	$(PY) -m shortcuts.engine.bench

test: assets
	$(PY) -m pytest

test-fast: setup
	$(PY) -m pytest -m "not real"

lint: setup
	$(VENV)/bin/ruff check shortcuts service loadtest tests
	$(VENV)/bin/mypy service
