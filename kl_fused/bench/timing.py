"""Timing shared by the benchmark modes: a first untimed run of every provider (catching what
raises or runs out of memory), then interleaved timed repetitions, summarised by percentiles.

Providers are interleaved round-robin, in an order rotated at every repetition, so that drift
(clocks, other load on a shared machine) hits them all alike. CPU steps are timed with
time.perf_counter, CUDA steps with a pair of CUDA events each, read after one final synchronize.
"""

import math
import time

import torch


def _timed_cpu(step):
    start = time.perf_counter()
    step()
    elapsed_ms = (time.perf_counter() - start) * 1e3
    return lambda: elapsed_ms


def _timed_cuda(step):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    step()
    end.record()
    return lambda: start.elapsed_time(end)  # read after the final synchronize


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(steps, warmup, reps, device):
    """{name: [ms per step]}: warm-up, then every rep runs each step once, in an order rotated per rep."""
    names = list(steps)
    rotations = [names[i % len(names) :] + names[: i % len(names)] for i in range(len(names))]
    for rep in range(warmup):
        for name in rotations[rep % len(names)]:
            steps[name]()
    timed = _timed_cuda if device.type == "cuda" else _timed_cpu
    synchronize(device)
    pending = {name: [] for name in names}
    for rep in range(reps):
        for name in rotations[rep % len(names)]:
            pending[name].append(timed(steps[name]))
    synchronize(device)
    return {name: [elapsed() for elapsed in readings] for name, readings in pending.items()}


def percentile(samples, fraction):
    """Linear interpolation between the closest ranks, as numpy's default."""
    ordered = sorted(samples)
    position = fraction * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def summarize(samples):
    """{"median_ms", "p10_ms", "p90_ms"} of a list of milliseconds."""
    return {f"{name}_ms": percentile(samples, q) for name, q in (("median", 0.5), ("p10", 0.1), ("p90", 0.9))}


def first_runs(runs, keep_outputs):
    """Run each of {name: run} once (this is also when a compiled provider compiles).

    Returns (outputs, failures, skipped): outputs {name: what run returned} when keep_outputs,
    failures {name: how it raised}, skipped {name: why it could not run (out of memory)}.
    """
    outputs, failures, skipped = {}, {}, {}
    for name, run in runs.items():
        try:
            output = run()
        except torch.cuda.OutOfMemoryError:
            skipped[name] = "out of memory"
            torch.cuda.empty_cache()
            continue
        except Exception as error:
            failures[name] = f"raised {type(error).__name__}: {error}"
            continue
        if keep_outputs:
            outputs[name] = output
    return outputs, failures, skipped
