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

.PHONY: setup demo test test-fast clean

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

test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(VENV) .tunefleet .pytest_cache
