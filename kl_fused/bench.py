"""kl-fused-bench: time kl_fused.kl_div_logits against the ways users compute the same loss.

    python -m kl_fused.bench [--cases 512x32000:float32,64x128256:bfloat16] [--pass fwd,fwd+bwd] ...

What is measured. For each case (rows x vocab logits of one dtype) and pass, every provider (see
kl_fused._bench_providers) computes the batchmean KL(softmax(t/T) || softmax(s/T)) on the same
random inputs. `fwd` times the loss of a student that does not require grad; `fwd+bwd` times one
training step of the loss: drop the student's .grad, compute the loss, call backward.

How. Before timing, each provider runs once (which is also when `compile` compiles) and its loss
and student gradient are compared with the pure-PyTorch reference evaluated in float64 on the same
inputs; a provider that disagrees or raises is reported and left out of the timing, and the exit
code becomes 1. Timing then warms up and interleaves the providers round-robin, in an order rotated
at every repetition, so that drift (clocks, other load) hits them all alike. CPU steps are timed
with time.perf_counter, CUDA steps with a pair of CUDA events each. Reported: the median and the
10th/90th percentiles in ms.

Bytes. Achieved GB/s is the floor of the design notes divided by the median time, with N*V
elements of e bytes each: `fwd` reads s and t, 2e per element; `fwd+bwd` also writes the student
gradient, 3e per element. A device-to-device copy of one input-sized buffer (read + write, 2e per
element) is timed in the same rotation, and each provider is also given as a fraction of that
copy's bandwidth. On the CPU the floor is arithmetic rather than bytes, so there the copy is
context, not a ceiling. On CUDA the peak memory of one step beyond the inputs is reported too.
"""

import argparse
import json
import math
import platform
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone

import torch

import kl_fused
from kl_fused import reference
from kl_fused._bench_providers import PROVIDERS

DTYPES = {
    "float32": torch.float32,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
    "float64": torch.float64,
}
PASSES = ("fwd", "fwd+bwd")
FLOOR_ELEMENT_READS_WRITES = {"fwd": 2, "fwd+bwd": 3}  # times e bytes per element

# dtype: (relative tolerance of the loss, tolerance of the student gradient as a fraction of the
# largest |gradient|). `eager`, `compile` and `liger` compute in fp32 even for fp64 input, hence
# the fp32 figures there; 16-bit gradients are rounded to 8 (bf16) or 11 (fp16) significant bits.
TOLERANCES = {
    torch.float64: (1e-4, 1e-4),
    torch.float32: (1e-4, 1e-4),
    torch.bfloat16: (1e-3, 2e-2),
    torch.float16: (1e-3, 2e-2),
}
# The float64 reference runs over blocks of rows of at most this many elements, so that checking
# a large CUDA case does not need several float64 copies of the whole input.
CHECK_BLOCK_ELEMENTS = 1 << 24

DEFAULT_CASES = {
    "cpu": "512x32000:float32,512x32000:bfloat16,64x128256:bfloat16",
    "cuda": "8192x128256:bfloat16,4096x262144:bfloat16,4096x32000:bfloat16",
}
DEFAULT_PASSES = {"cpu": "fwd+bwd", "cuda": "fwd,fwd+bwd"}
DEFAULT_REPS = {"cpu": 10, "cuda": 50}
# Keys of describe_environment() copied into every record.
ENVIRONMENT_KEYS = ("torch_version", "kl_fused_version", "fused_available", "threads", "date")
CROSS_PRODUCT_DEFAULTS = {"rows": {"cpu": "512", "cuda": "4096"}, "vocab": "32000", "dtype": "bfloat16"}


@dataclass(frozen=True)
class Case:
    rows: int
    vocab: int
    dtype_name: str

    @property
    def dtype(self):
        return DTYPES[self.dtype_name]

    @property
    def input_bytes(self):
        return self.rows * self.vocab * self.dtype.itemsize

    def __str__(self):
        return f"{self.rows}x{self.vocab} {self.dtype_name}"


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


