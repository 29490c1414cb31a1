# The two commands of the README: `make demo` (set up, run the main job on the embedded digits data) and
# `make test` (set up if needed, run the test suite). Setup is a virtualenv in .venv from pinned requirements,
# then this project installed in editable mode (pyproject.toml: no dependencies of its own), so `bench` imports
# from any directory (Dask workers started elsewhere) and .venv/bin/bench exists.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench-perf clean-venv

setup: $(STAMP)

$(STAMP): requirements.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check --no-cache-dir -r requirements.txt
	$(VENV)/bin/python -m pip install --quiet --disable-pip-version-check --no-cache-dir --no-deps \
		--no-build-isolation -e .
	touch $(STAMP)

demo: setup
	$(VENV)/bin/python -m bench run --methods threshold,entropy --dataset digits

test: setup
	HF_HUB_OFFLINE=1 $(VENV)/bin/python -m pytest

bench-perf: setup
	HF_HUB_OFFLINE=1 $(VENV)/bin/python -m pytest tests/benchmarks -m perf -s --benchmark-columns=min,median,max

clean-venv:
	rm -rf $(VENV)
