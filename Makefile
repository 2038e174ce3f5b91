# The two commands a new user types: `make run` and `make test`.
# Each installs what it needs into .venv once; a second call installs nothing.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python

.PHONY: run test bench install clean

run: $(VENV)/.run-installed
	$(VENV)/bin/strata up

test: $(VENV)/.test-installed
	$(PY) -m pytest -q

bench: $(VENV)/.test-installed
	$(PY) bench/engine.py

install: $(VENV)/.test-installed

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(VENV)/.run-installed: pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q -e '.[worker]'
	touch $@

$(VENV)/.test-installed: pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q -e '.[worker,test]'
	touch $@ $(VENV)/.run-installed

clean:
	rm -rf $(VENV) .strata
