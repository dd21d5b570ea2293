# Each target sets itself up on a fresh machine: a virtual environment in .venv, then the work.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: run test lint bench

$(BIN)/orgsync: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

run: $(BIN)/orgsync
	$(BIN)/orgsync run

test: $(BIN)/orgsync
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/pytest -n 2 --dist loadfile

bench: $(BIN)/orgsync
	$(BIN)/python bench/run.py
