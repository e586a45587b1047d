# Two commands on a fresh machine:  `make demo`  and  `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export HF_HUB_OFFLINE := 1
export PYTHONUNBUFFERED := 1

.PHONY: demo test test-slow test-full-size-sdxl install bench clean-demo

# Run the demo sweep through a real Prefect deployment (server, work pool, worker) and print the report path.
demo: $(VENV)/.installed
	$(PY) -m flows.run_demo --deployment demo

# Install what is missing, then run the test suite (this is what CI runs).
test: $(VENV)/.installed
	bash tests/install_chromium.sh || true
	$(PY) -m pytest

# The multi-process checks (Dask LocalCluster, two Prefect workers), the world model's LoRA story and the
# full-size SD1.5/SDXL checks (models built once into LORA_SWEEP_FULL_SIZE_CACHE, default ~/.cache/lora-sweep).
test-slow: $(VENV)/.installed
	$(PY) -m pytest -m slow

# The full-size SDXL checks on the CPU (bf16, 2.6B-parameter UNet): about 40 minutes on 2 busy cores, so not in
# test-slow. Builds the SDXL folder and single file (6.9 GB each) into the cache first if they are not there.
test-full-size-sdxl: $(VENV)/.installed
	LORA_SWEEP_FULL_SIZE_SDXL=1 $(PY) -m pytest tests/test_full_size.py -m "slow or not slow" -k sdxl

bench: $(VENV)/.installed
	$(PY) -m bench

install: $(VENV)/.installed

# torch first: 2.13.0 comes as a CPU wheel from this machine's disk; the project's range then installs nothing more.
$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	touch $@

clean-demo:
	rm -rf outputs/demo
