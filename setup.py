"""Builds sled_ext._C: the CPU kernels always, the CUDA kernels when nvcc and a CUDA build of torch
are present (no GPU needed). Environment overrides:
  SLED_WITH_CUDA=0|1        force the CUDA kernels off or on
  TORCH_CUDA_ARCH_LIST      GPU architectures (default "8.0;9.0": A100 and H100/H200)

The CPU row kernels (csrc/cpu/simd/) are compiled once per x86 level, DEFAULT, AVX2 and AVX512,
each with its own flags, and the library picks one at load time from the CPU (as torch does;
ATEN_CPU_CAPABILITY=default|avx2 forces a lower level). No other file gets ISA flags, so one build
runs on every x86-64 CPU.
"""
import glob
import os
import platform

# nvcc can be a wrapper script outside the toolkit (/usr/local/bin/nvcc here), which would make torch
# guess CUDA_HOME=/usr/local; point it at the toolkit unless the user chose one.
if not (os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")) and os.path.exists(
        "/usr/local/cuda/include/cuda_runtime.h"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch  # noqa: E402
from setuptools import setup
from torch.utils.cpp_extension import (  # noqa: E402
    CUDA_HOME, BuildExtension, CppExtension, CUDAExtension)

# Per level: the flags of torch's own kernels for it (ATen's vec headers read CPU_CAPABILITY_*).
X86_LEVELS = {
    "DEFAULT": [],
    "AVX2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2"],
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma",
               "-DCPU_CAPABILITY_AVX512"],
}
SIMD_SOURCES = glob.glob("csrc/cpu/simd/*.cpp")
ON_X86 = platform.machine().lower() in ("x86_64", "amd64")


def levels():
    return X86_LEVELS if ON_X86 else {"DEFAULT": []}


class BuildWithLevels(BuildExtension):
    """Compiles the SIMD sources once per level, with that level's flags, into its own folder,
    and links every copy into the extension."""

    def build_extension(self, ext):
        cxx = ext.extra_compile_args["cxx"]
        for level, flags in levels().items():
            ext.extra_objects += self.compiler.compile(
                SIMD_SOURCES, output_dir=os.path.join(self.build_temp, "simd", level),
                macros=ext.define_macros, include_dirs=ext.include_dirs,
                extra_postargs={"cxx": [*cxx, f"-DCPU_CAPABILITY={level}", *flags]})
        super().build_extension(ext)


def with_cuda() -> bool:
    forced = os.environ.get("SLED_WITH_CUDA")
    if forced is not None:
        return forced == "1"
    return torch.version.cuda is not None and CUDA_HOME is not None


def extension():
    # -fopenmp: at::parallel_for is an OpenMP pragma in ATen's headers; without the flag it
    # compiles to a serial loop (torch's cpp_extension does not add it).
    cxx = ["-O3", "-fopenmp", "-DPy_LIMITED_API=0x03090000",
           *(["-DSLED_X86_LEVELS"] if ON_X86 else [])]
    sources = ["csrc/sled_ops.cpp", "csrc/python_module.cpp", *glob.glob("csrc/cpu/*.cpp")]
    if not with_cuda():
        return CppExtension("sled_ext._C", sources, extra_compile_args={"cxx": cxx},
                            extra_link_args=["-fopenmp"], py_limited_api=True)
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")
    return CUDAExtension(
        "sled_ext._C",
        sources + glob.glob("csrc/cuda/*.cu"),
        define_macros=[("SLED_WITH_CUDA", None)],
        extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "--expt-relaxed-constexpr"]},
        extra_link_args=["-fopenmp"],
        py_limited_api=True,
    )


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildWithLevels},
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
