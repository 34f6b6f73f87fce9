# Every target installs what it needs into .venv first, so a fresh clone needs only Python 3.11+.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
RUN_STAMP := $(VENV)/.installed-run
COMMA := ,

.PHONY: install run demo cluster-demo test fuzz lint type bench all clean

# Built under a lock, so `make demo` and `make test` started together do not break each other's
# .venv: the second waits, then finds it fresh. Running the bridge needs only what it runs with
# (and the examples'); the tests and checks need the whole toolchain.
define installed
	@flock $(VENV).lock sh -c '\
	  if [ -f $(1) ] && [ $(1) -nt setup.py ] && [ $(1) -nt setup.cfg ]; then exit 0; fi; \
	  set -e; \
	  $(PYTHON) -m venv $(VENV); \
	  $(BIN)/pip install --quiet --upgrade pip; \
	  $(BIN)/pip install --quiet -e ".[$(2)]"; \
	  touch $(1)'
endef

$(STAMP): setup.py setup.cfg
	$(call installed,$(STAMP),dev)

$(RUN_STAMP): setup.py setup.cfg
	$(call installed,$(RUN_STAMP),examples$(COMMA)fast$(COMMA)cluster)

install: $(STAMP)

# `make demo PORT=8001` when 8000 is taken. Passed only when given: otherwise the bridge's own
# settings choose, as for every setting (COMFYBRIDGE_PORT, .env, the config file; 8000).
PORT_FLAG = $(if $(PORT),--port $(PORT))
run: $(RUN_STAMP)
	$(BIN)/python -m comfybridge $(PORT_FLAG)

demo: $(RUN_STAMP)
	$(BIN)/python -m comfybridge --emulate 2 --emulator-pace 0.05 $(PORT_FLAG)

# Two bridges on a throwaway PostgreSQL behind nginx, two emulators (Debian: postgresql nginx-light).
CLUSTER_PORT ?= 8080
cluster-demo: $(RUN_STAMP)
	$(BIN)/python examples/cluster_demo.py --port $(CLUSTER_PORT)

# Then the contract, restarts and the cluster again with uploads and results in S3 (moto's server).
STORAGE_TESTS = tests/test_api.py tests/test_contract.py tests/test_ws.py tests/test_restarts.py \
	tests/test_webhooks.py tests/test_hostile.py tests/test_uploads.py tests/test_access.py \
	tests/test_limits.py tests/test_operations.py tests/test_cluster.py tests/test_early_results.py tests/test_wait.py \
	tests/test_local_folders.py

test: $(STAMP)
	$(BIN)/python -m pytest
	COMFYBRIDGE_TEST_STORAGE=s3 $(BIN)/python -m pytest $(STORAGE_TESTS)

# Schemathesis against /openapi.json: up to 200 generated requests per operation instead of 50.
fuzz: $(STAMP)
	COMFYBRIDGE_FUZZ_EXAMPLES=200 $(BIN)/python -m pytest -s tests/test_contract.py -k 'generated_request or every_operation'

lint: $(STAMP)
	$(BIN)/ruff check comfybridge tests examples bench
	$(BIN)/ruff format --check comfybridge tests examples bench

type: $(STAMP)
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python bench/bench.py

all: lint type test

clean:
	rm -rf $(VENV) data .pytest_cache .mypy_cache .ruff_cache