def _comma_list(text):
    return [item.strip() for item in text.split(",") if item.strip()]


def _positive_int(text, what):
    if not text.strip().isdigit() or int(text) == 0:
        raise ValueError(f"{what} must be a positive integer, got {text!r}")
    return int(text)


def _parse_case(text):
    shape, _, dtype_name = text.partition(":")
    rows, _, vocab = shape.partition("x")
    if not dtype_name:
        raise ValueError(f"case '{text}' needs a dtype, as in 512x32000:float32")
    if dtype_name not in DTYPES:
        raise ValueError(f"unknown dtype '{dtype_name}' in case '{text}'")
    return Case(_positive_int(rows, "rows"), _positive_int(vocab, "vocab"), dtype_name)


def _choices(text, allowed, what):
    chosen = _comma_list(text)
    unknown = [item for item in chosen if item not in allowed]
    if unknown or not chosen:
        raise ValueError(f"unknown {what} {unknown or text!r}; choose from {list(allowed)}")
    return chosen


def _cases_from_args(args, device_type):
    cross = (args.rows, args.vocab, args.dtypes)
    if args.cases is not None and any(value is not None for value in cross):
        raise ValueError("--cases cannot be combined with --rows, --vocab or --dtype")
    if args.cases is not None or all(value is None for value in cross):
        return [_parse_case(text) for text in _comma_list(args.cases or DEFAULT_CASES[device_type])]
    rows = _comma_list(args.rows or CROSS_PRODUCT_DEFAULTS["rows"][device_type])
    vocabs = _comma_list(args.vocab or CROSS_PRODUCT_DEFAULTS["vocab"])
    dtype_names = _choices(args.dtypes or CROSS_PRODUCT_DEFAULTS["dtype"], DTYPES, "dtype")
    return [
        Case(_positive_int(r, "rows"), _positive_int(v, "vocab"), d) for d in dtype_names for r in rows for v in vocabs
    ]


