"""One case and pass of a loss on logits, as every provider-comparing mode runs it (kl.py, jsd.py):
each provider's first run checked against a float64 reference, then the providers and a copy of
one input timed interleaved, and one record per provider.

A mode gives its providers as {name: loss function of (student, teacher)}, already built for the
case and pass (so that `compile` compiles once for what it is timed on), and its reference as a
function of float64 (student, teacher) blocks returning the reduction="sum" loss of the block.
The loss every provider computes is that reference's batchmean.
"""

from dataclasses import dataclass, field

import torch

from kl_fused.bench.agreement import ErrorTracker, disagreements, row_blocks
from kl_fused.bench.cases import make_step
from kl_fused.bench.environment import ENVIRONMENT_KEYS
from kl_fused.bench.memory import cuda_peak_mib
from kl_fused.bench.report import format_optional, format_table
from kl_fused.bench.timing import first_runs, percentile, time_interleaved

PASSES = ("fwd", "fwd+bwd")
FLOOR_ELEMENT_READS_WRITES = {"fwd": 2, "fwd+bwd": 3}  # times e bytes per element


@dataclass
class PassResult:
    case: object
    pass_name: str
    copy_ms: float
    copy_gbps: float
    records: list = field(default_factory=list)
    failures: dict = field(default_factory=dict)  # provider -> how it raised or disagreed
    skipped: dict = field(default_factory=dict)  # provider -> why it could not run (out of memory)


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


def float64_reference(student, teacher, block_sum, grads):
    """The batchmean of block_sum(s64, t64) over blocks of rows, and the ErrorTracker results of the
    providers' student gradients {provider: grad} against its gradient."""
    rows, vocab = student.shape
    total = 0.0
    tracker = ErrorTracker(student.device)
    for rows_here in row_blocks(rows, vocab):
        s = student[rows_here].detach().double().requires_grad_(bool(grads))
        t = teacher[rows_here].double()
        block = block_sum(s, t)
        total += block.item()
        if not grads:
            continue
        (ref_grad,) = torch.autograd.grad(block, s)
        ref_grad /= rows
        tracker.add("student", ref_grad, {name: grad[rows_here] for name, grad in grads.items()})
    return total / rows, tracker.results()


def check_outputs(outputs, student, teacher, block_sum):
    """{provider: what is wrong} for the providers whose loss or gradient misses the reference."""
    grads = {name: grad for name, (_, grad) in outputs.items() if grad is not None}
    ref_loss, grad_results = float64_reference(student, teacher, block_sum, grads)
    losses = {name: loss for name, (loss, _) in outputs.items()}
    return disagreements(losses, ref_loss, grad_results, student.dtype)


def bench_pass(case, pass_name, student, teacher, loss_fns, block_sum, args, environment, fields=None):
    """Check, then time, every provider of loss_fns on one case and pass. `fields` are added to every
    record (a mode's own options); speedups are against the providers named eager and compile."""
    with_grad = pass_name == "fwd+bwd"
    steps = {name: make_step(fn, student, teacher, with_grad) for name, fn in loss_fns.items()}
    runs = {name: (lambda step=step: run_once(step, student, with_grad)) for name, step in steps.items()}
    outputs, failures, skipped = first_runs(runs, keep_outputs=not args.no_check)
    if not args.no_check:
        failures.update(check_outputs(outputs, student, teacher, block_sum))
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
                **(fields or {}),
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


def results_table(results, show_memory, extra_columns=()):
    """The records of `results` as a text table; extra_columns are record keys shown after vocab."""
    header = ["provider", "pass", "dtype", "rows", "vocab", *extra_columns, "median_ms", "p10_ms", "p90_ms", "GB/s"]
    header += ["%copy", "x_eager", "x_compile"] + (["peak_MiB"] if show_memory else [])
    lines = [header]
    for result in results:
        case = result.case
        copy_line = ["(copy)", result.pass_name, case.dtype_name, str(case.rows), str(case.vocab)]
        copy_line += ["-"] * len(extra_columns)
        copy_line += [f"{result.copy_ms:.3f}", "-", "-", f"{result.copy_gbps:.1f}", "-", "-", "-"]
        lines.append(copy_line + (["-"] if show_memory else []))
        for record in result.records:
            line = [record["provider"], record["pass"], record["dtype"], str(record["rows"]), str(record["vocab"])]
            line += [f"{record[key]:g}" for key in extra_columns]
            line += [f"{record[key]:.3f}" for key in ("median_ms", "p10_ms", "p90_ms")]
            line += [f"{record['gbps']:.1f}", f"{100 * record['fraction_of_copy']:.0f}%"]
            line += [format_optional(record["speedup_vs_eager"], ".2f", "x")]
            line += [format_optional(record["speedup_vs_compile"], ".2f", "x")]
            if show_memory:
                line.append(format_optional(record["peak_mem_mib"], ".0f"))
            lines.append(line)
    return format_table(lines, left_aligned=3)  # provider, pass, dtype
