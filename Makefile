# The two commands README.md opens with: `make demo` and `make test`.
# Each creates .venv on first use and installs what it needs; nothing else is assumed.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint typecheck pytest bench clean

$(BIN)/python:
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "flash-actors needs Python 3.11+; set PYTHON=python3.11 (or newer)")'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/quick_start.py

lint: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

typecheck: $(STAMP)
	$(BIN)/mypy

# The tests mostly wait on real worker processes and daemons, so four runners share two cores
# well (about 5 minutes instead of 12 here); PYTEST_WORKERS=0 runs them in one process.
PYTEST_WORKERS ?= 4

pytest: $(STAMP)
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS)

test: lint typecheck pytest

bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	@for b in benchmarks/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) .flash .mypy_cache .ruff_cache .pytest_cache
