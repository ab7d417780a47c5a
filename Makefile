# The two commands of the README: `make demo` and `make test`.
# The Python environments live outside the clone, keyed by a hash of the dependency list,
# so a second run on the same machine reuses them (and pip's cache makes a rebuild cheap):
#   venv-<hash>   runtime + dev tools, for the tests (`make env`)
#   demo-<hash>   runtime only, CPU torch where its index is reachable (`make demo-env`)
# Both commands start the local broker when it is not running and stop it at the end;
# KEEP_BROKER=1 keeps it running for the next run (then `make broker-stop`).
SHELL := /bin/bash
PYTHON ?= python3
VENV_ROOT ?= $(HOME)/.cache/stream-classifier
VENV := $(VENV_ROOT)/venv-$(shell $(PYTHON) .ci/deps-hash)
BIN := $(VENV)/bin
DEMO_VENV := $(VENV_ROOT)/demo-$(shell $(PYTHON) .ci/deps-hash --runtime)
KAFKA_LOCAL := deploy/kafka/kafka-local
WITH_BROKER := deploy/kafka/with-broker
export KAFKA_PORT ?= 9092
IMAGE ?= stream-classifier:latest
TEST_IMAGE ?= stream-classifier:test

.PHONY: env demo-env tools test unit lint typecheck pytest demo broker-start broker-stop broker-reset schemas \
	fixtures clean-env image test-image

env: $(VENV)/.complete
	@$(BIN)/pip install --quiet --no-deps --no-build-isolation -e . >$(VENV)/editable.log 2>&1 \
	  || (cat $(VENV)/editable.log; exit 1)

$(VENV)/.complete:
	@echo "==> building environment $(VENV) (about 6.3 GB: PyTorch with its CUDA libraries, dev tools)"
	@rm -rf $(VENV) && mkdir -p $(VENV_ROOT)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $@

demo-env: $(DEMO_VENV)/.complete
	@$(DEMO_VENV)/bin/pip install --quiet --no-deps --no-build-isolation -e . \
	  >$(DEMO_VENV)/editable.log 2>&1 || (cat $(DEMO_VENV)/editable.log; exit 1)

$(DEMO_VENV)/.complete:
	@echo "==> building the demo environment $(DEMO_VENV) (runtime only)"
	@rm -rf $(DEMO_VENV) && mkdir -p $(VENV_ROOT)
	.ci/demo-env $(DEMO_VENV) $(PYTHON)
	@touch $@

lint: env
	$(BIN)/ruff check stream_classifier tests benchmarks
	$(BIN)/ruff format --check stream_classifier tests benchmarks

typecheck: env
	$(BIN)/mypy

# Debian's prometheus package: promtool for the rule tests, prometheus for the real scrape.
tools:
	@if ! command -v promtool >/dev/null || ! command -v prometheus >/dev/null; then \
	  echo "==> installing Debian's prometheus package system-wide (apt-get, needs root):"; \
	  echo "    promtool unit-tests deploy/prometheus/rules, prometheus scrapes the service"; \
	  echo "    in tests/test_prometheus_scrape.py. Remove it later with: apt-get purge --autoremove prometheus"; \
	  apt-get update -qq && \
	  echo "    $$(apt-get install -s prometheus | grep -c '^Inst') packages: $$(apt-get install -s prometheus | sed -n 's/^Inst \([^ ]*\).*/\1/p' | tr '\n' ' ')" && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null; \
	fi

# The image test has its own target (see README, "The image"); plain pytest skips it.
pytest: env tools
	$(WITH_BROKER) env KAFKA_BOOTSTRAP=127.0.0.1:$(KAFKA_PORT) \
	  $(BIN)/pytest --ignore=tests/test_image.py $(PYTEST_ARGS)

test: lint typecheck pytest

# Fast feedback: no broker, no GPU; the simulation at 500 seeds (SIM_SEEDS to change).
unit: env
	SIM_SEEDS=$${SIM_SEEDS:-500} $(BIN)/pytest -q -m "not kafka and not gpu" $(PYTEST_ARGS)

broker-start:
	$(KAFKA_LOCAL) start

broker-stop:
	$(KAFKA_LOCAL) stop

# Stop the local broker and delete its topics and logs (its jars stay).
broker-reset:
	$(KAFKA_LOCAL) reset

demo: demo-env
	$(WITH_BROKER) $(DEMO_VENV)/bin/python examples/demo.py

# deploy/Dockerfile as users deploy it (the CUDA runtime base); where no image registry
# is reachable, on a local Debian base instead (deploy/build-image says which).
# BASE_IMAGE=local|NAME picks the base, TORCH_INDEX_URL a torch build.
image:
	deploy/build-image $(IMAGE)

# Build the image on the local Debian base and run it against the local broker.
test-image: env
	BASE_IMAGE=$${BASE_IMAGE:-local} deploy/build-image $(TEST_IMAGE)
	$(WITH_BROKER) env KAFKA_BOOTSTRAP=127.0.0.1:$(KAFKA_PORT) \
	  STREAM_CLASSIFIER_TEST_IMAGE=$(TEST_IMAGE) $(BIN)/pytest tests/test_image.py $(PYTEST_ARGS)

schemas: env
	$(BIN)/stream-classifier schemas schemas

fixtures:
	tests/fixtures/make_golden.sh

clean-env:
	rm -rf $(VENV) $(DEMO_VENV)
