# lepton-operator developer entry points. Every target installs what it needs first.
SHELL := /bin/bash
PY := .venv/bin/python
PYTEST := .venv/bin/pytest
CLUSTER_DIR ?= $(CURDIR)/.cluster
export LEPTON_CLUSTER_DIR := $(CLUSTER_DIR)

.PHONY: sync-crds setup tools python system-deps cluster-up cluster-down cluster-status run test test-unit \
        test-integration test-trainer test-e2e test-chart bench kind-up kind-down help

help:
	@echo "make run          set up, start the local control plane and run the operator on the quickstart example"
	@echo "make test         set up and run the whole test suite (what CI runs)"
	@echo "make cluster-up   start the local control plane (prints the KUBECONFIG to export)"
	@echo "make cluster-down stop every process of the local control plane"
	@echo "make kind-up      a kind cluster instead (needs Docker)"

system-deps:
	@bash hack/install-system-deps.sh

tools: system-deps
	@bash hack/build-tools.sh all

python:
	@bash hack/setup-python.sh

setup: tools python

cluster-up: tools
	@python3 hack/localcluster.py up --dir $(CLUSTER_DIR)

cluster-down:
	@python3 hack/localcluster.py down --dir $(CLUSTER_DIR)

cluster-status:
	@python3 hack/localcluster.py status --dir $(CLUSTER_DIR)

run: setup
	@bash hack/quickstart.sh

test: setup
	$(PYTEST) tests

test-unit: python
	$(PYTEST) -m unit tests

test-integration: setup
	$(PYTEST) -m integration tests

test-trainer: python
	$(PYTEST) -m trainer tests

test-e2e: setup
	$(PYTEST) -m e2e tests

test-chart: setup
	$(PYTEST) tests/chart

bench: setup
	$(PY) bench/cluster.py

kind-up:
	@command -v kind >/dev/null || go install sigs.k8s.io/kind@v0.29.0
	kind create cluster --name lepton --config hack/kind.yaml
	kubectl apply --server-side -f crds/

kind-down:
	kind delete cluster --name lepton

# Copy crds/ (the single source) into the chart; tests/chart checks they are equal.
sync-crds:
	rm -f charts/lepton-operator/crds/*.yaml
	cp crds/*.yaml charts/lepton-operator/crds/
