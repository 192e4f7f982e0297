# `make run` serves the relay with the demo model; `make test` runs the whole suite.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run dev test bench

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

# The demo app for people working on it: one gevent worker that restarts on every code change.
dev: $(VENV)/.run
	WEB_CONCURRENCY=1 $(BIN)/gunicorn -c gunicorn.conf.py --reload wsgi:app

test: $(VENV)/.dev
	$(BIN)/python -m pytest -v $(PYTEST_ARGS)

bench: $(VENV)/.dev
	$(BIN)/python bench/cancel.py
	$(BIN)/python bench/stop.py
	$(BIN)/python bench/servers.py
	$(BIN)/python bench/capacity.py
	$(BIN)/python bench/capacity.py --open 10000
	$(BIN)/python bench/profile.py
	$(BIN)/python bench/parts.py
	$(BIN)/python bench/instructions.py
