"""`kl-fused-bench --linear`: the distillation loss from hidden states and the output layer, one full
training step of the student (forward + backward to its hidden states and lm_head weight), by:

    materialized-eager    logits = h W^T (teacher's too), then the F.kl_div recipe on fp32 log-softmaxes  (a)
    materialized-fused    the same logits, then kl_fused.kl_div_logits                                    (b)
    compile               torch.compile of (a)                                                            (c)
    linear                kl_fused.linear_kl_div (chunked: no rows x V tensor)                            (d)
    trl                   TRL's DistillationTrainer loss (_chunked_divergence_loss, beta 0; CPU: its
                          PyTorch tiles, CUDA: its Triton kernels); teacher as hidden states only
    liger                 Liger's LigerFusedLinearJSD with beta 0 (CUDA, where installed);
                          teacher as hidden states only                                                (e)

Cases are rows x H x V of one dtype, with the teacher given as hidden states + weight (H_t = H), or
as precomputed logits. Every provider is first checked against a float64 evaluation (over blocks
of rows) of the loss and both student gradients, then timed interleaved (timing.py), then its
peak memory above the inputs is measured: on CUDA with the caching allocator's counters, on the
CPU as the peak RSS of a fresh process per provider (memory.py).
"""

import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import kl_fused
from kl_fused import reference
from kl_fused.bench.agreement import ErrorTracker, disagreements, row_blocks
from kl_fused.bench.environment import record_environment
from kl_fused.bench.linear_inputs import make_linear_inputs, memory_method as _memory_method
from kl_fused.bench.memory import cuda_peak_mib, measure_cpu_peak
from kl_fused.bench.options import DTYPES, Mode, choices, comma_list, positive_int
from kl_fused.bench.report import format_optional, format_table, report_failures, write_json
from kl_fused.bench.timing import first_runs, percentile, time_interleaved

TEACHER_FORMS = ("hidden", "logits")
# The grid is H in {256, 1024}, V in {32000, 128256}, rows 256..16384. On this 2-core CPU a
# step at 16384 x 1024 x 128256 is ~17 TFLOP (minutes per repetition per provider), so the CPU
# default covers the corners that run in minutes: every row count at H=256, V=32000 (where the memory
# target is set), and the larger H or V at up to 4096 rows.
DEFAULT_CASES = {
    "cpu": "256x256x32000,1024x256x32000,4096x256x32000,16384x256x32000,"
           "1024x1024x32000,4096x1024x32000,1024x256x128256,4096x256x128256",
    "cuda": "1024x4096x128256,4096x4096x128256,8192x4096x128256,16384x4096x128256,8192x1024x32000",
}
DEFAULT_DTYPE = {"cpu": "float32", "cuda": "bfloat16"}


@dataclass(frozen=True)
class LinearCase:
    rows: int
    hidden: int
    vocab: int
    dtype_name: str
    teacher: str  # "hidden" or "logits"

    @property
    def dtype(self):
        return DTYPES[self.dtype_name]

    def __str__(self):
        return f"{self.rows}x{self.hidden}x{self.vocab} {self.dtype_name}, teacher as {self.teacher}"


# ---------------------------------------------------------------------------- inputs and providers


def _teacher_logits(inputs):
    if "teacher_logits" in inputs:
        return inputs["teacher_logits"]
    with torch.no_grad():
        return inputs["teacher_hidden"] @ inputs["teacher_weight"].t()


def _materialized_eager(inputs, temperature):
    student = inputs["student_hidden"] @ inputs["student_weight"].t()
    log_q = F.log_softmax(student.float() / temperature, dim=-1)
    log_p = F.log_softmax(_teacher_logits(inputs).float() / temperature, dim=-1)
    return F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")


def _materialized_fused(inputs, temperature):
    student = inputs["student_hidden"] @ inputs["student_weight"].t()
    return kl_fused.kl_div_logits(student, _teacher_logits(inputs), temperature=temperature)


