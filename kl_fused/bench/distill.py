"""`kl-fused-bench --distill`: one training step of the distillation loss -- hard cross-entropy on labels
(hard_weight) + soft forward KL (soft_weight 1) -- against the ways users compute it (distill_providers.py),
from logits and from hidden states, with a dense teacher and a top-k one, at each temperature.

    kl-fused-bench --distill [--cases 512x32000:float32,...] [--distill-linear-cases 4096x256x32000,...]
                             [--temperatures 1,2] [--teachers dense,topk] [--topk-slots 64] [--hard-weight 0.5]

Per case, every provider is first run once and checked against the float64 reference on the same
inputs (kl_fused.reference.distillation_loss, or the soft term's reference for the `soft` providers):
loss and student gradient(s); one that disagrees or raises is left out of the timing and the exit code
becomes 1. Then all are timed interleaved (timing.py): median and 10th/90th percentiles. Each record
gives the speedups over the soft term alone, the two-pass recipe (c) and torch.compile (b). Linear cases
also measure each provider's peak memory above the inputs (memory.py; --no-memory skips it). Labels
are random tokens with about 10% of the rows -100. Run once more with --keep-freed-memory for the
other allocator setting (allocator.py).
"""

import sys

import torch

import kl_fused
from kl_fused import reference
from kl_fused.bench.agreement import ErrorTracker, disagreements, row_blocks
from kl_fused.bench.cases import make_inputs, parse_case
from kl_fused.bench.distill_providers import IGNORE, LINEAR_PROVIDERS, LOGITS_PROVIDERS
from kl_fused.bench.environment import record_environment
from kl_fused.bench.linear_inputs import make_linear_inputs, memory_method as _memory_method
from kl_fused.bench.memory import cuda_peak_mib, measure_cpu_peak
from kl_fused.bench.options import Mode, choices, comma_list, positive_int
from kl_fused.bench.report import format_optional, format_table, report_failures, write_json
from kl_fused.bench.timing import first_runs, percentile, time_interleaved

DEFAULT_CASES = {"cpu": "512x32000:float32,512x32000:bfloat16,64x128256:bfloat16",
                 "cuda": "8192x128256:bfloat16,4096x32000:bfloat16"}
DEFAULT_LINEAR_CASES = {"cpu": "4096x256x32000,1024x1024x32000", "cuda": "8192x4096x128256"}
DEFAULT_LINEAR_DTYPE = {"cpu": "float32", "cuda": "bfloat16"}
TEACHERS = ("dense", "topk")
BASELINES = {"soft": "soft", "two-pass": "two-pass", "compile": "compile", "linear-soft": "soft",
             "materialized-two-pass": "two-pass", "materialized-compile": "compile", "liger": "liger"}


def make_labels(leading, vocab, device, seed=1):
    """Random target tokens, about 10% of the rows IGNORE (never zeros everywhere, never all ignored)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    labels = torch.randint(0, vocab, leading, generator=generator, device=device)
    ignored = torch.rand(leading, generator=generator, device=device) < 0.1
    ignored.view(-1)[0] = False
    return labels.masked_fill(ignored, IGNORE)


def _topk(teacher_logits, slots, temperature):
    indices, logprobs = kl_fused.topk_teacher(teacher_logits, slots, temperature=temperature)
    return indices.long(), logprobs


# ---------------------------------------------------------------------------------------------- check


def _reference_block(student, teacher, labels, args, form, computes, temperature):
    """The float64 sum over a block of rows of what a provider computes."""
    teacher_kwargs = dict(teacher_topk=(teacher[0], teacher[1].double())) if form == "topk" else dict(
        teacher_logits=teacher.double())
    if computes == "soft":
        return reference.distillation_loss(student, **teacher_kwargs, mask=labels != IGNORE, temperature=temperature,
                                           reduction="sum")
    return reference.distillation_loss(student, **teacher_kwargs, labels=labels, temperature=temperature,
                                       hard_weight=args.hard_weight, reduction="sum")


def _check(outputs, computes, student_logits_of, teacher, labels, args, form, temperature, dtype, counted,
           grads_of=None):
    """{provider: what is wrong}, checking each group of providers (same `computes`) against its float64
    reference over blocks of rows. outputs: {provider: (loss, {gradient name: tensor})}."""
    failures = {}
    for what in ("step", "soft"):
        group = {name: out for name, out in outputs.items() if computes[name] == what}
        if not group:
            continue
        total, tracker = 0.0, ErrorTracker(labels.device)
        rows = labels.shape[0]
        for block in row_blocks(rows, student_logits_of.vocab):
            leaves, s64 = student_logits_of.block(block)
            t_block = (teacher[0][block], teacher[1][block]) if form == "topk" else teacher[block]
            loss = _reference_block(s64, t_block, labels[block], args, form, what, temperature)
            total += loss.item()
            ref_grads = torch.autograd.grad(loss, leaves)
            for (name, _), ref in zip(student_logits_of.grad_names, ref_grads):
                if name != "student_weight":
                    tracker.add(name, ref / counted, {p: grads[name][block] for p, (_, grads) in group.items()})
                else:
                    student_logits_of.weight_grad += ref / counted
        if student_logits_of.weight_grad is not None:
            tracker.add("student_weight", student_logits_of.weight_grad,
                        {p: grads["student_weight"] for p, (_, grads) in group.items()})
            student_logits_of.weight_grad.zero_()
        failures.update(disagreements({p: loss for p, (loss, _) in group.items()}, total / counted, tracker.results(),
                                      dtype))
    return failures


class _LogitsBlocks:
    """Blocks of the student logits in float64, as leaves of the reference's gradient."""

    def __init__(self, student):
        self.student, self.vocab, self.weight_grad = student, student.shape[-1], None
        self.grad_names = [("student", None)]

    def block(self, rows):
        s = self.student[rows].detach().double().requires_grad_()
        return [s], s


