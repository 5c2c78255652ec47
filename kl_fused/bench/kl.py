"""The default mode: kl_fused.kl_div_logits against the ways users compute the same loss on logits.

    kl-fused-bench [--cases 512x32000:float32,64x128256:bfloat16] [--pass fwd,fwd+bwd] ...

What is measured. For each case (rows x vocab logits of one dtype) and pass, every provider (see
kl_providers.py) computes the batchmean KL(softmax(t/T) || softmax(s/T)) on the same random
inputs. `fwd` times the loss of a student that does not require grad; `fwd+bwd` times one training
step of the loss: drop the student's .grad, compute the loss, call backward.

How. Before timing, each provider runs once (which is also when `compile` compiles) and its loss
and student gradient are compared with the pure-PyTorch reference evaluated in float64 on the same
inputs; a provider that disagrees or raises is reported and left out of the timing, and the exit
code becomes 1. Timing then interleaves the providers (timing.py). Reported: the median and the
10th/90th percentiles in ms.

Bytes. Achieved GB/s is the floor of the design notes divided by the median time, with N*V
elements of e bytes each: `fwd` reads s and t, 2e per element; `fwd+bwd` also writes the student
gradient, 3e per element. A device-to-device copy of one input-sized buffer (read + write, 2e per
element) is timed in the same rotation, and each provider is also given as a fraction of that
copy's bandwidth. On the CPU the floor is arithmetic rather than bytes, so there the copy is
context, not a ceiling. On CUDA the peak memory of one step beyond the inputs is reported too.
"""

import sys

import kl_fused
from kl_fused import reference
from kl_fused.bench.cases import cases_from_args, make_inputs
from kl_fused.bench.kl_providers import PROVIDERS
from kl_fused.bench.logits_pass import PASSES, bench_pass, results_table
from kl_fused.bench.options import Mode, available_providers, choices
from kl_fused.bench.report import report_failures, write_json

DEFAULT_PASSES = {"cpu": "fwd+bwd", "cuda": "fwd,fwd+bwd"}


# ---------------------------------------------------------------------------- command line


def add_arguments(parser):
    parser.add_argument(
        "--pass",
        dest="passes",
        metavar="LIST",
        help="fwd, fwd+bwd, or both comma-separated (default: fwd+bwd on cpu, both on cuda)",
    )
    parser.add_argument("--plot", metavar="PATH", help="plot GB/s against vocab to a PNG (needs matplotlib)")


def resolve(args):
    device_type = args.device.type
    args.cases = cases_from_args(args, device_type)
    args.passes = choices(args.passes or DEFAULT_PASSES[device_type], PASSES, "pass")
    args.providers = choices(args.providers or ",".join(PROVIDERS), PROVIDERS, "provider")


# ---------------------------------------------------------------------------- one case and pass


def kl_pass(case, pass_name, student, teacher, args, environment):
    """bench_pass (logits_pass.py) with the KL providers, checked against the KL reference."""
    loss_fns = {name: PROVIDERS[name].build(args.temperature) for name in args.providers}

    def block_sum(s, t):
        return reference.kl_div_logits(s, t, temperature=args.temperature, reduction="sum")

    return bench_pass(case, pass_name, student, teacher, loss_fns, block_sum, args, environment)


def drop_unavailable_providers(args):
    """Remove the providers that cannot run on this device, printing why; note a fused fallback."""
    args.providers = available_providers(args.providers, PROVIDERS, args.device)
    if "fused" in args.providers and not kl_fused.is_fused_available(args.device):
        reason = kl_fused.fused_unavailable_reason(args.device)
        print(f"note: NO FUSED KERNEL for {args.device.type} ({reason}): 'fused' times the reference fallback")


# ---------------------------------------------------------------------------- report


def plot_gbps(path, records):
    """One panel per (dtype, pass): achieved GB/s against vocab, a line per provider (and row count)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"note: matplotlib is not importable; no plot written to {path}")
        return
    panels = sorted({(record["dtype"], record["pass"]) for record in records})
    if not panels:
        print("note: nothing was timed; no plot written")
        return
    figure, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for axis, (dtype_name, pass_name) in zip(axes[0], panels):
        _plot_panel(axis, [r for r in records if (r["dtype"], r["pass"]) == (dtype_name, pass_name)])
        axis.set_title(f"{dtype_name} {pass_name} on {records[0]['device_name']}")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    print(f"wrote plot to {path}")


def _plot_panel(axis, records):
    """GB/s against vocab per (provider, rows), and the copy's GB/s dashed for context."""
    providers, copies = {}, {}
    for record in sorted(records, key=lambda record: record["vocab"]):
        providers.setdefault((record["provider"], record["rows"]), []).append((record["vocab"], record["gbps"]))
        copies.setdefault(record["rows"], {})[record["vocab"]] = record["copy_gbps"]
    for (provider, rows), points in sorted(providers.items()):
        axis.plot(*zip(*points), marker="o", label=f"{provider}, {rows} rows")
    for rows, by_vocab in sorted(copies.items()):
        axis.plot(list(by_vocab), list(by_vocab.values()), linestyle="--", color="gray", label=f"copy, {rows} rows")
    axis.set_xscale("log")
    axis.set_xlabel("vocab")
    axis.set_ylabel("GB/s (floor bytes / median time)")
    axis.legend(fontsize="small")


# ---------------------------------------------------------------------------- the mode


def run(args, environment):
    drop_unavailable_providers(args)
    print(
        f"providers: {', '.join(args.providers) or 'none'}; "
        f"warmup {args.warmup}, reps {args.reps}, T={args.temperature:g}"
    )

    results = []
    units = [(case, pass_name) for case in args.cases for pass_name in args.passes]
    inputs_case, student, teacher = None, None, None
    for index, (case, pass_name) in enumerate(units, start=1):
        print(f"[{index}/{len(units)}] {case} {pass_name} ...", file=sys.stderr, flush=True)
        if case != inputs_case:
            student = teacher = None  # free the previous case's inputs first
            student, teacher = make_inputs(case, args.device)
            inputs_case = case
        result = kl_pass(case, pass_name, student, teacher, args, environment)
        for name, why in result.failures.items():
            print(f"ERROR: {name} on {case} {pass_name}: {why}; left out of the timing", file=sys.stderr)
        results.append(result)

    print(results_table(results, show_memory=args.device.type == "cuda"))
    records = [record for result in results for record in result.records]
    if args.json:
        write_json(args.json, records)
    if args.plot:
        plot_gbps(args.plot, records)
    outcomes = [(f"{result.case} {result.pass_name}", result.skipped, result.failures) for result in results]
    return report_failures(outcomes, checked=not args.no_check)


MODE = Mode(
    name="kl",
    add_arguments=add_arguments,
    selected=lambda args: True,  # the default
    resolve=resolve,
    run=run,
    providers={name: provider.description for name, provider in PROVIDERS.items()},
)