def _linear(inputs, temperature, chunk_rows=None):
    return kl_fused.linear_kl_div(
        inputs["student_hidden"], inputs["student_weight"], inputs.get("teacher_logits"),
        teacher_hidden=inputs.get("teacher_hidden"), teacher_weight=inputs.get("teacher_weight"),
        temperature=temperature, chunk_rows=chunk_rows)


def _trl(inputs, temperature):
    from trl.trainer.distillation_trainer import _chunked_divergence_loss

    h = inputs["student_hidden"]
    mask = torch.ones(h.shape[:-1], dtype=torch.long, device=h.device)
    loss, _, _ = _chunked_divergence_loss(h, inputs["teacher_hidden"], inputs["student_weight"],
                                          inputs["teacher_weight"], mask, beta=0.0, temperature=temperature)
    return loss


def _liger(inputs, temperature):
    from liger_kernel.transformers.fused_linear_jsd import LigerFusedLinearJSD

    # jsd_beta = 0 is forward KL in Liger's convention (0.5.x); the agreement check holds it to that.
    loss_fn = LigerFusedLinearJSD(jsd_beta=0.0, temperature=temperature)
    return loss_fn(inputs["student_hidden"], inputs["student_weight"], inputs["teacher_hidden"],
                   inputs["teacher_weight"])


def _needs_teacher_hidden(case, device):
    return None if case.teacher == "hidden" else "needs the teacher as hidden states"


def _trl_unavailable(case, device):
    try:
        from trl.trainer.distillation_trainer import _chunked_divergence_loss  # noqa: F401
    except Exception as error:
        return f"trl is not importable ({type(error).__name__}: {error})"
    return _needs_teacher_hidden(case, device)


def _liger_unavailable(case, device):
    if device.type != "cuda":
        return "Liger's fused linear JSD runs on CUDA only"
    try:
        from liger_kernel.transformers.fused_linear_jsd import LigerFusedLinearJSD  # noqa: F401
    except Exception as error:
        return f"liger_kernel is not importable ({type(error).__name__}: {error})"
    return _needs_teacher_hidden(case, device)


def _compiled(temperature):
    torch._dynamo.reset()  # one compilation per case
    return torch.compile(lambda inputs: _materialized_eager(inputs, temperature), dynamic=False)


# name: (description, builder temperature -> loss of inputs, unavailable_reason(case, device) or None)
PROVIDERS = {
    "materialized-eager": ("logits h W^T, then F.kl_div of fp32 log-softmaxes (a)",
                           lambda T: lambda inputs: _materialized_eager(inputs, T), lambda case, device: None),
    "materialized-fused": ("logits h W^T, then kl_fused.kl_div_logits (b)",
                           lambda T: lambda inputs: _materialized_fused(inputs, T), lambda case, device: None),
    "compile": ("torch.compile of (a) (c)", _compiled, lambda case, device: None),
    "linear": ("kl_fused.linear_kl_div (d)", lambda T: lambda inputs: _linear(inputs, T), lambda case, device: None),
    "trl": ("TRL 1.16 DistillationTrainer chunked divergence, beta 0", lambda T: lambda inputs: _trl(inputs, T),
            _trl_unavailable),
    "liger": ("Liger LigerFusedLinearJSD, beta 0 (e)", lambda T: lambda inputs: _liger(inputs, T),
              _liger_unavailable),
}


def _step(loss_fn, inputs):
    def forward_backward():
        inputs["student_hidden"].grad = None
        inputs["student_weight"].grad = None
        loss = loss_fn(inputs)
        loss.backward()
        return loss

    return forward_backward


def memory_probe_step(provider, rows, hidden, vocab, dtype_name, teacher, temperature, device):
    """The memory probe's child-process entry (memory.py): one provider's step on fresh inputs."""
    inputs = make_linear_inputs(rows, hidden, vocab, dtype_name, teacher, device)
    loss_fn = PROVIDERS[provider][1](temperature)
    return _step(loss_fn, inputs), [inputs["student_hidden"], inputs["student_weight"]]


