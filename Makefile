.PHONY: setup dev test test-fast lint bench soak migrate

VENV ?= .venv
PY := $(VENV)/bin/python

setup:
	python3 -m venv $(VENV) && $(VENV)/bin/pip install --upgrade pip && $(VENV)/bin/pip install -e '.[dev]'

dev:
	$(VENV)/bin/steprun dev

# The whole suite: unit, contract and e2e (real web / worker / scheduler processes).
test:
	$(VENV)/bin/pytest

# Everything but tests/e2e: no steprun processes started (still the real Postgres and Redis).
test-fast:
	$(VENV)/bin/pytest -m "not e2e"

# ruff, mypy (config in setup.cfg) and the import contracts (import-linter, setup.cfg): any failure fails.
lint:
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports

# Needs the bench extra (pip install -e '.[dev,bench]'); `make bench BENCH_ARGS=--quick` for a short run.
bench:
	$(PY) -m bench $(BENCH_ARGS)

migrate:
	$(VENV)/bin/steprun migrate

# SIGKILL workers N times under multi-step tool turns and long streams (bench/soak.py); SOAK_ARGS="--kills 10".
soak:
	$(PY) -m bench.soak $(SOAK_ARGS)
