"""kl-fused-bench: kl_fused's losses timed against the ways users compute the same thing.

    kl-fused-bench [options]             kl_div_logits on logits (kl.py), the default
    kl-fused-bench --vocab-parallel N    the vocab-parallel loss on N gloo processes (vocab_parallel.py)
    kl-fused-bench --jsd                 jsd_logits (generalized JSD) against TRL and Liger (jsd.py)
    kl-fused-bench --linear              linear_kl_div from hidden states and the lm_head (linear.py)
    kl-fused-bench --sparse              sparse_kl_div from a teacher's top-k (sparse.py)
    kl-fused-bench --cache               the teacher top-k store, kl_fused.cache (cache.py)

One file per mode, around a shared core: logits_pass.py (one checked and timed case and pass of a
loss on logits, for the provider-comparing modes), options.py (the Mode record, argument helpers), cases.py
(logits cases and inputs), timing.py (first runs, interleaved timing, percentiles), agreement.py
(the check against a float64 reference), memory.py (peak memory per step, CUDA allocator or CPU
peak RSS of a fresh process), report.py (tables, JSON, failures) and environment.py (what every
record says about the machine). cli.py parses the command line and runs the selected mode; the
modes import the core only, never each other or cli.py.
"""


def main(argv=None):
    """Entry point of `kl-fused-bench` and `python -m kl_fused.bench`; returns the exit code.

    (Imported on call, so that `python -m kl_fused.bench.memory`, the memory probe's child
    process, does not import its own module through the package first.)"""
    from kl_fused.bench.cli import main as cli_main

    return cli_main(argv)
