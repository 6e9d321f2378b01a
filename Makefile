# The stack's verbs. Each target is a thin wrapper over docker compose or a script in the
# repo; `make help` lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help

COMPOSE ?= docker compose
ENV_FILE := .env
# Read only what make itself needs from .env; compose reads the rest directly.
env_value = $(shell ENV_FILE=$(ENV_FILE) scripts/env-value.sh $(1))
COMPOSE_FILES = $(or $(call env_value,COMPOSE_FILE),compose.yaml)
GPU ?= 0
# MONITORING=1: `make up` also starts Prometheus (the compose profile `monitoring`).
MONITORING ?= 0
comma := ,
ifeq ($(MONITORING),1)
  export COMPOSE_PROFILES := $(if $(COMPOSE_PROFILES),$(COMPOSE_PROFILES)$(comma))monitoring
endif
# RETENTION=1: `make up` also starts `make gc` on a schedule (the compose profile `retention`).
RETENTION ?= 0
ifeq ($(RETENTION),1)
  export COMPOSE_PROFILES := $(if $(COMPOSE_PROFILES),$(COMPOSE_PROFILES)$(comma))retention
endif
ifeq ($(GPU),1)
  TRAIN_COMPOSE_FILES = $(COMPOSE_FILES):compose.gpu.yaml
else
  TRAIN_COMPOSE_FILES = $(COMPOSE_FILES)
endif
PYTHON ?= python3
VENV := .venv
VENV_STAMP := $(VENV)/.installed
ARGS ?=
# Tagged on every training run; baked into the trainer image at build time.
export GIT_COMMIT ?= $(shell git rev-parse --short HEAD 2>/dev/null)

.PHONY: help env up down build offline-images train sweep predict logs ps models promote sign rollback \
        canary shadow abort-rollout drift gc \
        test test-unit test-integration lint bench bench-trainer bench-serving bench-direct-path bench-switch \
        bench-tracking bench-cold-start bench-load bench-ddp backup restore clean doctor lock k8s-check k8s-e2e \
        monitoring-check

help: ## List the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  \033[1m%-18s\033[0m %s\n", $$1, $$2}'

env: ## Write .env with fresh random secrets (or add what a newer .env.example introduced)
	@scripts/env.sh $(ENV_FILE)

offline-images: env ## Build local stand-ins for every image compose would pull (no registry needed)
	@. scripts/dotenv.sh && docker/offline/build-images.sh

build: env ## Build the stack's images (each once; later builds reuse the cache)
	@if [[ "$(COMPOSE_FILES)" == *compose.offline.yaml* ]]; then . scripts/dotenv.sh && docker/offline/build-images.sh; fi
	@$(COMPOSE) --profile train build

up: build ## Build, start detached, wait until healthy and the accounts exist, print the URLs
	@scripts/check-bind-address.sh $(ENV_FILE)
	@# A serving container whose image or settings changed is replaced beside the old one.
	@scripts/replace-serving.sh $(COMPOSE)
	@$(COMPOSE) up -d --wait --wait-timeout 300 || { $(COMPOSE) ps -a; $(COMPOSE) logs --tail 40; \
	  echo "make up: a service did not become healthy; its logs are above (make logs SERVICE=<name> for more, make doctor to check this machine)"; exit 1; }
	@scripts/wait-for-accounts.sh $(COMPOSE)
	@scripts/print-urls.sh

down: ## Stop the stack; every run, model and artifact is kept
	@$(COMPOSE) --profile train --profile monitoring --profile retention down

train: env ## Train, log, register and maybe promote (ARGS="--epochs 5", NPROC=4 processes, GPU=1 for the GPU)
	@COMPOSE_FILE=$(TRAIN_COMPOSE_FILES) $(COMPOSE) run --rm trainer $(if $(NPROC),--nproc $(NPROC)) $(ARGS)

