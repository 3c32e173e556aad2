"""Builds sled_ext._C: the CPU kernels always, the CUDA kernels when nvcc and a CUDA build of torch
are present (no GPU needed). Environment overrides:
  SLED_WITH_CUDA=0|1        force the CUDA kernels off or on
  TORCH_CUDA_ARCH_LIST      GPU architectures (default "8.0;9.0": A100 and H100/H200)
  SLED_CPU_CAPABILITY       DEFAULT, AVX2 or AVX512: the SIMD set of the CPU kernel (default: what
                            torch detects on the building machine, so build where you run)
"""
import glob
import os

# nvcc can be a wrapper script outside the toolkit (/usr/local/bin/nvcc here), which would make torch
# guess CUDA_HOME=/usr/local; point it at the toolkit unless the user chose one.
if not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")) and os.path.exists(
        "/usr/local/cuda/include/cuda_runtime.h"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch  # noqa: E402
from setuptools import setup
from torch.utils.cpp_extension import (  # noqa: E402
    CUDA_HOME, BuildExtension, CppExtension, CUDAExtension)

CPU_FLAGS = {
    "DEFAULT": [],
    "AVX2": ["-mavx2", "-mfma", "-DCPU_CAPABILITY_AVX2"],
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma",
               "-DCPU_CAPABILITY_AVX512"],
}


def cpu_capability() -> str:
    wanted = os.environ.get("SLED_CPU_CAPABILITY") or torch.backends.cpu.get_cpu_capability()
    return wanted if wanted in CPU_FLAGS else "DEFAULT"


def with_cuda() -> bool:
    forced = os.environ.get("SLED_WITH_CUDA")
    if forced is not None:
        return forced == "1"
    return torch.version.cuda is not None and CUDA_HOME is not None


def extension():
    capability = cpu_capability()
    cxx = ["-O3", f"-DCPU_CAPABILITY={capability}", *CPU_FLAGS[capability],
           "-DPy_LIMITED_API=0x03090000"]
    sources = ["csrc/sled_ops.cpp", "csrc/python_module.cpp", *glob.glob("csrc/cpu/*.cpp")]
    if not with_cuda():
        return CppExtension("sled_ext._C", sources, extra_compile_args={"cxx": cxx},
                            py_limited_api=True)
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    return CUDAExtension(
        "sled_ext._C",
        sources + glob.glob("csrc/cuda/*.cu"),
        define_macros=[("SLED_WITH_CUDA", None)],
        extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--expt-relaxed-constexpr"]},
        py_limited_api=True,
    )


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
