# make demo: set up (venv, torch, build) and run the main job.   make test: the whole test suite
# (and the op tests under each lower x86 level: make test-levels).
# make cpp-test: the CMake build of the op library for libtorch (C++) users, and its ctest.
PYTHON_BOOT ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A CUDA build of torch, so the CUDA kernels compile here too (no GPU needed to build).
TORCH ?= torch==2.14.1
# cmake from the venv (pip): the same recent version on every machine, whatever the system has.
CMAKE ?= $(VENV)/bin/cmake
CTEST ?= $(VENV)/bin/ctest
CMAKE_BUILD_DIR ?= build-cmake

.PHONY: setup build demo test test-levels cpp-test bench clean

setup: $(VENV)/.ready

$(VENV)/.ready: Makefile
	$(PYTHON_BOOT) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH)" numpy pytest hypothesis ninja pybind11 cmake setuptools wheel \
		"transformers==5.24.0" gguf accelerate "lm-eval==0.4.13"
	touch $@

build: setup
	$(PY) -m pip install -q --no-build-isolation --no-deps -e .

demo: build
	$(PY) -m sled_ext.cli compare

test: build
	$(PY) -m pytest -q python_tests
	$(MAKE) test-levels
	$(MAKE) cpp-test

# The op tests again under each lower x86 level this CPU runs (the kernels pick one at load time).
test-levels: build
	for level in $$($(PY) -c 'import torch; levels = ["default", "avx2", "avx512"]; \
	        best = torch.backends.cpu.get_cpu_capability().lower(); \
	        print(*levels[:levels.index(best)] if best in levels else [])'); do \
	    echo "ATEN_CPU_CAPABILITY=$$level"; \
	    ATEN_CPU_CAPABILITY=$$level $(PY) -m pytest -q python_tests/test_ops.py \
	        python_tests/test_distributed.py || exit 1; \
	done

cpp-test: setup
	$(CMAKE) -S . -B $(CMAKE_BUILD_DIR) -DCMAKE_BUILD_TYPE=Release \
		-DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')"
	$(CMAKE) --build $(CMAKE_BUILD_DIR) -j2
	$(CTEST) --test-dir $(CMAKE_BUILD_DIR) --output-on-failure

clean:
	rm -rf build sled_ext/*.so *.egg-info
