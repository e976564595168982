# hcloud-ha-web: `make up` deploys the dev stack, `make test` runs every test tier.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STACK ?= dev
export STACK

.PHONY: help venv system-deps up preview destroy status ssh test test-unit test-render lab cloud bench soak e2e clean

help:
	@echo "make up | preview | destroy   pulumi on stack $(STACK) (local file state by default)"
	@echo "make test                     every tier: unit, render+check, lab, local cloud"
	@echo "make status [ARGS=--json]     is the live cluster healthy? (exit 1 naming what is wrong)"
	@echo "make ssh HOST=lb1             log in as root with the stack's key"
	@echo "make lab | cloud | bench | soak | e2e | lint"

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -r requirements.txt -r requirements-dev.txt
	touch $@

venv: $(VENV)/.installed

system-deps:
	./scripts/system-deps.sh

up preview destroy: venv
	./scripts/pulumi-stack.sh $@

status: venv
	$(PY) -m ops.status --stack $(STACK) $(ARGS)

ssh: venv
	@test -n "$(HOST)" || { echo "usage: make ssh HOST=lb1" >&2; exit 2; }
	$(PY) -m ops.ssh --stack $(STACK) $(HOST)

test: venv system-deps
	$(PY) -m pytest

test-unit: venv
	$(PY) -m pytest tests/unit

test-render: venv system-deps
	$(PY) -m pytest tests/render

lab: venv system-deps
	$(PY) -m lab

# Boot four local Debian hosts, provision them with the program's steps, print, tear down.
cloud: venv system-deps
	$(PY) -m lab.cloud.cluster

# Each benchmark module prints its figures as JSON lines (lab/measure.py); add yours here.
BENCH_MODULES ?= lab.bench lab.bench_http lab.site_state lab.cloud.bench_site lab.bench_tls lab.bench_ops lab.cloud.bench_day2

bench: venv system-deps
	@set -e; for m in $(BENCH_MODULES); do echo "# $$m" >&2; $(PY) -m $$m; done

# Chaos soak: random faults under traffic, invariants checked after each (10 min default).
SOAK_SECONDS ?= 600
soak: venv system-deps
	$(PY) -m lab.soak --duration $(SOAK_SECONDS)

e2e: venv system-deps
	$(PY) -m pytest -m cloud tests/cloud

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache

include mk/lint.mk
lint-tools: $(VENV)/.installed
