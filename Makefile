# `make run` and `make test` work on a fresh machine: both create .venv first.
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat requirements.txt package-lock.json | cksum | cut -d' ' -f1)

.PHONY: install run test bench
install: $(STAMP)

# npm brings the grading viewer's front-end library (OpenSeadragon) from its registry.
$(STAMP): requirements.txt package-lock.json
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	npm ci --no-audit --no-fund --loglevel=error
	rm -f $(VENV)/.installed-*
	touch $@

run: $(STAMP)
	$(PY) -m streamlit run app.py

test: $(STAMP)
	$(PY) -m pytest -q
