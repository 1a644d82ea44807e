# Two commands set everything up on a fresh machine (Python 3.11+, no GPU, no cloud account):
#   make demo   - create .venv, install, run the end-to-end QLoRA demo on the embedded default
#   make test   - create .venv, install, run the whole test suite (what CI runs)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.tunefleet-installed
export HF_HUB_OFFLINE ?= 1
export RAY_USAGE_STATS_ENABLED ?= 0

.PHONY: setup demo dashboard test test-fast clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	@# torch first and pinned: an unpinned torch can pull a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	@# constraints.txt pins every other version (and click<8.2, which skypilot needs).
	$(PY) -m pip install -q -c constraints.txt -e '.[train,local,s3,sky,server,dev]'
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	TUNEFLEET_HOME=$${TUNEFLEET_HOME:-$(CURDIR)/.tunefleet} $(VENV)/bin/tunefleet demo

# Two workers, each test file on one of them (module fixtures start their servers once): about
# 11 min instead of 18 on 2 cores. TEST_WORKERS=0 runs everything in one process.
TEST_WORKERS ?= 2

# The dashboard on the demo's state (or TUNEFLEET_HOME's): prints a login token, serves on :8477.
dashboard: setup
	TUNEFLEET_HOME=$${TUNEFLEET_HOME:-$(CURDIR)/.tunefleet} $(VENV)/bin/tunefleet dashboard

test: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test-fast: setup
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m "not slow"

clean:
	rm -rf $(VENV) .tunefleet .pytest_cache
