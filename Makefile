# Every target sets up what it needs: a fresh Debian 12 machine and root are
# enough for `make demo` and `make test`.

VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install deps demo test lint typecheck unit e2e guest simulate bench soak clean

install: $(STAMP)

deps:
	scripts/install-deps.sh

$(STAMP): pyproject.toml scripts/install-deps.sh
	scripts/install-deps.sh
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

# About 20 s of the controller against libvirt's built-in test driver, which
# runs inside the process: no daemon needed. Its lock and state files go
# under the venv rather than /run/balloonctl, so the demo needs no root
# beyond what `make install` does.
demo: install
	mkdir -p $(VENV)/demo-state
	timeout --preserve-status --signal=TERM 20 \
		$(BIN)/balloonctl run --uri test:///default --stats-period 1 \
		--log-format json --state-dir $(VENV)/demo-state

lint: install
	$(BIN)/ruff format --check balloonctl tests
	$(BIN)/ruff check balloonctl tests

typecheck: install
	$(BIN)/mypy

guest: install
	scripts/build-guest.sh

unit: install
	$(BIN)/pytest -m "not e2e"

e2e: install guest
	$(BIN)/pytest -m e2e

# The end-to-end tests build the guest image themselves, and skip (or fail
# under CI=true) where they cannot run.
test: lint typecheck
	$(BIN)/pytest

# Replay the shipped traces through every policy, print the table and redraw
# docs/img/simulation-*.png.
simulate: install
	$(BIN)/balloonctl simulate tests/data/traces/*.csv tests/data/traces/*.jsonl \
		--plot docs/img/simulation.png

# Speed and scale figures (docs/performance.md), printed and written to
# $(BENCH_OUT) (default bench-results.json). BENCH='cost memory' runs only
# those; BENCH_SKIP_REAL=1 skips the real-guest part. About 15 minutes.
bench: install
	$(BIN)/python -m tests.bench $(BENCH)

# The churn soak of tests/integration/test_soak.py, longer than in `make
# test` (500 domains over 60 s, 20 running at once): by default 2000
# domains over 600 s with 50 running at once. Override SOAK_SECONDS,
# SOAK_DOMAINS and SOAK_IN_FLIGHT.
SOAK_SECONDS ?= 600
SOAK_DOMAINS ?= 2000
SOAK_IN_FLIGHT ?= 50

soak: install
	SOAK_SECONDS=$(SOAK_SECONDS) SOAK_DOMAINS=$(SOAK_DOMAINS) \
		SOAK_IN_FLIGHT=$(SOAK_IN_FLIGHT) $(BIN)/pytest -m soak -s -q

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache .hypothesis
