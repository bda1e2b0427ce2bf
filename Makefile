# `make test`  : create .venv if missing, install bnorm[dev] under constraints.txt, lint, run the tests
#                (then the kernel tests marked compiled_kernels again, with the kernels compiled).
# `make test-gpu`: the same setup, then only the CUDA tests (pytest -m cuda; needs a CUDA build of torch).
# `make lint`  : ruff, mypy and the documentation (docs/, API reference) built strictly into build/docs.
# `make study` : create .venv if missing, install bnorm[study], run `bnorm study` with defaults,
#                its runs spread over this machine's cores (--jobs $(JOBS); JOBS=1: one at a time).
# `make study-fashion` : the same study on the real Fashion-MNIST, read from the files of
#                Debian's package (sudo apt-get install dataset-fashion-mnist), no download.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
PIP     = $(BIN)/python -m pip
STAMP_DEV   = $(VENV)/.installed-dev
STAMP_STUDY = $(VENV)/.installed-study

FASHION_DIR = /usr/share/datasets/fashion-mnist
# Runs trained at once by `make study`: one worker per core (the numbers do not change).
JOBS ?= $(shell nproc 2>/dev/null || echo 1)

.PHONY: test test-gpu study study-fashion lint pytest bench clean

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
	$(BIN)/lint-imports
	PYTHONPATH=src $(BIN)/mkdocs build --strict --site-dir build/docs

# The suite runs the fused kernels' eager fallback (fast); the kernel tests marked
# compiled_kernels then run again with the kernels compiled, as users get them.
COMPILED_TESTS = tests/test_kernels.py tests/test_kernels_moments.py tests/test_variants.py

# The suite runs in one pytest worker per core (pytest-xdist; a test file stays on one
# worker): 2:15 instead of about 3:30 on a 2-core machine. PYTEST_WORKERS=0 runs it in
# this process.
PYTEST_WORKERS ?= auto
pytest: $(STAMP_DEV)
	$(BIN)/python -m pytest -q -p no:cacheprovider --timeout=900 -n $(PYTEST_WORKERS) --dist loadfile
	$(BIN)/python -m pytest -q -p no:cacheprovider --timeout=900 --compiled-kernels \
	  -m compiled_kernels $(COMPILED_TESTS)

test: lint pytest

test-gpu: $(STAMP_DEV)
	$(BIN)/python -m pytest -q -p no:cacheprovider --timeout=1800 -m cuda

study: $(STAMP_STUDY)
	$(BIN)/bnorm study --jobs $(JOBS) $(ARGS)

study-fashion: $(STAMP_STUDY)
	@test -f $(FASHION_DIR)/train-images-idx3-ubyte.gz || { \
	  echo "Fashion-MNIST is not in $(FASHION_DIR): sudo apt-get install dataset-fashion-mnist" \
	       "(or: make study ARGS='--dataset fashion-mnist --data-dir DIR')" >&2; exit 2; }
	$(BIN)/bnorm study --dataset fashion-mnist --jobs $(JOBS) $(ARGS)

bench: $(STAMP_DEV)
	$(BIN)/bnorm bench $(ARGS)

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .mypy_cache .ruff_cache
