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

# one pytest-xdist worker per core, each on one torch thread (tests/conftest.py): 140 s on 2 idle cores, 268 s serial
test: setup
	HF_HUB_OFFLINE=1 $(VENV)/bin/python -m pytest -n auto

bench-perf: setup
	HF_HUB_OFFLINE=1 OMP_NUM_THREADS=$${OMP_NUM_THREADS:-$$(nproc)} $(VENV)/bin/python -m pytest tests/benchmarks -m "not slow" --benchmark-enable -s --benchmark-columns=min,median,max

# The device check in one call (bench/gpu_check): CUDA tests, throughput, real early-exit timing, a short CIFAR-10
# run; one JSON and one markdown file in $(OUT) (else results/gpu-check/). It runs on the interpreter GPU_PYTHON:
# PYTHON when given on the command line, else .venv's if it exists, else python3 (a lent GPU machine: torch and
# timm preinstalled; no venv, no fvcore, no network). Nothing is installed when that interpreter imports what the
# check needs; only when it does not, `make setup`, then .venv's. DATA=PATH names the CIFAR-10 archive (default:
# shared/data/cifar10-jpeg.tar.gz, then ../shared/data/), ARGS more options. The dry run: CPU, tiny, about a
# minute, with fvcore blocked as on a lent machine.
GPU_CHECK_IMPORTS := torch, timm, numpy, scipy, pandas, sklearn, PIL, matplotlib, seaborn, tqdm
ifeq ($(origin PYTHON),command line)
GPU_PYTHON ?= $(PYTHON)
else
GPU_PYTHON ?= $(if $(wildcard $(VENV)/bin/python),$(VENV)/bin/python,python3)
endif

define gpu_check
	@py="$(GPU_PYTHON)"; \
	if ! "$$py" -c "import $(GPU_CHECK_IMPORTS)" >/dev/null 2>&1; then \
		echo "gpu-check: $$py cannot import $(GPU_CHECK_IMPORTS): make setup"; \
		$(MAKE) --no-print-directory setup || exit 1; \
		py=$(VENV)/bin/python; \
	fi; \
	echo "gpu-check: interpreter $$py ($$("$$py" -c 'import sys; print(sys.executable, sys.version.split()[0])'))"; \
	"$$py" -m bench.gpu_check $(1) --out "$(or $(OUT),$(2))" $(if $(DATA),--data "$(DATA)") $(ARGS)
endef

gpu-check:
	$(call gpu_check,,results/gpu-check)

gpu-check-dry:
	$(call gpu_check,--dry --no-fvcore,results/gpu-check-dry)

clean-venv:
	rm -rf $(VENV)
