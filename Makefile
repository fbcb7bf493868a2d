# pacs-bridge: two commands set everything up.
#   make serve   virtual environment + install + `pacs-bridge serve` on embedded defaults
#   make test    Debian test tools + virtual environment with every extra + the whole test suite
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip

.PHONY: serve test install install-dev system-packages lint typecheck bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(PIP) install --quiet -e '.[cpu]'
	touch $@

$(VENV)/.installed-dev: $(BIN)/python pyproject.toml
	$(PIP) install --quiet -e '.[cpu,dev,train,postgres]'
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed

install-dev: $(VENV)/.installed-dev

serve: install
	$(BIN)/pacs-bridge serve $(ARGS)

system-packages:
	./scripts/system-packages.sh

test: system-packages install-dev
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: install-dev
	$(BIN)/ruff check pacs_bridge trainer tests bench scripts
	$(BIN)/ruff format --check pacs_bridge trainer tests bench scripts
	$(BIN)/mypy

bench: install-dev
	$(BIN)/python bench/bench_ingest.py
	$(BIN)/python bench/bench_inference.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
