# Every target sets itself up: a fresh machine needs only Python 3.11 and make.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TYPECHECK := .build/typecheck
# The real MLflow server of the store tests lives in an environment of its own (tests/mlflow_server.py).
MLFLOW_VENV ?= .venv-mlflow
MLFLOW_STAMP := $(MLFLOW_VENV)/.installed
# The Feast of the feature-lookup tests lives in an environment of its own (tests/feast_repo.py).
FEAST_VENV ?= .venv-feast
FEAST_STAMP := $(FEAST_VENV)/.installed
# The ahead-of-time compiled kernels (kernels/_native.py), rebuilt when a kernel source changes.
NATIVE_STAMP := $(VENV)/.native-kernels

.PHONY: demo loop test native mlflow-venv feast-venv check lint imports format typecheck proto proto-check lock lock-check bench image podman clean

# The dev venv installs exactly the hash-pinned lock (requirements/dev.txt: the dev extra), then
# edgewise itself without resolving anything again.
$(STAMP): pyproject.toml requirements/dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --require-hashes -r requirements/dev.txt
	$(BIN)/pip install --quiet --no-deps -e .
	touch $(STAMP)

## lock: recompile requirements/serve.txt and dev.txt from pyproject.toml (uv, hash-pinned, for
## linux x86_64 and aarch64; pins that still fit stay). LOCK_ARGS="--upgrade-package NAME" moves one.
lock: $(STAMP)
	$(BIN)/python requirements/lock.py compile $(LOCK_ARGS)

## lock-check: the lockfiles were compiled from pyproject's dependencies as they are now (offline)
lock-check:
	$(PYTHON) requirements/lock.py check

# A native build that fails says so, with its reason (the line above it). Outside CI the server
# then serves without it and the tests that need it are skipped with that reason; under CI (CI
# set, as CI runners set it) the target fails, as those tests would (tests/prerequisites.py).
native_failed = { echo "*** $(1) FAILED (see above): $(2)" >&2; \
	case "$$CI" in ""|0|false|no) ;; *) echo "*** CI: the native builds must succeed" >&2; exit 1;; esac; }

