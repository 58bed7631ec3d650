# ernie-tools. Two commands on a fresh clone: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
ORACLE := .venv-oracle
PY := $(VENV)/bin/python
# Paddle's MKL needs these on AVX2 CPUs to reach full matmul speed; libernie sets the same defaults itself.
export MKL_DEBUG_CPU_TYPE ?= 5
export OMP_NUM_THREADS ?= $(shell nproc 2>/dev/null || echo 1)

.PHONY: help venv oracle test test-fast demo bench clean bats bats-deps

help:
	@echo "make demo   - create .venv, then tokenizer -> pack -> pretrain -> LoRA SFT -> DPO -> merge -> serve -> quantize on shipped assets"
	@echo "make demo MOE=1 - pack -> pretrain -> LoRA SFT -> merge -> quantize -> serve on a tiny mixture-of-experts model"
	@echo "make test   - create .venv and .venv-oracle, install pinned deps, run the test suite"
	@echo "make bench  - run scripts/bench/* and print ratios against peers (installs .venv-pf for PaddleFormers)"

venv: $(VENV)/.installed
$(VENV)/.installed: requirements/base.txt pyproject.toml
	[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q -r requirements/base.txt
	$(VENV)/bin/pip install -q --no-deps -e .
	touch $@

oracle: $(ORACLE)/.installed
$(ORACLE)/.installed: requirements/oracle.txt scripts/setup_oracle.sh
	PYTHON=$(PYTHON) scripts/setup_oracle.sh $(ORACLE)

test: venv oracle bats-deps
	$(PY) -m pytest -q
	$(MAKE) --no-print-directory bats

test-fast: venv
	$(PY) -m pytest -q -m "not oracle and not slow"

# MOE=1: the same chain on a tiny mixture-of-experts model (scripts/demo_moe.sh)
demo: venv
	bash scripts/$(if $(filter 1,$(MOE)),demo_moe.sh,demo.sh)

# Each benchmark prints its ratio against a peer or a physical limit measured in the same run;
# results go to docs/BENCHMARKS.md by hand, with the command and the date.
bench: venv oracle
	bash scripts/bench/setup_peers.sh
	$(PY) scripts/bench/forward.py
	$(PY) scripts/bench/train.py
	$(PY) scripts/bench/pack.py
	$(PY) scripts/bench/merge.py
	$(PY) scripts/bench/serve.py
	$(PY) scripts/bench/moe.py
	$(PY) scripts/bench/quant.py
	$(PY) scripts/bench/dpo.py

# bats-core 1.13 (bats_pipe, run --separate-stderr) with bats-assert/bats-support from npm into .bats/;
# Debian's bats is too old. jq is used by the pipeline tests as a user would use it.
BATS_DIR := .bats
BATS := $(BATS_DIR)/node_modules/bats/bin/bats
bats-deps: $(BATS_DIR)/.installed
$(BATS_DIR)/.installed:
	command -v jq >/dev/null || { apt-get update -qq && apt-get install -y -qq jq; }
	npm install --prefix $(BATS_DIR) --no-save --no-audit --no-fund bats@1.13.0 bats-assert@2.2.4 bats-support@0.3.0
	touch $@

bats: venv bats-deps
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(BATS) tests/bats

clean:
	rm -rf $(VENV) $(ORACLE) .venv-pf .bats .pytest_cache demo-out demo-moe-out out
