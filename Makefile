# diffusiond: make serve | demo | test | lint | proto | node | lint-deploy | proto-breaking | bench-serving | bench-onnx | bench-hires | eval | train-builtin
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A CPU build of PyTorch; set TORCH_SPEC for another (e.g. a CUDA build on a GPU machine).
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)
HOST ?= 127.0.0.1
PORT ?= 50051
ARGS ?=
NODE_DIR := clients/node

.PHONY: install serve demo test lint proto node lint-proto lint-deploy proto-breaking bench-serving bench-onnx bench-hires eval train-builtin clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e '.[dev]'
	rm -f $(VENV)/.installed-*
	touch $@

serve: install
	$(VENV)/bin/diffusiond serve --host $(HOST) --port $(PORT) $(ARGS)

demo: install
	$(VENV)/bin/diffusiond generate "a large red circle on a blue background, top left" --stream --server $(HOST):$(PORT) -o demo.png $(ARGS)

test: lint
	$(PY) -m pytest -q $(ARGS)

# ruff, and the package's import layers (pyproject.toml [tool.importlinter]).
lint: install
	$(VENV)/bin/ruff check diffusiond tests bench
	$(VENV)/bin/lint-imports

# The Node client's packages (pinned by package-lock.json), buf among them; its tests run in `make test`.
node: $(NODE_DIR)/node_modules/.package-lock.json

$(NODE_DIR)/node_modules/.package-lock.json: $(NODE_DIR)/package-lock.json $(NODE_DIR)/package.json
	cd $(NODE_DIR) && npm ci --no-audit --no-fund
	touch $@

lint-proto: node
	cd protos && ../$(NODE_DIR)/node_modules/.bin/buf lint

# Wire and JSON compatibility of the .proto files with the previous commit (AGAINST=main, a tag...).
AGAINST ?= HEAD~1
proto-breaking: node
	cd protos && ../$(NODE_DIR)/node_modules/.bin/buf breaking --against '../.git#ref=$(AGAINST),subdir=protos'

# hadolint on the Dockerfiles and kubernetes-validate on the manifests, offline (also in `make test`).
lint-deploy: install
	$(VENV)/bin/hadolint deploy/Dockerfile.cpu deploy/Dockerfile.cuda
	$(VENV)/bin/kubernetes-validate --strict -k 1.30.0 $(filter-out deploy/k8s/kustomization.yaml,$(wildcard deploy/k8s/*.yaml))

# Unbatched, static and continuous batching under open-loop Poisson arrivals through real gRPC
# clients (15-20 min on 2 cores; ARGS=--quick for a smoke run; results in BENCHMARKS.md).
bench-serving: install
	$(PY) bench/serving.py $(ARGS)

# ONNX Runtime vs eager vs diffusers on a CPU-sized SD model (minutes; results in BENCHMARKS.md).
bench-onnx: install
	$(PY) bench/onnx_cpu.py $(ARGS)

# A hi-res-fix request against plain ones on the built-in model: cost and look (results in BENCHMARKS.md).
bench-hires: install
	$(PY) bench/hires.py $(ARGS)

proto: install
	$(PY) -m diffusiond.api.codegen

# Score the built-in model (or ARGS="--model DIR ...") on the held-out prompts.
eval: install
	$(VENV)/bin/diffusiond eval $(ARGS)

# Retrain the built-in model from scratch (resumable: run again after an interruption).
train-builtin: install
	$(PY) -m diffusiond.training.train --work runs/builtin --out diffusiond/models/builtin_weights $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache build dist *.egg-info $(NODE_DIR)/node_modules $(NODE_DIR)/dist
