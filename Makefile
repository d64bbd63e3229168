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

migrate:
	$(VENV)/bin/steprun migrate
