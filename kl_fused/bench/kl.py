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
from dataclasses import dataclass, field

import torch

import kl_fused
from kl_fused import reference
from kl_fused.bench.agreement import ErrorTracker, disagreements, row_blocks
from kl_fused.bench.cases import Case, cases_from_args, make_inputs, make_step
from kl_fused.bench.environment import ENVIRONMENT_KEYS
from kl_fused.bench.kl_providers import PROVIDERS
from kl_fused.bench.memory import cuda_peak_mib
from kl_fused.bench.options import Mode, available_providers, choices
from kl_fused.bench.report import format_optional, format_table, report_failures, write_json
from kl_fused.bench.timing import first_runs, percentile, time_interleaved

PASSES = ("fwd", "fwd+bwd")
FLOOR_ELEMENT_READS_WRITES = {"fwd": 2, "fwd+bwd": 3}  # times e bytes per element

DEFAULT_PASSES = {"cpu": "fwd+bwd", "cuda": "fwd,fwd+bwd"}


@dataclass
class PassResult:
    case: Case
    pass_name: str
    copy_ms: float
    copy_gbps: float
    records: list = field(default_factory=list)
    failures: dict = field(default_factory=dict)  # provider -> how it raised or disagreed
    skipped: dict = field(default_factory=dict)  # provider -> why it could not run (out of memory)


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


# ---------------------------------------------------------------------------- agreement check


def run_once(step, student, with_grad):
    """(loss as a float, student gradient or None) of one step, leaving the student's .grad empty."""
    try:
        loss = step()
        grad = student.grad
    finally:
        student.grad = None
    if with_grad and grad is None:
        raise RuntimeError("backward left no gradient on the student")
    return loss.item(), grad


def float64_reference(student, teacher, temperature, grads):
    """The reference loss in float64, and the ErrorTracker results of the providers' student
    gradients {provider: grad} against it. Runs over blocks of rows (batchmean = sum of the
    blocks' sums / rows)."""
    rows, vocab = student.shape
    total = 0.0
    tracker = ErrorTracker(student.device)
    for rows_here in row_blocks(rows, vocab):
        s = student[rows_here].detach().double().requires_grad_(bool(grads))
        t = teacher[rows_here].double()
        block_sum = reference.kl_div_logits(s, t, temperature=temperature, reduction="sum")
        total += block_sum.item()
        if not grads:
            continue
        (ref_grad,) = torch.autograd.grad(block_sum, s)
        ref_grad /= rows
        tracker.add("student", ref_grad, {name: grad[rows_here] for name, grad in grads.items()})
    return total / rows, tracker.results()


def check_outputs(outputs, student, teacher, temperature):
    """{provider: what is wrong} for the providers whose loss or gradient misses the reference."""
    grads = {name: grad for name, (_, grad) in outputs.items() if grad is not None}
    ref_loss, grad_results = float64_reference(student, teacher, temperature, grads)
    losses = {name: loss for name, (loss, _) in outputs.items()}
    return disagreements(losses, ref_loss, grad_results, student.dtype)


# ---------------------------------------------------------------------------- one case and pass


