# Quick start: `make demo` (set up and run the main job), `make test` (set up and pass the tests).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: all venv test demo bench c-example gpu-check clean

all: test

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e ".[dev,demo]"
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q tests

demo: $(STAMP)
	$(PY) -m fastdistill demo

bench: $(STAMP)
	$(PY) -m fastdistill bench

c-example: $(STAMP)
	$(MAKE) -C examples/c_host run PYTHON=$(abspath $(PY))

gpu-check: $(STAMP)
	$(PY) bench/gpu_check.py --out gpu_check.md

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .benchmarks
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
