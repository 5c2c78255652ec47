"""Builds kl_fused._C: the CPU kernels always, the CUDA kernels when torch has CUDA and nvcc is found.

Environment:
  KL_FUSED_CPU_ONLY=1     skip the CUDA kernels even where they could be built
  TORCH_CUDA_ARCH_LIST    GPU architectures to build for (default here: "8.0;9.0")
  MAX_JOBS                parallel compile jobs (torch.utils.cpp_extension honours it)
"""

import glob
import os

import torch
from setuptools import setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_CUDA_ARCHS = "8.0;9.0"


def sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern), recursive=True))


def cuda_build_decision():
    """(build_cuda, reason) -- a missing toolkit is a printed reason, never a failed install."""
    if os.environ.get("KL_FUSED_CPU_ONLY", "0") not in ("", "0"):
        return False, "KL_FUSED_CPU_ONLY is set"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} was built without CUDA"
    if cpp_extension.CUDA_HOME is None or not os.path.exists(os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")):
        return False, "no CUDA toolkit found (put nvcc on PATH or set CUDA_HOME)"
    if not sources("csrc/cuda/*.cu"):
        return False, "no CUDA sources in csrc/cuda"
    return True, f"nvcc from {cpp_extension.CUDA_HOME}, torch CUDA {torch.version.cuda}"


def extension():
    build_cuda, reason = cuda_build_decision()
    # at::parallel_for is a header template: with torch's OpenMP backend its `omp parallel` only
    # runs in parallel if this extension itself is compiled and linked with OpenMP.
    openmp = torch.backends.openmp.is_available() and os.name != "nt"
    cxx_flags = ["-O3"] + (["-fopenmp"] if openmp else [])
    link_flags = ["-fopenmp"] if openmp else []
    cpp_sources = sources("csrc/*.cpp") + sources("csrc/cpu/*.cpp")
    if not build_cuda:
        print(f"kl_fused: building the CPU kernels only ({reason})")
        return cpp_extension.CppExtension(
            "kl_fused._C", cpp_sources, extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags
        )
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_CUDA_ARCHS)
    print(f"kl_fused: building CPU and CUDA kernels ({reason}; archs {os.environ['TORCH_CUDA_ARCH_LIST']})")
    return cpp_extension.CUDAExtension(
        "kl_fused._C",
        cpp_sources + sources("csrc/cuda/*.cu"),
        extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "-lineinfo"]},
        extra_link_args=link_flags,
    )


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension},
)
