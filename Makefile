# Two commands for a newcomer: `make run` and `make test`. Both create .venv when missing.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: run test lint bench conformance clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -e '.[test]'
	touch $(VENV)/.installed $@

run: $(VENV)/.installed
	$(BIN)/mta serve --config config.example.toml

test: $(VENV)/.installed-test
	$(BIN)/ruff check mta tests bench tools
	$(BIN)/python -m pytest -q

lint: $(VENV)/.installed-test
	$(BIN)/ruff check mta tests bench tools

# Regenerate the tests column of docs/conformance.md from the suite (CI checks it is current).
conformance: $(VENV)/.installed-test
	$(BIN)/python tools/conformance.py

bench: $(VENV)/.installed-test
	$(BIN)/python bench/relay_bench.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .hypothesis
