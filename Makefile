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
