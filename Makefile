# lepton-operator developer entry points. Every target installs what it needs first.
SHELL := /bin/bash
PY := .venv/bin/python
PYTEST := .venv/bin/pytest
CLUSTER_DIR ?= $(CURDIR)/.cluster
export LEPTON_CLUSTER_DIR := $(CLUSTER_DIR)

.PHONY: sync-crds setup tools python system-deps images images-if-possible push cluster-up cluster-down cluster-status run test \
        test-unit test-integration test-trainer test-e2e test-chart test-real bench bench-realnode \
        kserve-venv bench-serving llama-cpp-venv bench-llm kind-up kind-down help

help:
	@echo "make run          set up, start the local control plane and run the operator on the quickstart example"
	@echo "make test         set up and run the whole test suite (what CI runs)"
	@echo "make images       build the operator and trainer images with buildah (cached by content hash)"
	@echo "make images push REGISTRY=registry.example.com/team   push them to your registry"
	@echo "make cluster-up   start the local control plane (prints the KUBECONFIG to export)"
	@echo "make cluster-down stop every process of the local control plane"
	@echo "make kind-up      a kind cluster instead (needs Docker)"

system-deps:
	@bash hack/install-system-deps.sh

tools: system-deps
	@bash hack/build-tools.sh all

python:
	@bash hack/setup-python.sh

# The Go builds, the virtualenv and the images build side by side (the longest first-run steps).
setup: system-deps
	@$(MAKE) --no-print-directory -j3 tools python images-if-possible

images: system-deps
	@python3 hack/images.py build

# The images the real node runs, built and loaded into its image store, on machines that
# can run it (else a note, not an error).
images-if-possible:
	@reason=$$(python3 -c 'import sys; sys.path.insert(0, "hack"); import realnode; print(realnode.unsupported_reason() or "")'); \
	if [ -n "$$reason" ]; then echo "[images] not built: no real node here ($$reason)"; \
	else python3 hack/images.py preload; fi

push: images
	@test -n "$(REGISTRY)" || { echo "usage: make images push REGISTRY=registry.example.com/team [TAG=v]" >&2; exit 1; }
	@python3 hack/images.py push --registry "$(REGISTRY)" $(if $(TAG),--tag $(TAG))

cluster-up: tools
	@python3 hack/localcluster.py up --dir $(CLUSTER_DIR)

cluster-down:
	@python3 hack/localcluster.py down --dir $(CLUSTER_DIR)

cluster-status:
	@python3 hack/localcluster.py status --dir $(CLUSTER_DIR)

run: setup
	@bash hack/quickstart.sh

# Test modules run side by side: the suite mostly waits on clusters and processes.
TEST_WORKERS ?= $(shell n=$$(nproc); [ $$n -gt 4 ] && n=4; [ $$n -lt 2 ] && n=2; echo $$n)
test: setup
	$(PYTEST) -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder tests

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

test-real: setup
	$(PYTEST) -m real tests/real

bench: setup
	$(PY) bench/cluster.py

bench-realnode: setup
	$(PY) bench/realnode.py

# KServe's model server in a virtualenv of its own over .venv (bench/serving.py compares against it).
kserve-venv: python
	@bash hack/kserve-venv.sh >/dev/null

bench-serving: kserve-venv
	$(PY) bench/serving.py --protocols

# llama-cpp-python's OpenAI server in a virtualenv of its own (bench/llm.py compares against it).
llama-cpp-venv: python
	@bash hack/llama-cpp-venv.sh >/dev/null

bench-llm: setup llama-cpp-venv
	$(PY) bench/llm.py

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
