# `make run` and `make test` work on a fresh machine: both create .venv first.
VENV := .venv
PY := $(VENV)/bin/python
# One stamp per set of requirements: a changed file reinstalls, `make run` skips the test tools.
RUN_STAMP := $(VENV)/.run-$(shell cat requirements.txt package-lock.json | cksum | cut -d' ' -f1)
DEV_STAMP := $(VENV)/.dev-$(shell cat requirements.txt requirements-dev.txt package-lock.json | cksum | cut -d' ' -f1)
CODE := engine db views bench tests app.py cli.py grades.py

.PHONY: install install-dev run test lint format
install: $(RUN_STAMP)
install-dev: $(DEV_STAMP)

# npm brings the grading viewer's front-end library (OpenSeadragon) from its registry.
$(RUN_STAMP): requirements.txt package-lock.json
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	npm ci --no-audit --no-fund --loglevel=error
	rm -f $(VENV)/.run-*
	touch $@

$(DEV_STAMP): $(RUN_STAMP) requirements-dev.txt
	$(PY) -m pip install -q -r requirements.txt -r requirements-dev.txt
	rm -f $(VENV)/.dev-*
	touch $@

run: $(RUN_STAMP)
	$(PY) -m streamlit run app.py

# Settings in pyproject.toml. `make format` rewrites what `ruff format --check` would refuse.
lint: $(DEV_STAMP)
	$(PY) -m ruff check $(CODE)
	$(PY) -m ruff format --check $(CODE)
	$(PY) -m mypy

format: $(DEV_STAMP)
	$(PY) -m ruff check --fix $(CODE)
	$(PY) -m ruff format $(CODE)

test: lint
	$(PY) -m pytest -q
