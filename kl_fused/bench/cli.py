"""The kl-fused-bench command line: the options every mode shares, then each mode's own flags.

The modes are listed in MODES; the first one whose flag is given runs, and the KL mode (no flag)
is the default. A new mode is one file defining its Mode (options.py) and one entry here.
"""

import argparse
import math
import sys

import torch

from kl_fused.bench import cache, distill, jsd, kl, linear, sparse, vocab_parallel
from kl_fused.bench.allocator import keeps_freed_memory, rerun_keeping_freed_memory
from kl_fused.bench.environment import describe_environment
from kl_fused.bench.options import DEFAULT_REPS, DTYPES, check_output_path, resolve_device

# The default mode last: it is selected whenever no other mode's flag is given.
MODES = (vocab_parallel.MODE, jsd.MODE, linear.MODE, sparse.MODE, distill.MODE, cache.MODE, kl.MODE)


def _providers_help():
    parts = []
    for mode in MODES:
        if mode.providers:
            listed = "; ".join(f"{name} ({description})" for name, description in mode.providers.items())
            parts.append(f"{mode.name} mode: {listed}")
    return "comma list of providers, " + ". ".join(parts) + " (default: all available)"


def build_parser():
    parser = argparse.ArgumentParser(
        prog="kl-fused-bench",
        description="Benchmark kl_fused.kl_div_logits against eager, torch.compile, the reference and Liger.",
        epilog="Without --cases/--rows/--vocab/--dtype the device's default cases run; with some of "
        "--rows/--vocab/--dtype their cross product runs, the others defaulting to "
        "rows 512 (cpu) or 4096 (cuda), vocab 32000, dtype bfloat16.",
    )
    parser.add_argument("--providers", metavar="LIST", help=_providers_help())
    parser.add_argument("--device", help="cpu or cuda (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", dest="dtypes", metavar="LIST", help=f"comma list of {', '.join(DTYPES)}")
    parser.add_argument("--rows", metavar="LIST", help="comma list of row counts")
    parser.add_argument("--vocab", metavar="LIST", help="comma list of vocabulary sizes")
    parser.add_argument("--cases", metavar="LIST", help="explicit cases, e.g. 512x32000:float32,64x128256:bfloat16")
    parser.add_argument("--temperature", type=float, default=1.0, metavar="T", help="softmax temperature (default 1)")
    parser.add_argument("--warmup", type=int, default=3, metavar="N", help="untimed steps per provider (default 3)")
    parser.add_argument("--reps", type=int, metavar="N", help="timed steps per provider (default 10 cpu, 50 cuda)")
    parser.add_argument("--json", metavar="PATH", help="write one record per provider, case and pass")
    parser.add_argument("--no-check", action="store_true", help="skip the agreement check against float64")
    parser.add_argument("--threads", type=int, metavar="N", help="torch.set_num_threads(N) before running")
    parser.add_argument("--keep-freed-memory", action="store_true",
                        help="cpu: re-run under glibc settings that keep freed memory for reuse (as jemalloc or "
                        "tcmalloc would), so that no provider pays fresh-page faults; each record's "
                        "`allocator` says which (kl_fused/bench/allocator.py)")
    for mode in MODES:
        mode.add_arguments(parser)
    return parser


def _selected_mode(args):
    flagged = [mode for mode in MODES[:-1] if mode.selected(args)]
    if len(flagged) > 1:
        raise ValueError(f"choose one mode, got {' and '.join('--' + mode.name for mode in flagged)}")
    return flagged[0] if flagged else MODES[-1]


def parse_args(argv):
    """Parsed and validated arguments, with the device, the mode and its options resolved."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.device = resolve_device(args.device)
        if args.reps is None:
            args.reps = DEFAULT_REPS[args.device.type]
        if args.reps < 1 or args.warmup < 0:
            raise ValueError("--reps must be at least 1 and --warmup at least 0")
        if not (math.isfinite(args.temperature) and args.temperature > 0):
            raise ValueError(f"--temperature must be finite and positive, got {args.temperature}")
        if args.threads is not None and args.threads < 1:
            raise ValueError(f"--threads must be at least 1, got {args.threads}")
        if args.keep_freed_memory and args.device.type != "cpu":
            raise ValueError("--keep-freed-memory is for --device cpu (PyTorch's caching allocator reuses CUDA memory)")
        for flag, path in (("--json", args.json), ("--plot", getattr(args, "plot", None))):
            if path:
                check_output_path(path, flag)
        args.mode = _selected_mode(args)
        args.mode.resolve(args)
    except ValueError as error:
        parser.error(str(error))
    return args


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.keep_freed_memory and not keeps_freed_memory():
        rerun_keeping_freed_memory(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    environment = describe_environment(args.device)
    print(
        f"kl_fused {environment['kl_fused_version']}, torch {environment['torch_version']}, "
        f"{environment['device']} ({environment['device_name']}), {environment['threads']} threads, "
        f"fused kernel available: {environment['fused_available']}"
    )
    return args.mode.run(args, environment)