def _resolve_device(text):
    try:
        device = torch.device(text or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError as error:  # torch's message lists the device types it knows
        raise ValueError(f"--device {text}: {error}") from None
    if device.type not in DEFAULT_CASES:
        raise ValueError(f"--device must be cpu or cuda, got {device}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda, but torch sees no CUDA device")
    return device


def _build_parser():
    parser = argparse.ArgumentParser(
        prog="kl-fused-bench",
        description="Benchmark kl_fused.kl_div_logits against eager, torch.compile, the reference and Liger.",
        epilog="Without --cases/--rows/--vocab/--dtype the device's default cases run; with some of "
        "--rows/--vocab/--dtype their cross product runs, the others defaulting to "
        "rows 512 (cpu) or 4096 (cuda), vocab 32000, dtype bfloat16.",
    )
    parser.add_argument(
        "--providers",
        metavar="LIST",
        help="comma list of "
        + "; ".join(f"{name} ({provider.description})" for name, provider in PROVIDERS.items())
        + " (default: all available)",
    )
    parser.add_argument("--device", help="cpu or cuda (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", dest="dtypes", metavar="LIST", help=f"comma list of {', '.join(DTYPES)}")
    parser.add_argument("--rows", metavar="LIST", help="comma list of row counts")
    parser.add_argument("--vocab", metavar="LIST", help="comma list of vocabulary sizes")
    parser.add_argument("--cases", metavar="LIST", help="explicit cases, e.g. 512x32000:float32,64x128256:bfloat16")
    parser.add_argument(
        "--pass",
        dest="passes",
        metavar="LIST",
        help="fwd, fwd+bwd, or both comma-separated (default: fwd+bwd on cpu, both on cuda)",
    )
    parser.add_argument("--temperature", type=float, default=1.0, metavar="T", help="softmax temperature (default 1)")
    parser.add_argument("--warmup", type=int, default=3, metavar="N", help="untimed steps per provider (default 3)")
    parser.add_argument("--reps", type=int, metavar="N", help="timed steps per provider (default 10 cpu, 50 cuda)")
    parser.add_argument("--json", metavar="PATH", help="write one record per provider, case and pass")
    parser.add_argument("--plot", metavar="PATH", help="plot GB/s against vocab to a PNG (needs matplotlib)")
    parser.add_argument("--no-check", action="store_true", help="skip the agreement check against float64")
    parser.add_argument("--threads", type=int, metavar="N", help="torch.set_num_threads(N) before running")
    parser.add_argument(
        "--vocab-parallel",
        type=int,
        metavar="N",
        help="instead of the providers: kl_fused.distributed on N CPU processes (gloo), each with a vocabulary "
        "shard and its share of the threads, next to the single-process fused kernel (fwd+bwd)",
    )
    return parser


def parse_args(argv):
    """Parsed and validated arguments, with device, cases, passes, providers and reps resolved."""
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        args.device = _resolve_device(args.device)
        args.cases = _cases_from_args(args, args.device.type)
        args.passes = _choices(args.passes or DEFAULT_PASSES[args.device.type], PASSES, "pass")
        args.providers = _choices(args.providers or ",".join(PROVIDERS), PROVIDERS, "provider")
        if args.reps is None:
            args.reps = DEFAULT_REPS[args.device.type]
        if args.reps < 1 or args.warmup < 0:
            raise ValueError("--reps must be at least 1 and --warmup at least 0")
        if not (math.isfinite(args.temperature) and args.temperature > 0):
            raise ValueError(f"--temperature must be finite and positive, got {args.temperature}")
        if args.threads is not None and args.threads < 1:
            raise ValueError(f"--threads must be at least 1, got {args.threads}")
        if args.vocab_parallel is not None and (args.vocab_parallel < 1 or args.device.type != "cpu"):
            raise ValueError("--vocab-parallel needs N >= 1 and the cpu device (it spawns gloo processes)")
    except ValueError as error:
        parser.error(str(error))
    return args


# ---------------------------------------------------------------------------- inputs and steps


def make_inputs(case, device, seed=0):
    """Teacher logits 2*randn and student logits correlated with them (also of std 2), never zeros.

    The student is a leaf that requires grad; `fwd` steps use a detached view of it.
    """
    generator = torch.Generator(device=device).manual_seed(seed)
    sample_dtype = torch.float64 if case.dtype == torch.float64 else torch.float32
    shape = (case.rows, case.vocab)
    teacher = torch.randn(shape, generator=generator, device=device, dtype=sample_dtype).mul_(2.0)
    student = torch.randn(shape, generator=generator, device=device, dtype=sample_dtype).mul_(1.2)
    student.add_(teacher, alpha=0.8)
    return student.to(case.dtype).requires_grad_(), teacher.to(case.dtype)


def make_step(loss_fn, student, teacher, with_grad):
    """One timed unit of work; returns the loss."""
    if not with_grad:
        frozen_student = student.detach()
        return lambda: loss_fn(frozen_student, teacher)

    def forward_backward():
        student.grad = None
        loss = loss_fn(student, teacher)
        loss.backward()
        return loss

    return forward_backward


def run_once(step, student, with_grad):
    """(loss as a float, student gradient or None) of one step, leaving the student's .grad empty."""
    loss = step()
    grad, student.grad = student.grad, None
    if with_grad and grad is None:
        raise RuntimeError("backward left no gradient on the student")
    return loss.item(), grad


# ---------------------------------------------------------------------------- agreement check


def float64_reference(student, teacher, temperature, grads):
    """The reference loss in float64 and, per provider, the largest |grad - reference grad|.

    Runs over blocks of rows (batchmean = sum of the blocks' sums / rows). Returns
    (loss, largest |reference grad|, {provider: largest error}); NaNs propagate into the maxima.
    """
    rows, vocab = student.shape
    block_rows = max(1, CHECK_BLOCK_ELEMENTS // vocab)
    total = 0.0
    grad_scale = torch.zeros((), dtype=torch.float64, device=student.device)
    errors = {name: torch.zeros_like(grad_scale) for name in grads}
    for start in range(0, rows, block_rows):
        rows_here = slice(start, start + block_rows)
        s = student[rows_here].detach().double().requires_grad_(bool(grads))
        t = teacher[rows_here].double()
        block_sum = reference.kl_div_logits(s, t, temperature=temperature, reduction="sum")
        total += block_sum.item()
        if not grads:
            continue
        (ref_grad,) = torch.autograd.grad(block_sum, s)
        ref_grad /= rows
        grad_scale = torch.maximum(grad_scale, ref_grad.abs().max())
        for name, grad in grads.items():
            errors[name] = torch.maximum(errors[name], (grad[rows_here].double() - ref_grad).abs().max())
    return total / rows, grad_scale.item(), {name: error.item() for name, error in errors.items()}


def disagreements(outputs, student, teacher, temperature):
    """{provider: what is wrong} for the providers whose loss or gradient misses the reference."""
    loss_rtol, grad_tol = TOLERANCES[student.dtype]
    grads = {name: grad for name, (_, grad) in outputs.items() if grad is not None}
    ref_loss, grad_scale, grad_errors = float64_reference(student, teacher, temperature, grads)
    problems = {}
    for name, (loss, _) in outputs.items():
        loss_error = abs(loss - ref_loss) / abs(ref_loss)
        if not loss_error <= loss_rtol:  # `not <=` so that NaN fails
            problems[name] = (
                f"loss {loss:.8g} vs float64 reference {ref_loss:.8g} (rel. error {loss_error:.2e} > {loss_rtol:g})"
            )
        elif name in grad_errors and not grad_errors[name] <= grad_tol * grad_scale:
            problems[name] = (
                f"student grad max error {grad_errors[name]:.3e} > {grad_tol:g} * max|grad| {grad_scale:.3e}"
            )
    return problems


# ---------------------------------------------------------------------------- timing


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


def _synchronize(device):
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
    _synchronize(device)
    pending = {name: [] for name in names}
    for rep in range(reps):
        for name in rotations[rep % len(names)]:
            pending[name].append(timed(steps[name]))
    _synchronize(device)
    return {name: [elapsed() for elapsed in readings] for name, readings in pending.items()}


def percentile(samples, fraction):
    """Linear interpolation between the closest ranks, as numpy's default."""
    ordered = sorted(samples)
    position = fraction * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def peak_memory_mib(step, student, device):
    """Memory one step allocates at its peak beyond what was allocated before it (CUDA only)."""
    if device.type != "cuda":
        return None
    student.grad = None
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    step()
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    student.grad = None
    return peak / 2**20


# ---------------------------------------------------------------------------- one case and pass


def _first_runs(steps, student, with_grad, keep_outputs):
    """Run each provider once (this compiles `compile`); returns (outputs, failures, skipped)."""
    outputs, failures, skipped = {}, {}, {}
    for name, step in steps.items():
        try:
            output = run_once(step, student, with_grad)
        except torch.cuda.OutOfMemoryError:
            skipped[name] = "out of memory"
            student.grad = None
            torch.cuda.empty_cache()
            continue
        except Exception as error:
            failures[name] = f"raised {type(error).__name__}: {error}"
            student.grad = None
            continue
        if keep_outputs:
            outputs[name] = output
    return outputs, failures, skipped


def bench_pass(case, pass_name, student, teacher, args, environment):
    """Check, then time, every provider on one case and pass."""
    with_grad = pass_name == "fwd+bwd"
    steps = {
        name: make_step(PROVIDERS[name].build(args.temperature), student, teacher, with_grad)
        for name in args.providers
    }
    outputs, failures, skipped = _first_runs(steps, student, with_grad, keep_outputs=not args.no_check)
    if not args.no_check:
        failures.update(disagreements(outputs, student, teacher, args.temperature))
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
                "peak_mem_mib": peak_memory_mib(steps[name], student, args.device),
                "speedup_vs_eager": _speedup(medians, "eager", name),
                "speedup_vs_compile": _speedup(medians, "compile", name),
                **{key: environment[key] for key in ENVIRONMENT_KEYS},
            }
        )
    return result


