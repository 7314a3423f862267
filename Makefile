# ember: `make serve` and `make test` are the two commands a fresh machine needs.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.ember-installed
PYTEST_ARGS ?=

.PHONY: install serve test lint unit bench-load bench-engine sim clean

$(STAMP): pyproject.toml constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt -e ".[dev]"
	@touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check ember tests benchmarks
	$(VENV)/bin/ruff format --check ember tests benchmarks
	$(VENV)/bin/mypy

# pytest exits 5 when it collected no test: that is a failure here.
test: lint
	@$(PY) -m pytest -q $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "no tests were collected"; exit 1; fi; exit $$rc

unit: $(STAMP)
	$(PY) -m pytest -q tests/unit

serve: $(STAMP)
	$(VENV)/bin/ember serve

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
