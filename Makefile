# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# Both create .venv with pip (torch comes from the local wheel cache where there is one).
VENV ?= .venv
# A Python 3.11 (pyproject.toml); elsewhere: make demo PYTHON=python3.11
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# anomalib's coreset loop fragments glibc's heap unless large blocks are mmapped (harness/malloc.py,
# docs/performance.md).
export MALLOC_MMAP_THRESHOLD_ := 1048576

.PHONY: install demo example test test-fast lint bench

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m pip install --quiet --no-deps 'rliable==1.2.0'  # tests only; its arch<8 pin: pyproject.toml
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/harness demo

# The committed example report (reports/demo.md and its plots): a fresh demo, reported there.
example: $(STAMP)
	rm -rf demo
	$(VENV)/bin/harness demo --out demo
	$(VENV)/bin/harness report demo/results --out reports/demo.md

test: $(STAMP)
	$(PY) -m pytest

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow"

lint: $(STAMP)
	$(VENV)/bin/ruff check harness tests benchmarks
	$(VENV)/bin/ruff format --check harness tests benchmarks
	$(VENV)/bin/mypy

# The benchmarks of benchmarks/, and tests/bench/ at full settings (it runs short in `make test`).
bench: $(STAMP)
	mkdir -p .benchmarks
	HARNESS_BENCH=full $(PY) -m pytest benchmarks tests/bench --benchmark-only \
		--benchmark-columns=min,max,mean,rounds --benchmark-json=.benchmarks/run.json
