"""Builds kl_fused._C: the CPU kernels always, the CUDA kernels when torch has CUDA and nvcc is found.

Environment:
  KL_FUSED_CPU_ONLY=1     skip the CUDA kernels even where they could be built
  TORCH_CUDA_ARCH_LIST    GPU architectures to build for (default here: "8.0;9.0;10.0;12.0+PTX": Ampere,
                          Hopper, Blackwell data-centre and consumer cubins, and PTX that newer GPUs JIT)
  MAX_JOBS                parallel compile jobs (torch.utils.cpp_extension honours it)
"""

import glob
import os

import shutil

from setuptools import setup


def _toolkit_root(path):
    return path if path and os.path.exists(os.path.join(path, "include", "cuda_runtime.h")) else None


def locate_cuda_home():
    """torch guesses CUDA_HOME from `which nvcc`; where nvcc is a wrapper outside the toolkit
    (/usr/local/bin/nvcc here), that guess lacks the headers and libcudart. Prefer a directory that
    has them: $CUDA_HOME/$CUDA_PATH as given, else nvcc's real location, else /usr/local/cuda."""
    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    nvcc = shutil.which("nvcc")
    candidates = [os.path.dirname(os.path.dirname(os.path.realpath(nvcc))) if nvcc else None, "/usr/local/cuda"]
    for candidate in candidates:
        if _toolkit_root(candidate):
            os.environ["CUDA_HOME"] = candidate
            return


locate_cuda_home()

import torch  # noqa: E402  (after CUDA_HOME is settled: cpp_extension reads it on import)
from torch.utils import cpp_extension  # noqa: E402

ROOT = os.path.dirname(os.path.abspath(__file__))
# Cubins for sm_80 (A100; also runs on sm_86, sm_87, sm_89: RTX 30xx/40xx, L4, L40), sm_90 (H100, H200),
# sm_100 (B200, GB200; also sm_103) and sm_120 (RTX 50xx, RTX PRO 6000; also sm_121), and compute_120 PTX
# that the driver compiles for GPUs newer than all of them. Other GPUs (sm_75, sm_110) run the reference.
DEFAULT_CUDA_ARCHS = "8.0;9.0;10.0;12.0+PTX"


def cuda_arch_codes():
    """What nvcc builds, as torch reads TORCH_CUDA_ARCH_LIST: "sm_80,sm_90,...,compute_120" (compute_XY
    for PTX). Compiled into the extension as kl_fused._C.cuda_archs, which says at run time which GPUs
    have a kernel image (kl_fused/_cuda_archs.py)."""
    codes = set()
    for flag in cpp_extension._get_cuda_arch_flags():
        codes.update(flag.rsplit("code=", 1)[-1].strip("[]").split(","))
    return ",".join(sorted(codes, key=lambda code: (code.startswith("compute"), int(code.split("_")[1]))))


def sources(pattern):
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern), recursive=True))


def cuda_build_decision():
    """(build_cuda, reason) -- a missing toolkit is a printed reason, never a failed install."""
    if os.environ.get("KL_FUSED_CPU_ONLY", "0") not in ("", "0"):
        return False, "KL_FUSED_CPU_ONLY is set"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} was built without CUDA"
    home = cpp_extension.CUDA_HOME
    if home is None or not os.path.exists(os.path.join(home, "bin", "nvcc")) or not _toolkit_root(home):
        return False, f"no complete CUDA toolkit found (CUDA_HOME={home}; set CUDA_HOME to the toolkit's root)"
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
    archs = cuda_arch_codes()
    print(f"kl_fused: building CPU and CUDA kernels ({reason}; TORCH_CUDA_ARCH_LIST "
          f"{os.environ['TORCH_CUDA_ARCH_LIST']}: {archs})")
    return cpp_extension.CUDAExtension(
        "kl_fused._C",
        cpp_sources + sources("csrc/cuda/*.cu"),
        extra_compile_args={"cxx": cxx_flags + [f"-DKL_FUSED_CUDA_ARCHS={archs}"], "nvcc": ["-O3", "-lineinfo"]},
        extra_link_args=link_flags,
    )


if __name__ == "__main__":  # pip's build backend runs this file as __main__ too; tests import it for the lists
    setup(
        ext_modules=[extension()],
        cmdclass={"build_ext": cpp_extension.BuildExtension},
    )