class _LinearBlocks:
    """Blocks of the student's logits h W^T in float64, from leaves h (per block) and W (whole)."""

    def __init__(self, inputs):
        self.h, self.vocab = inputs["student_hidden"].detach(), inputs["student_weight"].shape[0]
        self.w64 = inputs["student_weight"].detach().double().requires_grad_()
        self.weight_grad = torch.zeros_like(self.w64)
        self.grad_names = [("student_hidden", None), ("student_weight", None)]

    def block(self, rows):
        h64 = self.h[rows].double().requires_grad_()
        return [h64, self.w64], h64 @ self.w64.t()


# ---------------------------------------------------------------------------------------------- one case


def _records(samples, base, environment):
    medians = {name: percentile(times, 0.5) for name, times in samples.items()}
    records = []
    for name, times in samples.items():
        record = {**base, "provider": name, "median_ms": medians[name], "p10_ms": percentile(times, 0.1),
                  "p90_ms": percentile(times, 0.9), **record_environment(environment)}
        for baseline, label in BASELINES.items():
            if baseline in medians:
                record[f"x_vs_{label}"] = medians[baseline] / medians[name]
        records.append(record)
    return records


def bench_logits(case, form, temperature, student, teacher_logits, labels, args, environment):
    teacher = _topk(teacher_logits, args.topk_slots, temperature) if form == "topk" else teacher_logits
    names = [n for n in args.providers if n in LOGITS_PROVIDERS and LOGITS_PROVIDERS[n].unavailable_reason(
        form, args.device) is None]
    fns = {n: LOGITS_PROVIDERS[n].build(temperature, args.hard_weight, 1.0, form) for n in names}

    def step_of(fn):
        def step():
            student.grad = None
            loss = fn(student, teacher, labels)
            loss.backward()
            return loss

        return step

    steps = {n: step_of(fn) for n, fn in fns.items()}

    def run(step):
        loss = step().item()
        grad, student.grad = student.grad, None
        return loss, {"student": grad}

    outputs, failures, skipped = first_runs({n: (lambda s=s: run(s)) for n, s in steps.items()}, not args.no_check)
    if not args.no_check and outputs:
        counted = max(int((labels != IGNORE).sum()), 1)
        failures.update(_check(outputs, {n: LOGITS_PROVIDERS[n].computes for n in outputs}, _LogitsBlocks(student),
                               teacher, labels, args, form, temperature, case.dtype, counted))
    del outputs
    for name in (*failures, *skipped):
        steps.pop(name, None)
    samples = time_interleaved(steps, args.warmup, args.reps, args.device) if steps else {}
    base = {"mode": "distill", "input": "logits", "teacher": form, "slots": args.topk_slots if form == "topk" else None,
            "dtype": case.dtype_name, "rows": case.rows, "vocab": case.vocab, "hidden": None,
            "temperature": temperature, "hard_weight": args.hard_weight}
    return _records(samples, base, environment), failures, skipped


def memory_probe_step(provider, rows, hidden, vocab, dtype_name, form, temperature, hard_weight, slots, device):
    """The memory probe's child-process entry (memory.py): one linear provider's step on fresh inputs."""
    inputs, labels = _linear_inputs(rows, hidden, vocab, dtype_name, form, temperature, slots, device)
    fn = LINEAR_PROVIDERS[provider].build(temperature, hard_weight, 1.0, form)
    return _linear_step(fn, inputs, labels), [inputs["student_hidden"], inputs["student_weight"]]


