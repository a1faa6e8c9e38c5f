# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# Each creates .venv and installs what it needs (llama-cpp-python compiles from
# source the first time, about 4 minutes on 2 cores; pip caches the wheel).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
EXTRAS ?= local,server,postgres,loadtest,bench,deploy-check,dev
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast lint format loadtest capacity soak bench postgres browser clean chaos

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	CMAKE_BUILD_PARALLEL_LEVEL=2 $(PY) -m pip install --quiet -e '.[$(EXTRAS)]'
	# checkov's pins clash with pytest and python-hcl2: it gets a venv of its own
	$(PYTHON) -m venv $(VENV)/checkov
	$(VENV)/checkov/bin/pip install --quiet 'checkov>=3.2,<4'
	ln -sf ../checkov/bin/checkov $(VENV)/bin/checkov
	touch $(STAMP)

install: $(STAMP)

## demo: three local regional executors (real SmolLM2), a dispatcher on SQLite, one job
demo: install
	$(VENV)/bin/executor-service demo

## test: the whole suite (unit, integration on real PostgreSQL and gunicorn, acceptance)
test: install postgres browser
	$(PY) -m pytest

## test-fast: the unit tier (no network, no subprocess, no disk beyond tmp): seconds
## chaos: the long chaos runs (10 kill -9 / SIGTERM rounds per store), figures appended
## to chaos-report.jsonl (docs/reliability.md); `make test` runs 2 rounds
chaos: install postgres
	CHAOS_ROUNDS=$${CHAOS_ROUNDS:-10} CHAOS_REPORT=chaos-report.jsonl $(PY) -m pytest \
		tests/acceptance/test_chaos.py tests/acceptance/test_dispatcher_store_outage.py -q

test-fast: install
	$(PY) -m pytest tests/unit -q -m "not deploy and not image"

postgres:
	@bash scripts/ensure-postgres.sh

## browser: Debian's chromium for the job page's browser test (Playwright drives it)
browser:
	@bash scripts/ensure-chromium.sh

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy executor_service

format: install
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

## loadtest: gunicorn + simulated model on loopback, locust headless, thresholds
loadtest: install
	$(PY) loadtests/run.py $(LOADTEST_ARGS)

capacity: install
	$(PY) loadtests/capacity.py

soak: install
	$(PY) loadtests/soak.py

bench: install
	$(PY) bench/executor_overhead.py
	$(PY) bench/executor_concurrency.py
	$(PY) bench/executor_hostile.py --also-gthread

.PHONY: image image-test

## image: the executor image from the Dockerfile with buildah, on a local Debian base
## (installs buildah and debootstrap if missing; layer cache; prints the size)
image:
	@bash scripts/image/build.sh

## image-test: build it, run it with buildah, smoke-test it (also part of `make test`)
image-test: install postgres
	$(PY) -m pytest tests/image -m image -q

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache loadtests/reports
