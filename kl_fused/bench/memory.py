"""Peak memory of one benchmark step beyond what existed before it.

CUDA: the caching allocator's own counters (torch.cuda.max_memory_allocated), an allocator-level
measurement of the tensors the step allocates.

CPU: peak resident set size (RSS) of a fresh process per measurement. The child process builds the
inputs, runs the step once untimed (compilation and first touches happen there), drops the
gradients it left, resets the kernel's peak-RSS counter (`echo 5 > /proc/self/clear_refs`),
reads its RSS, runs the step again and reads the peak RSS (VmHWM): peak minus the RSS before
the step is what the step needed at its peak, including the gradients it returns. glibc is told to
serve every allocation from 64 KiB up with mmap (MALLOC_MMAP_THRESHOLD_), so that memory a step
frees goes back to the system instead of staying in malloc's free lists, where the next step
would reuse it without the RSS showing it.

A mode measures a provider on the CPU with measure_cpu_peak(builder, kwargs), where builder is
"module:function" and function(**kwargs) returns (step, tensors whose .grad the step fills).
"""

import importlib
import json
import os
import re
import subprocess
import sys

import torch

MMAP_THRESHOLD_BYTES = 64 * 1024


def cuda_peak_mib(step, device):
    """Memory one step allocates at its peak beyond what was allocated before it."""
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - before) / 2**20


def _status_kib(field):
    with open("/proc/self/status") as status:
        return int(re.search(rf"^{field}:\s+(\d+) kB", status.read(), re.MULTILINE).group(1))


def _child(spec):
    torch.set_num_threads(spec["threads"])
    module_name, _, function_name = spec["builder"].partition(":")
    step, with_grads = getattr(importlib.import_module(module_name), function_name)(**spec["kwargs"])
    step()
    for tensor in with_grads:
        tensor.grad = None
    return step_peak_rss(step)


def step_peak_rss(step):
    """{"rss_before_mib", "peak_above_mib"} of one run of step in this process (after a warm-up run, with
    the gradients it left dropped; under MALLOC_MMAP_THRESHOLD_ for freed memory to show)."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # reset VmHWM to the current RSS
    before = _status_kib("VmRSS")
    step()
    peak = _status_kib("VmHWM")
    return {"rss_before_mib": before / 1024, "peak_above_mib": (peak - before) / 1024}


def measure_cpu_peak(builder, kwargs, timeout_s=3600):
    """{"rss_before_mib", "peak_above_mib"} of one step measured in a fresh process (see above).

    Raises RuntimeError with the child's last output lines when it fails (out of memory included:
    the kernel's OOM killer ends it with SIGKILL).
    """
    spec = json.dumps({"builder": builder, "kwargs": kwargs, "threads": torch.get_num_threads()})
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD_BYTES)}
    child = subprocess.run(
        [sys.executable, "-m", "kl_fused.bench.memory", spec],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout_s,
    )
    if child.returncode != 0:
        tail = "\n".join((child.stdout + child.stderr).strip().splitlines()[-3:])
        killed = " (killed: out of memory?)" if child.returncode == -9 else ""
        raise RuntimeError(f"memory probe exited with {child.returncode}{killed}: {tail}")
    return json.loads(child.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    print(json.dumps(_child(json.loads(sys.argv[1]))))