def _linear_inputs(rows, hidden, vocab, dtype_name, form, temperature, slots, device):
    inputs = make_linear_inputs(rows, hidden, vocab, dtype_name, "hidden", device)
    if form == "topk":
        with torch.no_grad():
            inputs["teacher_topk"] = _topk(inputs["teacher_hidden"] @ inputs["teacher_weight"].t(), slots, temperature)
    return inputs, make_labels((rows,), vocab, device)


def _linear_step(fn, inputs, labels):
    def step():
        inputs["student_hidden"].grad = inputs["student_weight"].grad = None
        loss = fn(inputs, labels)
        loss.backward()
        return loss

    return step


def bench_linear(shape, form, temperature, args, environment):
    rows, hidden, vocab = shape
    dtype_name = args.linear_dtype
    inputs, labels = _linear_inputs(rows, hidden, vocab, dtype_name, form, temperature, args.topk_slots, args.device)
    names = [n for n in args.linear_providers if LINEAR_PROVIDERS[n].unavailable_reason(form, args.device) is None]
    steps = {n: _linear_step(LINEAR_PROVIDERS[n].build(temperature, args.hard_weight, 1.0, form), inputs, labels)
             for n in names}

    def run(step):
        loss = step().item()
        grads = {"student_hidden": inputs["student_hidden"].grad, "student_weight": inputs["student_weight"].grad}
        inputs["student_hidden"].grad = inputs["student_weight"].grad = None
        return loss, grads

    outputs, failures, skipped = first_runs({n: (lambda s=s: run(s)) for n, s in steps.items()}, not args.no_check)
    if not args.no_check and outputs:
        counted = max(int((labels != IGNORE).sum()), 1)
        teacher = inputs["teacher_topk"] if form == "topk" else (inputs["teacher_hidden"] @ inputs["teacher_weight"].t())
        failures.update(_check(outputs, {n: LINEAR_PROVIDERS[n].computes for n in outputs}, _LinearBlocks(inputs),
                               teacher, labels, args, form, temperature, inputs["student_hidden"].dtype, counted))
    del outputs
    for name in (*failures, *skipped):
        steps.pop(name, None)
    samples = time_interleaved(steps, args.warmup, args.reps, args.device) if steps else {}
    base = {"mode": "distill", "input": "hidden", "teacher": form, "slots": args.topk_slots if form == "topk" else None,
            "dtype": dtype_name, "rows": rows, "vocab": vocab, "hidden": hidden, "temperature": temperature,
            "hard_weight": args.hard_weight}
    records = _records(samples, base, environment)
    for record in records:
        record["peak_above_inputs_mib"] = None if args.no_memory else _peak(record["provider"], steps, shape, form,
                                                                            temperature, args)
        record["memory_method"] = None if args.no_memory else _memory_method(args.device)
    return records, failures, skipped


def _peak(name, steps, shape, form, temperature, args):
    if args.device.type == "cuda":
        return cuda_peak_mib(steps[name], args.device)
    rows, hidden, vocab = shape
    kwargs = dict(provider=name, rows=rows, hidden=hidden, vocab=vocab, dtype_name=args.linear_dtype, form=form,
                  temperature=temperature, hard_weight=args.hard_weight, slots=args.topk_slots, device="cpu")
    try:
        return measure_cpu_peak("kl_fused.bench.distill:memory_probe_step", kwargs)["peak_above_mib"]
    except RuntimeError as error:
        print(f"note: memory of '{name}' not measured: {error}", file=sys.stderr)
        return None


# ---------------------------------------------------------------------------------------------- command line


def add_arguments(parser):
    group = parser.add_argument_group("distillation-step mode (--distill)")
    group.add_argument("--distill", action="store_true",
                       help="benchmark distillation_loss / linear_distillation_loss (hard CE + soft KL) against the "
                            "eager recipe, its torch.compile, the two-pass recipe, Liger and TRL")
    group.add_argument("--temperatures", metavar="LIST", help="--distill: comma list of T (default 1,2)")
    group.add_argument("--hard-weight", type=float, default=0.5, help="--distill: weight of the CE (default 0.5)")
    group.add_argument("--teachers", metavar="LIST", help="--distill: dense, topk or both (default both)")
    group.add_argument("--topk-slots", dest="topk_slots", type=int, default=64, help="--distill: K of the top-k teacher")
    group.add_argument("--distill-linear-cases", metavar="LIST",
                       help="--distill: ROWSxHxV comma list of linear cases, or 'none' (default: the device's)")


