# One command each:  `make run`  (set up + run the pipeline on the embedded default)
#                    `make test` (set up + run the test suite; this is what .ci/run calls)
# Setup is idempotent: a fresh machine needs only Python 3.11+ and pip. It installs the exact
# versions of requirements.lock (every package, transitive ones included) and resolves nothing.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# GPU=1: the GPU lock (the same pins + torchao for the fast int4 model)
LOCK   := $(if $(GPU),requirements-gpu.lock,requirements.lock)
# The CPU wheel of torch is pinned here, not in the lock: an unpinned torch pulls a multi-GB CUDA
# build. On a GPU machine: `make run TORCH="torch==2.13.0 --index-url <your CUDA wheel index>"`.
TORCH_PIN := torch==2.13.0
TORCH  ?= $(TORCH_PIN)
STAMP  := $(VENV)/.installed
HF_OFFLINE := HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1

.PHONY: setup run data serve test test-fast test-latest lock browsers clean-state

$(STAMP): $(LOCK) pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q --no-deps -r $(LOCK)
	$(BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	$(BIN)/python -m pip check
	touch $(STAMP)

setup: $(STAMP)

# ---- The lock (docs/design.md "Dependencies") -----------------------------------------------------------
# `make lock` re-resolves pyproject.toml's ranges to the newest releases, for Python 3.11 on
# Linux x86-64, with uv (itself locked). torch stays at TORCH_PIN: its CPU wheel is looked up in
# TORCH_WHEELS so that the lock holds torch's CPU dependencies, not a CUDA build's.
TORCH_WHEELS ?= $(if $(wildcard /opt/wheels/torch-*),/opt/wheels,https://download.pytorch.org/whl/torch/)
lock:                  ## regenerate requirements.lock (then `make test` and commit both)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	test -x $(BIN)/uv || $(BIN)/python -m pip install -q "$$(grep -sE '^uv==' $(LOCK) || echo uv)"
	echo "$(TORCH_PIN)" > $(VENV)/torch-pin.txt
	$(BIN)/uv pip compile pyproject.toml --extra test --extra dev --upgrade --quiet \
	  --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
	  --find-links $(TORCH_WHEELS) --constraint $(VENV)/torch-pin.txt --no-emit-package torch \
	  --custom-compile-command "make lock" -o requirements.lock
	$(BIN)/uv pip compile pyproject.toml --extra test --extra dev --extra gpu --quiet \
	  --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
	  --find-links $(TORCH_WHEELS) --constraint $(VENV)/torch-pin.txt --no-emit-package torch \
	  --constraint requirements.lock --custom-compile-command "make lock" \
	  -o requirements-gpu.lock

# An early warning for the next upstream release (not part of CI): a separate venv with the
# newest versions pyproject.toml allows, the fast tests, and what differs from the lock.
LATEST ?= .venv-latest
test-latest:           ## newest allowed versions + the fast tests; run before every `make lock`
	test -x $(LATEST)/bin/python || $(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install -q --upgrade pip
	$(LATEST)/bin/python -m pip install -q $(TORCH)
	echo "$(TORCH_PIN)" > $(LATEST)/torch-pin.txt    # torch stays the tested CPU build
	$(LATEST)/bin/python -m pip install -q --upgrade --upgrade-strategy eager \
	  -c $(LATEST)/torch-pin.txt -e ".[test]"
	$(LATEST)/bin/python -m pip check
	$(LATEST)/bin/python .ci/lock_diff.py $(LOCK)
	$(HF_OFFLINE) $(LATEST)/bin/python -m pytest $(FAST) $(PYTEST_ARGS)

run: setup             ## full pipeline, embedded default (ARGS="--set train.method=qlora")
	$(BIN)/python -m flows.pipeline $(ARGS)

data: setup            ## data stage only
	$(BIN)/python -m flows.data $(ARGS)

# pytest-xdist: WORKERS processes, each test module whole on one of them (its module fixtures --
# a pipeline run, a stack -- are built once), the long modules first (tests/conftest.py);
# WORKERS=0 runs in this process (e.g. for pdb)
WORKERS ?= 2
XDIST  := $(if $(filter 0,$(WORKERS)),,-n $(WORKERS) --dist loadfile --no-loadscope-reorder)
test: setup            ## the whole test suite (what CI runs)
	$(HF_OFFLINE) $(BIN)/python -m pytest $(XDIST) $(PYTEST_ARGS)

# the inner loop: no servers, no browser, no training beyond tiny models (README "Tests")
FAST := -m "not slow and not browser and not server"
test-fast: setup       ## the fast tests only
	$(HF_OFFLINE) $(BIN)/python -m pytest $(FAST) $(XDIST) $(PYTEST_ARGS)

MODEL ?= plant-care-chat
serve: setup           ## serve MODEL@champion with MLflow's model server on 127.0.0.1:5001; follows promotions
	$(HF_OFFLINE) $(BIN)/python -m flows.serve --model $(MODEL) $(ARGS)

clean-state:           ## forget all runs, caches and outputs of this project (keeps .venv)
	rm -rf outputs .prefect .cache .locks mlflow.db mlruns/[!.]*

# ---- Operations: local stack, deployments, browser tests (README "Operations") ------------------
# The stack (Prefect server + UI :4200, a process worker, MLflow server + UI :5000) binds 127.0.0.1
# only and keeps every file inside the project: .stack/ (pids, logs), .prefect/, mlflow.db, mlruns/.
.PHONY: stack stack-down stack-status deploy

stack: setup           ## start Prefect (UI :4200) + worker + MLflow (UI :5000); returns when both answer
	$(BIN)/python -m flows.ops.stack start

stack-down:            ## stop everything `make stack` started (by PID, whole process trees)
	$(BIN)/python -m flows.ops.stack stop

stack-status:          ## what runs, where the logs are
	$(BIN)/python -m flows.ops.stack status

deploy: setup          ## create/update the three deployments of prefect.yaml (idempotent)
	$(BIN)/python -m flows.ops.stack deploy

# Headless Chromium for the real-browser tests: Debian's package (Playwright's own browser download
# does not work offline); Playwright itself comes from pip ([test] extra). Needs root or sudo.
CHROMIUM ?= /usr/bin/chromium
browsers:              ## install Debian chromium + chromium-driver if missing
	@if [ -x "$(CHROMIUM)" ]; then echo "chromium: $$($(CHROMIUM) --version 2>/dev/null)"; else \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q \
	    --no-install-recommends chromium chromium-driver fonts-wqy-zenhei; fi

test: browsers