## native: compile the kernels a server runs ahead of time (no numba nor LLVM when serving),
## the native gRPC front end (serve --front-end native), installing libgrpc++-dev where it can,
## and the onnxruntime C API module (headers fetched with npm, pinned, cached in .build/)
native: $(NATIVE_STAMP)
$(NATIVE_STAMP): $(STAMP) $(wildcard kernels/*.py) runtime/frontends/native/_front.cc \
		runtime/frontends/native/_ort.cc runtime/frontends/native/ort_headers.py \
		runtime/frontends/native/ort_shared.h
	$(BIN)/python -m edgewise.kernels.native_build \
		|| $(call native_failed,the native kernels build,numba's JIT serves every kernel instead)
	@pkg-config --exists grpc++ 2>/dev/null || [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null \
		|| apt-get install -y -q libgrpc++-dev >/dev/null 2>&1 \
		|| { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q libgrpc++-dev >/dev/null 2>&1; } \
		|| echo "libgrpc++-dev could not be installed"
	$(BIN)/python -m edgewise.runtime.frontends.native.build \
		|| $(call native_failed,the native front end build,the server serves with grpcio alone)
	$(BIN)/python -m edgewise.runtime.frontends.native.build --ort \
		|| $(call native_failed,the onnxruntime C API module build (npm fetches its headers),its tests skip)
	touch $(NATIVE_STAMP)

## mlflow-venv: the MLflow server the store tests start (pyproject's mlflow-server extra)
mlflow-venv: $(MLFLOW_STAMP)
$(MLFLOW_STAMP): pyproject.toml | $(STAMP)
	EDGEWISE_MLFLOW_VENV=$(MLFLOW_VENV) $(BIN)/python -m tests.mlflow_server install
	touch $(MLFLOW_STAMP)

## feast-venv: Feast 0.67 for the feature-lookup tests (tests/feast_repo.py)
feast-venv: $(FEAST_STAMP)
$(FEAST_STAMP): tests/feast_repo.py | $(STAMP)
	EDGEWISE_FEAST_VENV=$(FEAST_VENV) $(BIN)/python -m tests.feast_repo install
	touch $(FEAST_STAMP)

## demo: train, convert, serve a model from a local repository and answer a few requests
demo: $(STAMP) $(NATIVE_STAMP)
	$(BIN)/edgewise demo $(DEMO_ARGS)

## loop: the MLOps loop end to end on a temporary workspace (docs/loop.md)
loop: $(STAMP) $(NATIVE_STAMP)
	$(BIN)/python docs/examples/loop/loop.py $(LOOP_ARGS)

## test: the whole test suite (what CI runs). promtool (Debian's prometheus package) checks the
## alert rules and the dashboard's queries (tests/containers/test_observability.py); redis-server
## is the Redis online store of the feature-lookup tests. The suite runs on every core (pytest-xdist,
## PYTEST_WORKERS of them; a module's tests, and tests/kernels, on one worker: tests/conftest.py);
## the tests marked serial (they measure CPU, memory, threads or timing under load) run after it,
## alone. PYTEST_WORKERS=0 runs the first pass in one process.
PYTEST_WORKERS ?= logical
# pytest exits 5 when a selection holds no test (PYTEST_ARGS naming a folder without serial tests).
pytest_or_none = $(1); rc=$$?; [ $$rc = 0 ] || [ $$rc = 5 ]
test: $(STAMP) $(NATIVE_STAMP) $(MLFLOW_STAMP) $(FEAST_STAMP)
	@command -v promtool >/dev/null || [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null \
		|| apt-get install -y -q --no-install-recommends prometheus >/dev/null 2>&1 \
		|| { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends prometheus >/dev/null 2>&1; } \
		|| echo "promtool could not be installed"
	@command -v redis-server >/dev/null || [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null \
		|| apt-get install -y -q --no-install-recommends redis-server >/dev/null 2>&1 \
		|| { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends redis-server >/dev/null 2>&1; } \
		|| echo "redis-server could not be installed"
	$(call pytest_or_none,$(BIN)/python -m pytest -m "not serial" -n $(PYTEST_WORKERS) --dist loadgroup $(PYTEST_ARGS))
	$(call pytest_or_none,$(BIN)/python -m pytest -m serial $(PYTEST_ARGS))
	NUMBA_DISABLE_JIT=1 $(BIN)/python -m pytest tests/kernels -q -p no:randomly $(PYTEST_ARGS)

## check: lint, format, strict typing, the layer contract, generated-code and lockfile freshness
check: lint typecheck imports proto-check lock-check

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# The layers of runtime/ and the kernels' own imports ([tool.importlinter] in pyproject.toml).
imports: $(STAMP)
	$(BIN)/lint-imports

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
	$(BIN)/python -m edgewise.runtime.proto.codegen

proto-check: $(STAMP)
	$(BIN)/python -m edgewise.runtime.proto.codegen --check

bench: $(STAMP) $(NATIVE_STAMP)
	$(BIN)/python benchmarks/serving.py

## image: the container image from wheels built here (ENGINE=docker, BASE_IMAGE=..., OFFLINE=1)
IMAGE ?= edgewise:latest
image: $(STAMP)
	PIP=$(BIN)/pip containers/build.sh $(IMAGE)

## podman: what the container test needs on a Debian host (root): podman, runc, mmdebstrap
podman:
	containers/install-podman.sh

clean:
	rm -rf $(VENV) $(MLFLOW_VENV) $(FEAST_VENV) .build .pytest_cache .mypy_cache .ruff_cache
	rm -f kernels/_native_kernels* runtime/frontends/native/_front*.so
