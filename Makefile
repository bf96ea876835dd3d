# The two commands README.md opens with: `make demo` and `make test`.
# Each creates .venv on first use and installs what it needs; nothing else is assumed.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint typecheck pytest browser bench clean

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

pytest: $(STAMP) browser
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS)

# tests/test_cli_run.py checks `flash run`'s /docs in Debian's chromium: installed when missing
# and possible (root with apt-get); otherwise that one test skips, saying why.
browser:
	@if command -v chromium >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing chromium (apt-get) for the /docs browser test"; \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			--no-install-recommends chromium >/dev/null; } \
		|| echo "make: could not install chromium: the /docs browser test will skip"; \
	else echo "make: chromium is missing (installing it needs root and apt-get): the /docs browser test will skip"; fi

test: lint typecheck pytest

# runpod-flash (a reference in the benchmarks) installs a `flash` script of its own: ours is
# installed again after it, so .venv/bin/flash stays flash-actors' command.
bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[bench]'
	$(BIN)/python -m pip install --quiet --no-deps --force-reinstall -e .
	@for b in benchmarks/bench_*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) .flash .mypy_cache .ruff_cache .pytest_cache
