# ernie-tools. Two commands on a fresh clone: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
ORACLE := .venv-oracle
PY := $(VENV)/bin/python
# Paddle's MKL needs these on AVX2 CPUs to reach full matmul speed; libernie sets the same defaults itself.
export MKL_DEBUG_CPU_TYPE ?= 5
export OMP_NUM_THREADS ?= $(shell nproc 2>/dev/null || echo 1)

.PHONY: help venv oracle test test-fast demo bench clean

help:
	@echo "make demo   - create .venv, install, build the tiny demo model, convert it and generate"
	@echo "make test   - create .venv and .venv-oracle, install pinned deps, run the test suite"
	@echo "make bench  - run scripts/bench/* and print ratios against peers"

venv: $(VENV)/.installed
$(VENV)/.installed: requirements/base.txt pyproject.toml
	[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -r requirements/base.txt
	$(VENV)/bin/pip install -q --no-deps -e .
	touch $@

oracle: $(ORACLE)/.installed
$(ORACLE)/.installed: requirements/oracle.txt scripts/setup_oracle.sh
	PYTHON=$(PYTHON) scripts/setup_oracle.sh $(ORACLE)

test: venv oracle
	$(PY) -m pytest -q

test-fast: venv
	$(PY) -m pytest -q -m "not oracle and not slow"

demo: venv
	$(PY) scripts/demo.py

bench: venv oracle
	$(PY) scripts/bench/forward.py

clean:
	rm -rf $(VENV) $(ORACLE) .pytest_cache demo-out
