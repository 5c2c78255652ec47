"""--keep-freed-memory: run the benchmark under a glibc malloc that keeps freed memory for reuse.

With glibc's defaults, every CPU buffer above the mmap threshold (a (rows x V) float32 tensor is
65 MB at 512 x 32000) is mapped fresh and unmapped when freed, so each step pays a page fault and
the kernel's zeroing for every page it writes. On this project's 2-core virtual machines that cost
is large and erratic (6 to 90 ms for one 65 MB float32 gradient at 512 x 32000, against about 3 ms
for a kernel to write it), and it falls hardest on the providers that allocate the most: eager
PyTorch maps several such buffers per step. jemalloc and tcmalloc, which PyTorch's CPU performance
guide recommends, keep freed memory instead. glibc's own tunables do the same without installing
anything; they must be set before the process starts, so the flag re-runs the benchmark with them.

Both figures are real: the default is what a PyTorch user gets out of the box, the other what
the kernels cost when freed memory is reused. Every record says which one it is.
"""

import os
import sys

# Never return memory to the system: no mmap for large blocks, no trimming of the heap's top.
KEEP_FREED_MEMORY_ENV = {
    "MALLOC_MMAP_THRESHOLD_": str(1 << 32),
    "MALLOC_TRIM_THRESHOLD_": str(1 << 36),
    "MALLOC_TOP_PAD_": str(1 << 30),
}


def keeps_freed_memory(environ=os.environ):
    return all(environ.get(name) == value for name, value in KEEP_FREED_MEMORY_ENV.items())


def allocator_description(environ=os.environ):
    """What every record's `allocator` field says."""
    if keeps_freed_memory(environ):
        settings = " ".join(f"{name}={value}" for name, value in KEEP_FREED_MEMORY_ENV.items())
        return f"glibc keeping freed memory ({settings})"
    return "default"


def rerun_keeping_freed_memory(argv):
    """Replaces this process by the same benchmark command with the tunables set (no return)."""
    environ = {**os.environ, **KEEP_FREED_MEMORY_ENV}
    command = [sys.executable, "-m", "kl_fused.bench", *argv]
    sys.stdout.flush()
    os.execve(sys.executable, command, environ)
