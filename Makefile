# Two commands do all set-up on a fresh machine (Python 3.11): `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# 8 fake CPU devices, so every sharded path runs on a laptop.
export XLA_FLAGS ?= --xla_force_host_platform_device_count=8

.PHONY: demo test test-multiprocess test-slow test-all lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,tpu]'
	touch $(STAMP)

demo: $(STAMP)  ## the main job: the delta-transplant experiment on the embedded default (CPU)
	XLA_FLAGS=--xla_force_host_platform_device_count=1 $(PY) -m train.demo

test: $(STAMP)  ## lint + the test suite (CI runs exactly this)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -n 2 --dist loadfile

test-multiprocess: $(STAMP)  ## the slow 2-process x 4-device runs (CI runs them after `make test`)
	$(PY) -m pytest -q -m slow tests/test_multiprocess.py tests/test_lmeval_multiprocess.py

test-slow: $(STAMP)  ## the other tests marked slow (end-to-end runs, extra parity cases; CI runs them last)
	$(PY) -m pytest -q -n 2 --dist loadfile -m slow --ignore tests/test_multiprocess.py \
		--ignore tests/test_lmeval_multiprocess.py

test-all: $(STAMP)  ## including tests marked slow
	$(PY) -m pytest -q -n 2 --dist loadfile -m ""

lint: $(STAMP)
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache bench_results
