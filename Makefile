# emailsync: `make demo` runs the main job, `make test` runs every test. Both set up what they need.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: all setup system-deps demo demo-crm test lint typecheck unit integration bench bench-full soak clean

all: test

# Debian packages the daemon's tests and demo need (run as root; skipped when present).
system-deps:
	@bash .ci/system-deps

$(STAMP): pyproject.toml
	@bash .ci/system-deps
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/emailsync demo

demo-crm: setup  # the same against the reference CRM: groups from it, events delivered to it
	$(BIN)/emailsync demo --crm

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: setup
	$(BIN)/mypy

unit: setup
	$(BIN)/python -m pytest tests/unit -q

integration: setup
	$(BIN)/python -m pytest tests/integration -q

# Everything CI runs: lint, types, every test (Dovecot, PostgreSQL, Prometheus) and the bench smoke.
# The bench smoke runs before pytest so that pytest's summary is the run's closing line.
test: setup lint typecheck
	$(BIN)/python bench/run.py --smoke
	$(BIN)/python -m pytest -q

bench: setup
	$(BIN)/python bench/run.py

clean:
	rm -rf $(VENV) .demo .mypy_cache .ruff_cache .pytest_cache build *.egg-info
