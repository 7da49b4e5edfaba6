# Quick start: `make demo` (set up and run the main job), `make test` (set up and pass the tests).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# the PyTorch the suite runs against (torch tests, references of the CUDA simulator tests): the pinned
# CPU build (an unpinned torch pulls gigabytes of CUDA wheels)
TORCH ?= torch==2.13.0

.PHONY: all venv test fuzz demo bench c-example gpu-check clean

all: test

TEST_STAMP := $(VENV)/.installed-test

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e ".[dev,demo]"
	touch $(STAMP)

# everything the test suite needs, the optional packages included: `make test` runs every test
$(TEST_STAMP): $(STAMP) Makefile
	$(PY) -m pip install -q "$(TORCH)"
# the teachers extra (pyarrow, httpx, tqdm, msgspec) and HF datasets, whose reading of a teacher store is
# tested (about 20 s from an empty pip cache); the hf extra (transformers, accelerate, peft, datasets, trl:
# about 25 s more with a warm pip cache); the pinned torch kept
	$(PY) -m pip install -q -e ".[teachers,hf]" "$(TORCH)"
	touch $(TEST_STAMP)

venv: $(TEST_STAMP)

# two pytest processes (pytest-xdist), a test file each at a time, the longest files first (the order of
# tests/conftest.py: the sm_90 compile of every CUDA kernel starts at once and runs beside the others
# instead of after them on this 2-core machine)
TEST_JOBS ?= 2
test: $(TEST_STAMP)
	$(PY) -m pytest -q -n $(TEST_JOBS) --dist loadfile --no-loadscope-reorder tests

# the differential fuzzer's long profile: FUZZ_EXAMPLES cases per front door, mismatches counted (not
# stopped at), the counts printed at the end; `make test` runs a bounded profile of the same tests
FUZZ_EXAMPLES ?= 2000
fuzz: $(TEST_STAMP)
	FASTDISTILL_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) FASTDISTILL_FUZZ_COLLECT=1 $(PY) -m pytest -q -p no:cacheprovider \
		-W ignore::RuntimeWarning tests/test_fuzz.py

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
