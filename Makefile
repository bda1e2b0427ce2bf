# `make test`  : create .venv if missing, install bnorm[dev] under constraints.txt, lint, run the tests.
# `make test-gpu`: the same setup, then only the CUDA tests (pytest -m cuda; needs a CUDA build of torch).
# `make study` : create .venv if missing, install bnorm[study], run `bnorm study` with defaults.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
PIP     = $(BIN)/python -m pip
STAMP_DEV   = $(VENV)/.installed-dev
STAMP_STUDY = $(VENV)/.installed-study

.PHONY: test test-gpu study lint pytest bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP_DEV): $(BIN)/python pyproject.toml constraints.txt
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP_DEV) $(STAMP_STUDY)

$(STAMP_STUDY): $(BIN)/python pyproject.toml constraints.txt
	$(PIP) install -q --upgrade pip
	$(PIP) install -q -c constraints.txt -e '.[study]'
	touch $(STAMP_STUDY)

lint: $(STAMP_DEV)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy

pytest: $(STAMP_DEV)
	$(BIN)/python -m pytest -q -p no:cacheprovider --timeout=900

test: lint pytest

test-gpu: $(STAMP_DEV)
	$(BIN)/python -m pytest -q -p no:cacheprovider --timeout=1800 -m cuda

study: $(STAMP_STUDY)
	$(BIN)/bnorm study $(ARGS)

bench: $(STAMP_DEV)
	$(BIN)/bnorm bench $(ARGS)

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
