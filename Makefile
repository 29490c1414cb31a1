# The two commands of the README: `make demo` (set up, run the main job on the embedded digits data) and
# `make test` (set up if needed, run the test suite). Setup is a virtualenv in .venv from pinned requirements,
# then this project installed in editable mode (pyproject.toml: no dependencies of its own), so `bench` imports
# from any directory (Dask workers started elsewhere) and .venv/bin/bench exists.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench-perf gpu-check gpu-check-dry clean-venv

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

# the device check in one call (bench/gpu_check.py): CUDA tests, throughput, real early-exit timing, a short
# CIFAR-10 run; one JSON and one markdown file in $OUT (else results/gpu-check/). The dry run: CPU, tiny, < 2 min
gpu-check: setup
	$(VENV)/bin/python -m bench.gpu_check --out $${OUT:-results/gpu-check}

gpu-check-dry: setup
	$(VENV)/bin/python -m bench.gpu_check --dry --out $${OUT:-results/gpu-check-dry}

clean-venv:
	rm -rf $(VENV)
