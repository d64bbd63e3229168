.PHONY: setup dev test test-fast lint bench migrate

VENV ?= .venv
PY := $(VENV)/bin/python

setup:
	python3 -m venv $(VENV) && $(VENV)/bin/pip install --upgrade pip && $(VENV)/bin/pip install -e '.[dev]'

dev:
	$(VENV)/bin/steprun dev

test:
	$(VENV)/bin/pytest

lint:
	$(VENV)/bin/ruff check .

# Needs the bench extra (pip install -e '.[dev,bench]'); `make bench BENCH_ARGS=--quick` for a short run.
bench:
	$(PY) -m bench $(BENCH_ARGS)

migrate:
	$(VENV)/bin/steprun migrate
