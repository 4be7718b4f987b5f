# The two commands: `make demo` and `make test`. Both set up what they need first.
.PHONY: setup demo test lint bench-bus bench-features bench-pipeline clean

VENV := .venv
PY := $(VENV)/bin/python

setup:
	@bash scripts/setup.sh

demo: setup
	@$(VENV)/bin/conveyor demo

test: setup
	@$(PY) -m pytest

lint: setup
	@$(VENV)/bin/ruff check .
	@$(VENV)/bin/mypy common ingestion preparation segregation training evaluation scoring monitoring

bench-bus: setup
	@$(PY) bench/bus.py

bench-features: setup
	@$(PY) bench/features.py

bench-pipeline: setup
	@$(PY) bench/pipeline.py

clean:
	rm -rf var/ .pytest_cache