# ---------------------------------------------------------------------------- agreement check


def float64_reference(inputs, temperature, grads):
    """The float64 loss (batchmean over rows) and ErrorTracker results of the providers' gradients
    {provider: (d hidden, d weight)}, computed over blocks of rows."""
    h = inputs["student_hidden"].detach()
    w64 = inputs["student_weight"].detach().double().requires_grad_()
    rows, vocab = h.shape[0], w64.shape[0]
    teacher = _teacher_logits(inputs)
    tracker = ErrorTracker(h.device)
    total = 0.0
    w_grad = torch.zeros_like(w64)
    for block in row_blocks(rows, vocab):
        h64 = h[block].double().requires_grad_()
        loss = reference.kl_div_logits(h64 @ w64.t(), teacher[block].double(), temperature=temperature, reduction="sum")
        total += loss.item()
        h_grad, w_part = torch.autograd.grad(loss, [h64, w64])
        w_grad += w_part
        tracker.add("hidden", h_grad / rows, {name: grad[0][block] for name, grad in grads.items()})
    tracker.add("weight", w_grad / rows, {name: grad[1] for name, grad in grads.items()})
    return total / rows, tracker.results()


def check_providers(steps, inputs, temperature, dtype):
    """Runs each step once; {provider: why it disagrees or raised}, and {provider: why it was skipped}."""
    def run(step):
        loss = step().item()
        grads = (inputs["student_hidden"].grad, inputs["student_weight"].grad)
        inputs["student_hidden"].grad = inputs["student_weight"].grad = None
        return loss, grads

    outputs, failures, skipped = first_runs({name: (lambda s=step: run(s)) for name, step in steps.items()}, True)
    if outputs:
        ref_loss, grad_results = float64_reference(inputs, temperature, {n: g for n, (_, g) in outputs.items()})
        failures.update(disagreements({n: l for n, (l, _) in outputs.items()}, ref_loss, grad_results, dtype))
    return failures, skipped


# ---------------------------------------------------------------------------- one case


def bench_case(case, args, environment):
    inputs = make_linear_inputs(case.rows, case.hidden, case.vocab, case.dtype_name, case.teacher, args.device)
    names = []
    for name in args.providers:
        reason = PROVIDERS[name][2](case, args.device)
        if reason is None:
            names.append(name)
        else:
            print(f"note: {case}: skipping '{name}': {reason}", file=sys.stderr)
    steps = {name: _step(PROVIDERS[name][1](args.temperature), inputs) for name in names}
    failures, skipped = ({}, {}) if args.no_check else check_providers(steps, inputs, args.temperature, case.dtype)
    for name in (*failures, *skipped):
        steps.pop(name, None)
    samples = time_interleaved(steps, args.warmup, args.reps, args.device) if steps else {}
    medians = {name: percentile(times, 0.5) for name, times in samples.items()}
    input_mib = sum(t.numel() * t.element_size() for t in inputs.values()) / 2**20
    records = []
    for name, times in samples.items():
        records.append({
            "mode": "linear",
            "provider": name,
            "rows": case.rows,
            "hidden": case.hidden,
            "vocab": case.vocab,
            "dtype": case.dtype_name,
            "teacher": case.teacher,
            "temperature": args.temperature,
            "chunk_rows": kl_fused.linear.default_chunk_rows(case.vocab, args.device, case.dtype, case.hidden) if name == "linear" else None,
            "median_ms": medians[name],
            "p10_ms": percentile(times, 0.1),
            "p90_ms": percentile(times, 0.9),
            "input_mib": input_mib,
            "peak_above_inputs_mib": None if args.no_memory else _peak_mib(name, steps[name], case, args),
            "memory_method": None if args.no_memory else _memory_method(args.device),
            **record_environment(environment),
        })
    for record in records:
        for baseline in ("materialized-eager", "materialized-fused", "compile", "trl", "liger"):
            record[f"speedup_vs_{baseline}"] = medians[baseline] / record["median_ms"] if baseline in medians else None
    return records, failures, skipped