sweep: env ## Hyperparameter sweep: make sweep TRIALS=20 [PARALLEL=2] [STUDY=name] [ARGS="--epochs 3"]
	@test -n "$(TRIALS)" || { echo "usage: make sweep TRIALS=<n> [PARALLEL=<workers>] [STUDY=<name>] [ARGS=...]"; exit 2; }
	@# PARALLEL workers, each its own container, pull trials from one study until TRIALS are done.
	@# The stack (and with it the study's database) is brought up once, before the workers.
	@$(COMPOSE) up -d --wait --wait-timeout 300 db-init mlflow-init >/dev/null
	@pids=(); for i in $$(seq 1 $(or $(PARALLEL),1)); do \
	  COMPOSE_FILE=$(TRAIN_COMPOSE_FILES) $(COMPOSE) run --rm -T --no-deps sweep --trials $(TRIALS) \
	    $(if $(STUDY),--study $(STUDY)) $(ARGS) & pids+=($$!); \
	done; status=0; for pid in "$${pids[@]}"; do wait "$$pid" || status=1; done; exit $$status

predict: ## Send real test images to the serving endpoint and print the predicted classes
	@$(COMPOSE) run --rm --no-deps -T --entrypoint python trainer -m trainer.sample --count 5 \
	  | scripts/predict.py --url "http://127.0.0.1:$(or $(call env_value,SERVING_PORT),5001)/invocations"

models: ## Table of registered versions: run, eval accuracy, created, alias holder
	@$(COMPOSE) run --rm --no-deps -T --entrypoint python trainer -m trainer.registry_cli list

promote: ## Point the alias at a version: make promote VERSION=3
	@test -n "$(VERSION)" || { echo "usage: make promote VERSION=<n>"; exit 2; }
	@$(COMPOSE) run --rm --no-deps -T --entrypoint python trainer -m trainer.registry_cli promote $(VERSION)

sign: ## Sign a version logged before models were signed, vouching for its files: make sign VERSION=3
	@test -n "$(VERSION)" || { echo "usage: make sign VERSION=<n>"; exit 2; }
	@$(COMPOSE) run --rm --no-deps -T --entrypoint python trainer -m trainer.registry_cli sign $(VERSION)

canary: ## Answer a share of requests with a version beside production: make canary VERSION=4 [PERCENT=10]
	@test -n "$(VERSION)" || { echo "usage: make canary VERSION=<n> [PERCENT=10]"; exit 2; }
	@$(COMPOSE) run --rm --no-deps -T --entrypoint python trainer -m trainer.registry_cli canary $(VERSION) \
	  --percent $(or $(PERCENT),10)

shadow: ## Also score requests with a version, off the request path: make shadow VERSION=4 [PERCENT=100]
	@test -n "$(VERSION)" || { echo "usage: make shadow VERSION=<n> [PERCENT=100]"; exit 2; }
	@$(COMPOSE) run --rm --no-deps -T --entrypoint python trainer -m trainer.registry_cli shadow $(VERSION) \
	  --percent $(or $(PERCENT),100)

abort-rollout: ## End a canary or shadow rollout: production answers every request again
	@$(COMPOSE) run --rm --no-deps -T --entrypoint python trainer -m trainer.registry_cli abort

rollback: ## Move the alias back to the version that held it before
	@$(COMPOSE) run --rm --no-deps -T --entrypoint python trainer -m trainer.registry_cli rollback

drift: ## Drift report of the prediction log: make drift SINCE=2026-12-01 [UNTIL=2026-12-07] [VERSION=n]
	@test -n "$(SINCE)" || { echo "usage: make drift SINCE=YYYY-MM-DD [UNTIL=YYYY-MM-DD] [VERSION=<n>]"; exit 2; }
	@$(COMPOSE) run --rm -T drift --since $(SINCE) $(if $(UNTIL),--until $(UNTIL)) $(if $(VERSION),--version $(VERSION))

gc: ## Remove deleted runs and experiments for good; ARGS="--keep-checkpoints 2 --older-than-days 7 --dry-run"
	@$(COMPOSE) run --rm -T gc $(ARGS)

logs: ## Follow the logs of every service (SERVICE=mlflow for one)
	@$(COMPOSE) logs -f --tail 100 $(SERVICE)

ps: ## Show the services and their health
	@$(COMPOSE) ps -a

