# edgeprune: `make demo` and `make test` do all set-up themselves (see scripts/setup.sh).
VENV := .venv
BIN := $(VENV)/bin
PYTEST_ARGS ?=

.PHONY: setup demo test lint typecheck unit integration bench clean

setup:
	@bash scripts/setup.sh

demo: setup
	$(BIN)/edgeprune demo

test: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/pytest -q $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: setup
	$(BIN)/mypy

unit: setup
	$(BIN)/pytest -q tests/unit $(PYTEST_ARGS)

integration: setup
	$(BIN)/pytest -q tests/integration $(PYTEST_ARGS)

bench: setup
	$(BIN)/edgeprune bench prune
	$(BIN)/edgeprune bench codec
	$(BIN)/edgeprune bench hop

clean:
	rm -rf runs .pytest_cache .mypy_cache .ruff_cache
