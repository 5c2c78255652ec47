"""What the vocab-parallel modes share (vocab_parallel.py, vocab_parallel_linear.py): spawning N gloo ranks,
timing a step on all of them, the shard widths, and ending a rank."""

import json
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def shard_widths(vocab, ranks):
    """Widths as even as possible; the first vocab % ranks shards get one more."""
    base, extra = divmod(vocab, ranks)
    return [base + (1 if r < extra else 0) for r in range(ranks)]


def time_on_ranks(steps, warmup, reps):
    """{name: [ms per step]} of each of `steps` run on every rank of the default group: warm-up, then
    each timed step from a barrier to its end on the slowest rank."""
    timings = {}
    for name, fn in steps.items():
        for _ in range(warmup):
            fn()
        samples = []
        for _ in range(reps):
            dist.barrier()
            began = time.perf_counter()
            fn()
            elapsed = torch.tensor([(time.perf_counter() - began) * 1e3], dtype=torch.float64)
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # a step lasts as long as its slowest rank
            samples.append(elapsed.item())
        timings[name] = samples
    return timings


def exit_rank():
    """A rank that succeeded ends without Python's finalisation: a gloo worker thread may still be
    releasing a finished all_reduce's tensors then, needs the GIL, and aborts the process (a torch race
    seen here about once in 12 runs; tests/vocab_parallel_workers.py has the trace)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def run_ranks(rank_main, ranks, payload, env=None):
    """Spawns `ranks` gloo processes running rank_main(rank, ranks, init_file, out_file, *payload); returns
    what rank 0 wrote to out_file (JSON). `env`: variables the ranks start with."""
    saved = {key: os.environ.get(key) for key in (env or {})}
    os.environ.update(env or {})
    try:
        with tempfile.TemporaryDirectory() as tmp:
            out_file = os.path.join(tmp, "rank0.json")
            mp.start_processes(rank_main, args=(ranks, os.path.join(tmp, "rendezvous"), out_file, *payload),
                               nprocs=ranks, join=True, start_method="spawn")
            with open(out_file) as result:
                return json.load(result)
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