$(VENV_STAMP): pyproject.toml docker/requirements/constraints.txt docker/requirements/*.txt
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	@$(VENV)/bin/pip install -q --disable-pip-version-check -r docker/requirements/test.txt -c docker/requirements/constraints.txt
	@# The project's own packages, editable: tests and benchmarks import the working tree.
	@$(VENV)/bin/pip install -q --disable-pip-version-check --no-deps -e .
	@touch $@

test: lint k8s-check monitoring-check test-unit test-integration ## Run every test (lint, Kubernetes manifests, alert rules, unit, then the whole stack in Docker)

lint: $(VENV_STAMP) ## Check the Python code with ruff (configured in pyproject.toml)
	@$(VENV)/bin/ruff check .

k8s-check: ## Render, validate (Kubernetes 1.37) and checkov deploy/kubernetes; installs its tools first
	@scripts/k8s-tools.sh
	@scripts/k8s-check.sh

monitoring-check: ## Check the Prometheus config and test the alert rules with promtool (fetched first)
	@scripts/monitoring-tools.sh
	@monitoring/promtool-test.sh promtool

k8s-e2e: ## The stack on a throwaway kind cluster: deploy, train on generated data, predict (needs kind and its node image)
	@scripts/k8s-e2e.sh

test-unit: $(VENV_STAMP) ## Unit tests: no Docker, seconds
	@$(VENV)/bin/python -m pytest -q tests/unit

test-integration: $(VENV_STAMP) ## Integration tests: build the images, bring up a private stack, exercise it
	@$(VENV)/bin/python -m pytest -q --durations=15 tests/integration

bench-trainer: $(VENV_STAMP) ## Benchmark the trainer against the MLflow quickstart loop
	@$(VENV)/bin/python -m bench.trainer_bench $(ARGS)

bench-serving: $(VENV_STAMP) ## Benchmark serving against plain mlflow models serve (local, no Docker)
	@$(VENV)/bin/python -m bench.serving_bench $(ARGS)

bench-direct-path: $(VENV_STAMP) ## Benchmark serving's direct body path against MLflow's scoring app (local)
	@$(VENV)/bin/python -m bench.direct_path_bench $(ARGS)

bench-switch: $(VENV_STAMP) ## Benchmark an alias move: time to the new version, failed requests
	@$(VENV)/bin/python -m bench.alias_switch_bench $(ARGS)

bench-tracking: $(VENV_STAMP) ## Benchmark the tracking server against plain mlflow server (Docker, built images)
	@$(VENV)/bin/python -m bench.tracking_bench $(ARGS)

bench-cold-start: $(VENV_STAMP) ## Benchmark make up to healthy, and a trained model to first prediction (Docker)
	@$(VENV)/bin/python -m bench.cold_start_bench $(ARGS)

bench-load: $(VENV_STAMP) ## Benchmark serving under 1, 10 and 50 clients (a private stack; ARGS="--url ..." for a running one)
	@$(VENV)/bin/python -m bench.load_bench $(ARGS)

bench-ddp: $(VENV_STAMP) ## Benchmark data-parallel training: images/s at 1 and 2 processes (CPU, gloo)
	@$(VENV)/bin/python -m bench.ddp_bench $(ARGS)

bench: bench-trainer bench-serving bench-direct-path bench-switch bench-tracking bench-cold-start bench-load bench-ddp ## Run every benchmark; results land in bench/results/

doctor: ## Check Docker, Compose v2, free disk, ports, and the NVIDIA runtime with GPU=1
	@GPU=$(GPU) scripts/doctor.sh

lock: $(VENV_STAMP) ## Re-pin every Python package (after editing docker/requirements/*.txt)
	@scripts/lock.sh

backup: ## Archive the databases and artifacts of the running stack into backups/ (BACKUP_DIR=...)
	@scripts/backup.sh

restore: ## Replace all data with a backup: make restore FILE=backups/<name>.tar.gz (asks; CONFIRM=yes)
	@test -n "$(FILE)" || { echo "usage: make restore FILE=backups/<archive>.tar.gz"; exit 2; }
	@scripts/restore.sh "$(FILE)"

clean: ## Stop the stack and DELETE all its data (asks first; CONFIRM=yes skips the question)
	@scripts/clean.sh
