# `make run` serves the relay with the demo model; `make test` runs the whole suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test bench

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.run: requirements.txt | $(BIN)/python
	$(BIN)/pip install -q -r requirements.txt
	touch $@

$(VENV)/.dev: requirements.txt requirements-dev.txt | $(BIN)/python
	$(BIN)/pip install -q -r requirements-dev.txt
	touch $@ $(VENV)/.run

run: $(VENV)/.run
	$(BIN)/gunicorn -c gunicorn.conf.py wsgi:app

test: $(VENV)/.dev
	$(BIN)/python -m pytest -v $(PYTEST_ARGS)

bench: $(VENV)/.dev
	$(BIN)/python bench/cancel.py
