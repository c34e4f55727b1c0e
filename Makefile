# Two commands do all set-up on a fresh machine (Python 3.11): `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# today's exact versions of everything (what `make test` and CI install); pyproject.toml holds
# the ranges users get. Refresh: install with the new versions, then `pip freeze`.
LOCK   := requirements/lock.txt
# the newest-versions step: jax >= 0.11 needs Python >= 3.12
PYTHON_NEWEST ?= $(firstword $(wildcard $(shell pyenv root 2>/dev/null)/versions/3.12*/bin/python3.12 \
	$(HOME)/.pyenv/versions/3.12*/bin/python3.12) python3.12)
VENV_NEWEST   ?= .venv-newest
# its fast subset: models, conversion, generation (torch-free), arithmetic, training runs and data,
# and that installing jaxarith keeps the newer stack (no downgrade)
NEWEST_TESTS  := tests/test_install.py tests/test_stack_smoke.py tests/test_arith.py \
	tests/test_train_loop.py tests/test_train_data.py tests/test_train_config.py tests/test_data_stream.py
# 8 fake CPU devices, so every sharded path runs on a laptop.
export XLA_FLAGS ?= --xla_force_host_platform_device_count=8

.PHONY: demo test test-newest test-gpu-image test-multiprocess test-slow test-all lint bench clean

$(STAMP): pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c $(LOCK) -e '.[test,tpu]'
	touch $(STAMP)

demo: $(STAMP)  ## the main job: the delta-transplant experiment on the embedded default (CPU)
	XLA_FLAGS=--xla_force_host_platform_device_count=1 $(PY) -m train.demo

test: $(STAMP)  ## lint + the test suite (CI runs exactly this)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -n 2 --dist loadfile

# a fresh Python 3.12 venv $(1) with jaxarith and `pip install` options $(2); then the subset
define venv_subset
	rm -rf $(1)
	$(PYTHON_NEWEST) -m venv $(1)
	$(1)/bin/python -m pip install -q --upgrade pip
	$(1)/bin/python -m pip install -q $(2) -e '.[test-newest]'
	$(1)/bin/python -m pip check
	$(1)/bin/python -m pip list 2>/dev/null | grep -iE '^(jax|jaxlib|flax|optax|orbax-checkpoint|grain|transformers|huggingface.hub|datasets|numpy) '
	JAXARITH_LOCK=$(LOCK) $(1)/bin/python -m pytest -q -p no:cacheprovider --durations=10 \
		$(NEWEST_TESTS)
endef

test-newest:  ## the newest versions the ranges allow, in a fresh Python 3.12 venv, on a fast subset
	$(call venv_subset,$(VENV_NEWEST),)

test-gpu-image:  ## the same subset with the lent GPU image's versions (requirements/gpu-image.txt)
	$(call venv_subset,.venv-gpu-image,-c requirements/gpu-image.txt)

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
	rm -rf $(VENV) $(VENV_NEWEST) .venv-gpu-image .pytest_cache bench_results