def resolve(args):
    device_type = args.device.type
    if args.rows is not None or args.vocab is not None:
        raise ValueError("--distill takes its logits cases from --cases (ROWSxV:dtype)")
    args.cases = [parse_case(text) for text in comma_list(args.cases or DEFAULT_CASES[device_type])] \
        if args.cases != "none" else []
    try:
        args.temperatures = [float(t) for t in comma_list(args.temperatures or "1,2")]
    except ValueError:
        raise ValueError(f"--temperatures must be a comma list of numbers, got {args.temperatures!r}") from None
    if not args.temperatures or not all(t > 0 for t in args.temperatures):
        raise ValueError("--temperatures must be positive")
    args.teachers = choices(args.teachers or ",".join(TEACHERS), TEACHERS, "teacher")
    if args.topk_slots < 1 or not (args.hard_weight >= 0):
        raise ValueError("--topk-slots must be >= 1 and --hard-weight >= 0")
    linear = args.distill_linear_cases or DEFAULT_LINEAR_CASES[device_type]
    args.linear_shapes = []
    if linear != "none":
        for text in comma_list(linear):
            parts = text.split("x")
            if len(parts) != 3:
                raise ValueError(f"linear case {text!r} must be ROWSxHxV, as in 4096x256x32000")
            args.linear_shapes.append(tuple(positive_int(part, "a linear case's size") for part in parts))
    args.linear_dtype = (args.dtypes or DEFAULT_LINEAR_DTYPE[device_type]).split(",")[0]
    known = {**LOGITS_PROVIDERS, **LINEAR_PROVIDERS}
    chosen = choices(args.providers or ",".join(known), known, "provider")
    args.providers = [n for n in chosen if n in LOGITS_PROVIDERS]
    args.linear_providers = [n for n in chosen if n in LINEAR_PROVIDERS]
    if not hasattr(args, "no_memory"):
        args.no_memory = False


def results_table(records):
    header = ["provider", "input", "teacher", "dtype", "shape", "T", "median_ms", "p10_ms", "p90_ms", "x_soft",
              "x_two_pass", "x_compile", "peak_MiB"]
    lines = [header]
    for r in records:
        shape = f"{r['rows']}x{r['hidden']}x{r['vocab']}" if r["hidden"] else f"{r['rows']}x{r['vocab']}"
        lines.append([r["provider"], r["input"], r["teacher"], r["dtype"], shape, f"{r['temperature']:g}",
                      *(f"{r[key]:.2f}" for key in ("median_ms", "p10_ms", "p90_ms")),
                      *(format_optional(r.get(f"x_vs_{base}"), ".2f", "x") for base in ("soft", "two-pass", "compile")),
                      format_optional(r.get("peak_above_inputs_mib"), ".0f")])
    return format_table(lines, left_aligned=5)


def run(args, environment):
    if not kl_fused.is_fused_available(args.device, "distillation_loss"):
        print(f"note: NO FUSED KERNEL for distillation_loss on {args.device.type}: 'fused' times the reference fallback")
    print(f"distill mode: hard_weight {args.hard_weight:g}, soft_weight 1, forward KL, T {args.temperatures}, "
          f"teachers {args.teachers} (top-{args.topk_slots}); warmup {args.warmup}, reps {args.reps}")
    units = [("logits", case, form, t) for case in args.cases for form in args.teachers for t in args.temperatures]
    units += [("hidden", shape, form, t) for shape in args.linear_shapes for form in args.teachers
              for t in args.temperatures]
    records, outcomes = [], []
    inputs_case = student = teacher = labels = None
    for index, (kind, case, form, temperature) in enumerate(units, start=1):
        where = f"{case if kind == 'logits' else 'x'.join(map(str, case))} {form} T={temperature:g}"
        print(f"[{index}/{len(units)}] {kind} {where} ...", file=sys.stderr, flush=True)
        if kind == "logits":
            if case != inputs_case:
                student = teacher = labels = None
                student, teacher = make_inputs(case, args.device)
                labels = make_labels((case.rows,), case.vocab, args.device)
                inputs_case = case
            unit_records, failures, skipped = bench_logits(case, form, temperature, student, teacher, labels, args,
                                                           environment)
        else:
            unit_records, failures, skipped = bench_linear(case, form, temperature, args, environment)
        for name, why in failures.items():
            print(f"ERROR: {name} on {where}: {why}; left out of the timing", file=sys.stderr)
        records += unit_records
        outcomes.append((where, skipped, failures))
        if args.json:  # written after every unit: a long sweep keeps what it measured
            write_json(args.json, records)
    print(results_table(records))
    return report_failures(outcomes, checked=not args.no_check)


MODE = Mode(
    name="distill",
    add_arguments=add_arguments,
    selected=lambda args: args.distill,
    resolve=resolve,
    run=run,
    providers={name: p.description for name, p in {**LOGITS_PROVIDERS, **LINEAR_PROVIDERS}.items()},
)
