# make demo: set up (venv, torch, build) and run the main job.   make test: the whole test suite.
PYTHON_BOOT ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A CUDA build of torch, so the CUDA kernels compile here too (no GPU needed to build).
TORCH ?= torch==2.14.1

.PHONY: setup build demo test bench clean

setup: $(VENV)/.ready

$(VENV)/.ready: Makefile
	$(PYTHON_BOOT) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)" numpy pytest ninja pybind11 cmake setuptools wheel
	touch $@

build: setup
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .

demo: build
	$(PY) -m sled_ext.cli demo

test: build
	$(PY) -m pytest -q python_tests

clean:
	rm -rf build sled_ext/*.so *.egg-info
