# The two commands a new user types: `make run` and `make test`.
# Each installs what it needs into .venv once; a second call installs nothing.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# llama-cpp-python compiles llama.cpp: portable (AVX2), not tuned to this CPU. A native build on a Xeon
# with AMX segfaulted in llama_decode on a Q4_K_M model (tests/model_store/test_convert.py, 2026-12-06),
# and the container images carry the same wheel to other CPUs. Set CMAKE_ARGS to build otherwise.
export CMAKE_ARGS ?= -DGGML_NATIVE=OFF

.PHONY: run test bench install clean

run: $(VENV)/.run-installed
	$(VENV)/bin/strata up

test: $(VENV)/.test-installed
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -n 3 --dist loadfile

# The CPU benchmarks, a few minutes in all (docs/benchmarks.md has each one's figures and full command).
bench: $(VENV)/.test-installed
	$(PY) bench/engine.py --new-tokens 32 --repeat 2
	$(PY) bench/runtimes.py --repeat 2
	$(PY) bench/runtimes_http.py --repeat 2
	$(PY) bench/cpu_linear.py --rounds 3
	$(PY) bench/attention_ref.py
	$(PY) bench/grammar.py --rounds 3
	$(PY) bench/gateway_app.py
	$(PY) bench/gateway_quota.py
	$(PY) bench/monitor_windows.py
	$(PY) bench/platform_overhead.py
	$(PY) bench/load.py --mb 1024
	$(PY) bench/ledger.py --events 20000 --verify-leaves 200000
	$(PY) bench/model_store.py --mb 300

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
