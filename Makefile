# Two commands do all set-up on a fresh machine: `make demo` and `make test` (both run `setup`).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: setup test test-unit test-gpu bench demo clean

setup: $(STAMP)

# torch first (the CPU wheel on local disk), then DeepSpeed without build isolation (an isolated
# build would pull a several-GB CUDA torch), then the project in editable mode.
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q --no-build-isolation deepspeed==0.19.8
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

test: setup
	$(PY) -m pytest tests

test-unit: setup
	$(PY) -m pytest tests/unit

test-gpu: setup
	$(PY) -m pytest tests/gpu

bench: setup
	$(PY) benchmarks/moe.py

# The main job: the paper's five stages on the tiny model, locally (see README for figures).
demo: setup
	$(VENV)/bin/llada demo

clean:
	rm -rf $(VENV) .pytest_cache
