# The two commands: `make demo` and `make test`. Both set up what they need first.
.PHONY: setup demo test lint observe dashboards bench-bus bench-features bench-pipeline \
	bench-monitoring bench-scoring bench-streaming bench-scale soak fuzz clean

VENV := .venv
PY := $(VENV)/bin/python
PROMETHEUS_PORT ?= 9090

setup:
	@bash scripts/setup.sh

demo: setup
	@$(VENV)/bin/conveyor demo

test: setup
	@$(PY) -m pytest

lint: setup
	@$(VENV)/bin/ruff check .
	@$(VENV)/bin/mypy app common ingestion preparation segregation training evaluation scoring monitoring \
		deploy/grafana/build.py deploy/rabbitmq/definitions.py

# Prometheus on 127.0.0.1:$(PROMETHEUS_PORT) with deploy/prometheus/prometheus.yml: scrapes
# the services `conveyor up` or `make demo` start (their file_sd targets), loads the rules.
observe:
	@bash scripts/setup.sh prometheus
	@mkdir -p var/prometheus var/run/targets var/demo/targets
	@echo "Prometheus on http://127.0.0.1:$(PROMETHEUS_PORT) (Ctrl-C stops it)"
	@prometheus --config.file=deploy/prometheus/prometheus.yml --storage.tsdb.path=var/prometheus \
		--web.listen-address=127.0.0.1:$(PROMETHEUS_PORT)

dashboards: setup
	@$(PY) deploy/grafana/build.py

# Benchmarks are local development: the services they start accept guest and the published
# signing key, and read their sources from bench/.work (the checks of README's Security).
BENCH_TARGETS := bench-bus bench-features bench-pipeline bench-monitoring bench-scoring soak fuzz \
	bench-scale
$(BENCH_TARGETS): export CONVEYOR_LOCAL_DEV := true
$(BENCH_TARGETS): export CONVEYOR_SOURCE_ROOTS := ["$(CURDIR)/bench/.work","var/demo"]

# bench-NAME runs bench/NAME.py, which writes bench/results/NAME.json
BENCH_SCRIPTS := bench-bus bench-features bench-pipeline bench-monitoring bench-scoring \
	bench-streaming
$(BENCH_SCRIPTS): bench-%: setup
	@$(PY) bench/$*.py

# 1M, 5M and 20M rows on dask-local and local (long: generates up to 2 GB of CSV once);
# BENCH_SCALE_ARGS="--rows 1000000 --modes dask-local" chooses.
bench-scale: setup
	@$(PY) bench/scale.py $(BENCH_SCALE_ARGS)

# issue 12: 10 minutes of Score at 1,000 calls/s with two pipeline runs (bench/results/soak.json)
soak: setup
	@$(PY) bench/soak.py

# issue 12: the fuzz tests at 10,000 examples each, fresh seed (bench/results/fuzz.json)
fuzz: setup
	@CONVEYOR_FUZZ_EXAMPLES=$${CONVEYOR_FUZZ_EXAMPLES:-10000} CONVEYOR_FUZZ_REPORT=bench/results/fuzz.json \
		$(PY) -m pytest tests/integration/test_fuzz.py -q -p no:randomly -o timeout=0

clean:
	rm -rf var/ .pytest_cache
