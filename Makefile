# The two commands of the README: `make demo` and `make test`.
# The Python environment lives outside the clone, keyed by a hash of the dependency list,
# so a second run on the same machine reuses it (and pip's cache makes a rebuild cheap).
SHELL := /bin/bash
PYTHON ?= python3
VENV_ROOT ?= $(HOME)/.cache/stream-classifier
VENV := $(VENV_ROOT)/venv-$(shell $(PYTHON) .ci/deps-hash)
BIN := $(VENV)/bin
KAFKA_LOCAL := deploy/kafka/kafka-local
export KAFKA_PORT ?= 9092

.PHONY: env tools test lint typecheck pytest demo broker-start broker-stop schemas fixtures clean-env

env: $(VENV)/.complete
	@$(BIN)/pip install --quiet --no-deps --no-build-isolation -e . >$(VENV)/editable.log 2>&1 \
	  || (cat $(VENV)/editable.log; exit 1)

$(VENV)/.complete:
	@echo "==> building environment $(VENV)"
	@rm -rf $(VENV) && mkdir -p $(VENV_ROOT)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip setuptools wheel
	$(BIN)/pip install --quiet -e '.[dev]'
	@touch $@

lint: env
	$(BIN)/ruff check stream_classifier tests benchmarks
	$(BIN)/ruff format --check stream_classifier tests benchmarks

typecheck: env
	$(BIN)/mypy

# Debian's prometheus package: promtool for the rule tests, prometheus for the real scrape.
tools:
	@command -v promtool >/dev/null && command -v prometheus >/dev/null || \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null)

pytest: env tools broker-start
	KAFKA_BOOTSTRAP=127.0.0.1:$(KAFKA_PORT) $(BIN)/pytest $(PYTEST_ARGS)

test: lint typecheck pytest

broker-start:
	$(KAFKA_LOCAL) start

broker-stop:
	$(KAFKA_LOCAL) stop

demo: env broker-start
	$(BIN)/python examples/demo.py

schemas: env
	$(BIN)/stream-classifier schemas schemas

fixtures:
	tests/fixtures/make_golden.sh

clean-env:
	rm -rf $(VENV)
