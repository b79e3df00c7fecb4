# dloop: `make up` runs the embedded loop, `make test` runs the test suite. Both set up a
# virtualenv in .venv first (Python 3.11+), so a fresh machine needs nothing else.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Every version the tests ran with; the Docker image installs the runtime part of it.
LOCK   := requirements.lock
# Only `make lock` needs uv (it resolves for Python 3.11 on Linux whatever machine runs it).
UV_VERSION := 0.13.9

.PHONY: install browser lock up demo test coverage fuzz lint typecheck bench clean

install: $(STAMP)

$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c $(LOCK) -e '.[server,test]'
	touch $(STAMP)

# Re-resolve the lock after editing pyproject.toml's dependencies, keeping every pin that still
# fits; `make lock ARGS=--upgrade` moves everything to the newest releases (then run the tests).
lock:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet uv==$(UV_VERSION)
	$(BIN)/uv pip compile pyproject.toml --extra server --extra test --python-version 3.11 \
		--python-platform x86_64-unknown-linux-gnu --custom-compile-command 'make lock' \
		--quiet --output-file $(LOCK) $(ARGS)

up: install
	$(BIN)/dloop up $(ARGS)

# `dloop up` with simulated traffic: open the printed address and watch the loop learn.
demo: install
	$(BIN)/dloop demo $(ARGS)

# The dashboard's browser tests drive Debian's chromium with Playwright (Playwright's own
# browser download does not work on these machines).
browser:
	@command -v chromium >/dev/null || apt-get install -y chromium >/dev/null 2>&1 \
		|| (apt-get update >/dev/null && apt-get install -y chromium >/dev/null)

# Two processes (pytest-xdist) run every test but those that restart Postgres, which every
# other test shares (marked `serial`); those run alone afterwards. A selection (PYTEST_ARGS) with
# no serial test has nothing to run in the second step. No coverage here: tracing every line
# makes the suite about 1.5 times as long (past CI's 15 minutes on a slower 2-core machine);
# `make coverage` runs the same two steps measured.
test: install browser
	DLOOP_SERIAL=skip $(BIN)/python -m pytest -n 2 $(COV_FIRST) $(PYTEST_ARGS)
	DLOOP_SERIAL=only $(BIN)/python -m pytest $(COV_SECOND) $(PYTEST_ARGS) || [ $$? -eq 5 ]

coverage: COV_FIRST := --cov --cov-report= --cov-fail-under=0
coverage: COV_SECOND := --cov --cov-append --cov-report=term-missing:skip-covered
coverage: test

# Fuzzing, long: the API from its OpenAPI document (thousands of examples per operation, random
# seed) and VW's parsers with random nests of reserved feature keys. `make test` runs both
# bounded, with fixed seeds.
fuzz: install
	DLOOP_FUZZ=long $(BIN)/python -m pytest -p no:cacheprovider tests/api/test_fuzz.py \
		tests/unit/learners/test_sandbox.py::test_no_feature_a_client_can_send_crashes_vw $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check service learners tests benchmarks migrations
	$(BIN)/ruff format --check service learners tests benchmarks migrations
	$(BIN)/deptry .
	$(BIN)/lint-imports

typecheck: install
	$(BIN)/mypy

# The peer beside dloop in the serving table, Ray Serve + VW, gets a virtualenv of its own (Ray
# is no dependency of dloop); if it does not install, the table says so and goes on without it.
PEER := .venv-peer
RAY_VERSION := 2.60.0

bench: install
	@command -v wrk >/dev/null || (apt-get install -y wrk >/dev/null 2>&1 || (apt-get update >/dev/null && apt-get install -y wrk >/dev/null))
	@test -x $(PEER)/bin/python || ($(PYTHON) -m venv $(PEER) && $(PEER)/bin/python -m pip install \
		--quiet "ray[serve]==$(RAY_VERSION)" vowpalwabbit==9.11.9 orjson) \
		|| (rm -rf $(PEER); echo "Ray Serve did not install: the bench goes on without the peer")
	$(BIN)/python -m benchmarks.run $(ARGS)

clean:
	rm -rf $(VENV) $(PEER) .pytest_cache .mypy_cache .ruff_cache .coverage
