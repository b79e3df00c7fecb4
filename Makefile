# dloop: `make up` runs the embedded loop, `make test` runs the test suite. Both set up a
# virtualenv in .venv first (Python 3.11+), so a fresh machine needs nothing else.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install up test fuzz lint typecheck bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	touch $(STAMP)

up: install
	$(BIN)/dloop up $(ARGS)

test: install
	$(BIN)/python -m pytest --cov --cov-report=term-missing:skip-covered $(PYTEST_ARGS)

# Fuzzing, long: the API from its OpenAPI document (thousands of examples per operation, random
# seed) and VW's parsers with random nests of reserved feature keys. `make test` runs both
# bounded, with fixed seeds.
fuzz: install
	DLOOP_FUZZ=long $(BIN)/python -m pytest -p no:cacheprovider tests/test_fuzz.py \
		tests/test_sandbox.py::test_no_feature_a_client_can_send_crashes_vw $(PYTEST_ARGS)

lint: install
	$(BIN)/ruff check service learners tests benchmarks migrations
	$(BIN)/ruff format --check service learners tests benchmarks migrations
	$(BIN)/deptry .

typecheck: install
	$(BIN)/mypy

bench: install
	@command -v wrk >/dev/null || (apt-get install -y wrk >/dev/null 2>&1 || (apt-get update >/dev/null && apt-get install -y wrk >/dev/null))
	$(BIN)/python -m benchmarks.run $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .coverage