def bench_pass(case, pass_name, student, teacher, args, environment):
    """Check, then time, every provider on one case and pass."""
    with_grad = pass_name == "fwd+bwd"
    steps = {
        name: make_step(PROVIDERS[name].build(args.temperature), student, teacher, with_grad)
        for name in args.providers
    }
    runs = {name: (lambda step=step: run_once(step, student, with_grad)) for name, step in steps.items()}
    outputs, failures, skipped = first_runs(runs, keep_outputs=not args.no_check)
    if not args.no_check:
        failures.update(check_outputs(outputs, student, teacher, args.temperature))
    del outputs  # the gradients kept for the check must not take memory during the timing
    for name in (*failures, *skipped):
        del steps[name]

    copy_target = torch.empty_like(teacher)
    steps_and_copy = {**steps, "copy": lambda: copy_target.copy_(teacher)}
    samples = time_interleaved(steps_and_copy, args.warmup, args.reps, args.device)
    copy_ms = percentile(samples.pop("copy"), 0.5)
    copy_gbps = 2 * case.input_bytes / copy_ms / 1e6
    del copy_target

    result = PassResult(case, pass_name, copy_ms, copy_gbps, failures=failures, skipped=skipped)
    floor_bytes = FLOOR_ELEMENT_READS_WRITES[pass_name] * case.input_bytes
    medians = {name: percentile(times, 0.5) for name, times in samples.items()}
    for name, times in samples.items():
        gbps = floor_bytes / medians[name] / 1e6
        result.records.append(
            {
                "provider": name,
                "pass": pass_name,
                "device": environment["device"],
                "device_name": environment["device_name"],
                "dtype": case.dtype_name,
                "rows": case.rows,
                "vocab": case.vocab,
                "temperature": args.temperature,
                "median_ms": medians[name],
                "p10_ms": percentile(times, 0.1),
                "p90_ms": percentile(times, 0.9),
                "gbps": gbps,
                "copy_gbps": copy_gbps,
                "fraction_of_copy": gbps / copy_gbps,
                "peak_mem_mib": _peak_memory_mib(steps[name], student, args.device),
                "speedup_vs_eager": _speedup(medians, "eager", name),
                "speedup_vs_compile": _speedup(medians, "compile", name),
                **{key: environment[key] for key in ENVIRONMENT_KEYS},
            }
        )
    return result


def _peak_memory_mib(step, student, device):
    """Memory one step allocates at its peak beyond what was allocated before it (CUDA only)."""
    if device.type != "cuda":
        return None
    student.grad = None
    peak = cuda_peak_mib(step, device)
    student.grad = None
    return peak


def _speedup(medians, baseline, name):
    return medians[baseline] / medians[name] if baseline in medians else None


def drop_unavailable_providers(args):
    """Remove the providers that cannot run on this device, printing why; note a fused fallback."""
    available = available_providers(args.providers, PROVIDERS, args.device)
    if "fused" in available and not kl_fused.is_fused_available(args.device):
        reason = kl_fused.fused_unavailable_reason(args.device)
        print(f"note: NO FUSED KERNEL for {args.device.type} ({reason}): 'fused' times the reference fallback")
    args.providers = available


# ---------------------------------------------------------------------------- report


def results_table(results, show_memory):
    header = ["provider", "pass", "dtype", "rows", "vocab", "median_ms", "p10_ms", "p90_ms", "GB/s", "%copy"]
    header += ["x_eager", "x_compile"] + (["peak_MiB"] if show_memory else [])
    lines = [header]
    for result in results:
        case = result.case
        copy_line = ["(copy)", result.pass_name, case.dtype_name, str(case.rows), str(case.vocab)]
        copy_line += [f"{result.copy_ms:.3f}", "-", "-", f"{result.copy_gbps:.1f}", "-", "-", "-"]
        lines.append(copy_line + (["-"] if show_memory else []))
        for record in result.records:
            line = [record["provider"], record["pass"], record["dtype"], str(record["rows"]), str(record["vocab"])]
            line += [f"{record[key]:.3f}" for key in ("median_ms", "p10_ms", "p90_ms")]
            line += [f"{record['gbps']:.1f}", f"{100 * record['fraction_of_copy']:.0f}%"]
            line += [format_optional(record["speedup_vs_eager"], ".2f", "x")]
            line += [format_optional(record["speedup_vs_compile"], ".2f", "x")]
            if show_memory:
                line.append(format_optional(record["peak_mem_mib"], ".0f"))
            lines.append(line)
    return format_table(lines, left_aligned=3)  # provider, pass, dtype


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
        result = bench_pass(case, pass_name, student, teacher, args, environment)
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