def _speedup(medians, baseline, name):
    return medians[baseline] / medians[name] if baseline in medians else None


# ---------------------------------------------------------------------------- environment


def _device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_environment(device):
    return {
        "device": str(device),
        "device_name": _device_name(device),
        "torch_version": torch.__version__,
        "kl_fused_version": kl_fused.__version__,
        "fused_available": kl_fused.is_fused_available(device),
        "threads": torch.get_num_threads(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def drop_unavailable_providers(args):
    """Remove the providers that cannot run on this device, printing why; note a fused fallback."""
    available = []
    for name in args.providers:
        reason = PROVIDERS[name].unavailable_reason(args.device)
        if reason is None:
            available.append(name)
        else:
            print(f"note: skipping provider '{name}': {reason}")
    if "fused" in available and not kl_fused.is_fused_available(args.device):
        reason = kl_fused.fused_unavailable_reason(args.device)
        print(f"note: NO FUSED KERNEL for {args.device.type} ({reason}): 'fused' times the reference fallback")
    args.providers = available


# ---------------------------------------------------------------------------- report


def _format_optional(value, spec, suffix=""):
    return "-" if value is None else f"{value:{spec}}{suffix}"


def format_table(results, show_memory):
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
            line += [_format_optional(record["speedup_vs_eager"], ".2f", "x")]
            line += [_format_optional(record["speedup_vs_compile"], ".2f", "x")]
            if show_memory:
                line.append(_format_optional(record["peak_mem_mib"], ".0f"))
            lines.append(line)
    widths = [max(len(line[column]) for line in lines) for column in range(len(header))]
    left_aligned = 3  # provider, pass, dtype
    return "\n".join(
        "  ".join(
            cell.ljust(width) if column < left_aligned else cell.rjust(width)
            for column, (cell, width) in enumerate(zip(line, widths))
        )
        for line in lines
    )


def write_json(path, records):
    with open(path, "w") as out:
        json.dump(records, out, indent=1)
        out.write("\n")
    print(f"wrote {len(records)} records to {path}")


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


def report_failures(results, checked):
    """Print what was left out of the timing and why; returns the exit code."""
    failed = False
    for result in results:
        where = f"{result.case} {result.pass_name}"
        for name, why in result.skipped.items():
            print(f"skipped: {name} on {where}: {why}")
        for name, why in result.failures.items():
            print(f"FAILED: {name} on {where}: {why}")
            failed = True
    if checked and not failed:
        print("agreement check: every provider that ran matches the float64 reference")
    return 1 if failed else 0


# ---------------------------------------------------------------------------- main


def main(argv=None):
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    environment = describe_environment(args.device)
    print(
        f"kl_fused {environment['kl_fused_version']}, torch {environment['torch_version']}, "
        f"{environment['device']} ({environment['device_name']}), {environment['threads']} threads, "
        f"fused kernel available: {environment['fused_available']}"
    )
    if args.vocab_parallel is not None:
        from kl_fused import _bench_vocab_parallel

        return _bench_vocab_parallel.main(args, environment)
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

    print(format_table(results, show_memory=args.device.type == "cuda"))
    records = [record for result in results for record in result.records]
    if args.json:
        write_json(args.json, records)
    if args.plot:
        plot_gbps(args.plot, records)

    return report_failures(results, checked=not args.no_check)


if __name__ == "__main__":
    sys.exit(main())