def _peak_mib(name, step, case, args):
    if args.device.type == "cuda":
        return cuda_peak_mib(step, args.device)
    kwargs = dict(provider=name, rows=case.rows, hidden=case.hidden, vocab=case.vocab, dtype_name=case.dtype_name,
                  teacher=case.teacher, temperature=args.temperature, device="cpu")
    try:
        return measure_cpu_peak("kl_fused.bench.linear:memory_probe_step", kwargs)["peak_above_mib"]
    except RuntimeError as error:
        print(f"note: {case}: memory of '{name}' not measured: {error}", file=sys.stderr)
        return None


# ---------------------------------------------------------------------------- command line and report


def add_arguments(parser):
    group = parser.add_argument_group("linear mode (--linear)")
    group.add_argument("--linear", action="store_true", help="benchmark linear_kl_div (hidden states + lm_head)")
    group.add_argument("--linear-cases", metavar="LIST",
                       help="ROWSxHxV comma list (default: the device's grid; see kl_fused/bench/linear.py)")
    group.add_argument("--teacher", metavar="LIST", help="hidden, logits or both (default: both)")
    group.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")


def resolve(args):
    device_type = args.device.type
    if args.cases is not None or args.rows is not None or args.vocab is not None:
        raise ValueError("--linear takes its shapes from --linear-cases (ROWSxHxV), not --cases/--rows/--vocab")
    dtype_names = choices(args.dtypes or DEFAULT_DTYPE[device_type], DTYPES, "dtype")
    teachers = choices(args.teacher or ",".join(TEACHER_FORMS), TEACHER_FORMS, "teacher form")
    shapes = []
    for text in comma_list(args.linear_cases or DEFAULT_CASES[device_type]):
        parts = text.split("x")
        if len(parts) != 3:
            raise ValueError(f"linear case {text!r} must be ROWSxHxV, as in 4096x256x32000")
        shapes.append(tuple(positive_int(part, "a linear case's size") for part in parts))
    args.linear_cases = [LinearCase(r, h, v, d, t) for d in dtype_names for (r, h, v) in shapes for t in teachers]
    args.providers = choices(args.providers or ",".join(PROVIDERS), PROVIDERS, "provider")


def results_table(records):
    header = ["provider", "teacher", "dtype", "rows", "H", "V", "median_ms", "p10_ms", "p90_ms", "peak_MiB",
              "x_(a)", "x_(b)"]
    lines = [header]
    for r in records:
        lines.append([r["provider"], r["teacher"], r["dtype"], str(r["rows"]), str(r["hidden"]), str(r["vocab"]),
                      f"{r['median_ms']:.1f}", f"{r['p10_ms']:.1f}", f"{r['p90_ms']:.1f}",
                      format_optional(r["peak_above_inputs_mib"], ".0f"),
                      format_optional(r["speedup_vs_materialized-eager"], ".2f", "x"),
                      format_optional(r["speedup_vs_materialized-fused"], ".2f", "x")])
    return format_table(lines, left_aligned=3)


def run(args, environment):
    print(f"linear mode: providers {', '.join(args.providers)}; warmup {args.warmup}, reps {args.reps}, "
          f"T={args.temperature:g}; memory: {'off' if args.no_memory else _memory_method(args.device)}")
    records, outcomes = [], []
    for index, case in enumerate(args.linear_cases, start=1):
        print(f"[{index}/{len(args.linear_cases)}] {case} ...", file=sys.stderr, flush=True)
        case_records, failures, skipped = bench_case(case, args, environment)
        records += case_records
        outcomes.append((str(case), skipped, failures))
        if args.json:  # written after every case: a long sweep keeps what it measured
            write_json(args.json, records)
    print(results_table(records))
    return report_failures(outcomes, checked=not args.no_check)


MODE = Mode(
    name="linear",
    add_arguments=add_arguments,
    selected=lambda args: args.linear,
    resolve=resolve,
    run=run,
    providers={name: description for name, (description, _, _) in PROVIDERS.items()},
)
