# `make run`  - set up .venv and run the default job (ray_config.yaml) end to end.
# `make test` - set up .venv and run the test suite (what CI runs).
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: setup run test test-unit test-integration test-gpu

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	# torch first and pinned: an unpinned torch pulls a multi-GB CUDA build.
	$(VENV)/bin/pip install -q torch==2.13.0
	$(VENV)/bin/pip install -q -r requirements.txt -r requirements-dev.txt
	$(VENV)/bin/pip install -q --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

run: setup
	$(VENV)/bin/rayfine run ray_config.yaml --detach

# Two pytest-xdist workers, each with its own Ray: one worker's Ray start-ups and imports fill the other's waits.
# Tests run in groups, the longest first (tests/conftest.py).
XDIST := -n 2

test: setup
	$(VENV)/bin/python -m pytest -q $(XDIST) --durations=15 tests

test-unit: setup
	$(VENV)/bin/python -m pytest -q tests/unit

test-integration: setup
	$(VENV)/bin/python -m pytest -q $(XDIST) tests/integration

test-gpu: setup
	$(VENV)/bin/python -m pytest -q tests/gpu
