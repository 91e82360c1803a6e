# One command each:  `make run`  (set up + run the pipeline on the embedded default)
#                    `make test` (set up + run the test suite; this is what .ci/run calls)
# Setup is idempotent: a fresh machine needs only Python 3.11+ and pip.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The CPU wheel of torch is installed first on purpose: an unpinned torch pulls a multi-GB CUDA
# build. On a GPU machine: `make run TORCH="torch --index-url <your CUDA wheel index>"`.
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: setup run data test browsers clean-state

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

run: setup             ## full pipeline, embedded default (ARGS="--set train.method=qlora")
	$(BIN)/python -m flows.pipeline $(ARGS)

data: setup            ## data stage only
	$(BIN)/python -m flows.data $(ARGS)

test: setup            ## the whole test suite (what CI runs)
	HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 $(BIN)/python -m pytest $(PYTEST_ARGS)

clean-state:           ## forget all runs, caches and outputs of this project (keeps .venv)
	rm -rf outputs .prefect mlflow.db mlruns/[!.]*

# ---- Operations: local stack, deployments, browser tests (issue 5) -------------------------------
# The stack (Prefect server + UI :4200, a process worker, MLflow server + UI :5000) binds 127.0.0.1
# only and keeps every file inside the project: .stack/ (pids, logs), .prefect/, mlflow.db, mlruns/.
.PHONY: stack stack-down stack-status deploy

stack: setup           ## start Prefect (UI :4200) + worker + MLflow (UI :5000); returns when both answer
	$(BIN)/python -m flows.stack start

stack-down:            ## stop everything `make stack` started (by PID, whole process trees)
	$(BIN)/python -m flows.stack stop

stack-status:          ## what runs, where the logs are
	$(BIN)/python -m flows.stack status

deploy: setup          ## create/update the three deployments of prefect.yaml (idempotent)
	$(BIN)/python -m flows.stack deploy

# Headless Chromium for the real-browser tests: Debian's package (Playwright's own browser download
# does not work offline); Playwright itself comes from pip ([test] extra). Needs root or sudo.
CHROMIUM ?= /usr/bin/chromium
browsers:              ## install Debian chromium + chromium-driver if missing
	@if [ -x "$(CHROMIUM)" ]; then echo "chromium: $$($(CHROMIUM) --version 2>/dev/null)"; else \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q \
	    --no-install-recommends chromium chromium-driver fonts-wqy-zenhei; fi

test: browsers
