# Every target sets itself up: a fresh machine needs only Python 3.11 and make.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TYPECHECK := .build/typecheck

.PHONY: demo test check lint format typecheck proto proto-check bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

## demo: train, convert, serve a model from a local repository and answer a few requests
demo: $(STAMP)
	$(BIN)/edgewise demo $(DEMO_ARGS)

## test: the whole test suite (what CI runs)
test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)
	NUMBA_DISABLE_JIT=1 $(BIN)/python -m pytest tests/kernels -q -p no:randomly $(PYTEST_ARGS)

## check: lint, format, strict typing, generated-code freshness
check: lint typecheck proto-check

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# mypy cannot follow setuptools' editable finder, so it reads the package through a symlinked tree.
typecheck: $(STAMP)
	mkdir -p $(TYPECHECK)/edgewise
	ln -sfn ../../../runtime $(TYPECHECK)/edgewise/runtime
	ln -sfn ../../../kernels $(TYPECHECK)/edgewise/kernels
	MYPYPATH=$(TYPECHECK) $(BIN)/mypy -p edgewise.runtime -p edgewise.kernels

proto: $(STAMP)
	$(BIN)/python -m edgewise.runtime.grpc_api.codegen

proto-check: $(STAMP)
	$(BIN)/python -m edgewise.runtime.grpc_api.codegen --check

bench: $(STAMP)
	$(BIN)/python benchmarks/serving.py

clean:
	rm -rf $(VENV) .build .pytest_cache .mypy_cache .ruff_cache
