"""`kl-fused-bench --sparse`: distillation from a teacher's top-K log-probabilities, one training step
(forward + backward to the student) per provider (sparse_providers.py), for each case and K.

    kl-fused-bench --sparse [--slots 1,8,64,256] [--tail bucket] [--cases 512x32000:float32,...]

For each case the teacher's logits are drawn once (cases.make_inputs) and kl_fused.topk_teacher turns
them into K slots at the temperature, as an offline cache would hold them. Before timing, every
provider runs once and its loss and student gradient are compared with the float64 reference on the
same inputs (kl_fused.reference.sparse_kl_div for the sparse providers, kl_div_logits for `dense`);
one that disagrees or raises is left out of the timing and the exit code becomes 1. Timing
interleaves the providers (timing.py), TRL's alternating with kl_fused's (_interleaved_order); reported
are the median and the 10th/90th percentiles.

Bytes. The sparse floor reads the student once and writes its gradient once: 2e per element (plus
O(K) per row); GB/s is that over the median time. `dense` is given its own floor, 3e.
"""

import sys

import torch

import kl_fused
from kl_fused import reference
from kl_fused.bench.agreement import ErrorTracker, disagreements, row_blocks
from kl_fused.bench.cases import cases_from_args, make_inputs, make_step
from kl_fused.bench.environment import record_environment
from kl_fused.bench.options import Mode, available_providers, choices, positive_ints
from kl_fused.bench.report import format_optional, format_table, report_failures, write_json
from kl_fused.bench.sparse_providers import SPARSE_PROVIDERS
from kl_fused.bench.timing import first_runs, percentile, time_interleaved

DEFAULT_SLOTS = "1,8,64,256"
TAILS = ("bucket", "renormalize")
FLOOR_READS_WRITES = {False: 2, True: 3}  # times e bytes per element: sparse, dense


def add_arguments(parser):
    parser.add_argument("--sparse", action="store_true",
                        help="instead of the KL providers: sparse_kl_div from the teacher's top-K log-probs against "
                             "TRL's server-distillation loss (eager and compiled) and dense kl_div_logits (fwd+bwd)")
    parser.add_argument("--slots", metavar="LIST", help=f"--sparse: comma list of K (default {DEFAULT_SLOTS})")
    parser.add_argument("--tail", choices=TAILS, default="bucket", help="--sparse: the tail mode (default bucket)")


def resolve(args):
    args.cases = cases_from_args(args, args.device.type)
    args.slots = positive_ints(args.slots or DEFAULT_SLOTS, "K")
    too_many = [k for k in args.slots for case in args.cases if k > case.vocab]
    if too_many:
        raise ValueError(f"--slots {too_many} exceed a case's vocabulary")
    args.providers = choices(args.providers or ",".join(SPARSE_PROVIDERS), SPARSE_PROVIDERS, "provider")


def _interleaved_order(names):
    """TRL's providers alternating with kl_fused's. timing.py rotates the order each repetition but
    keeps it cyclic, so every provider always runs right after the same one; a step that follows one
    of TRL's (which allocate and free several rows x V float32 buffers) runs measurably slower (its
    fresh gradient pages), and with this order each kl_fused provider pays that alike."""
    trl = [name for name in names if name.startswith("trl")]
    ours = [name for name in names if not name.startswith("trl")]
    order = []
    for i in range(max(len(trl), len(ours))):
        order += trl[i : i + 1] + ours[i : i + 1]
    return order


def _run_once(step, student):
    try:
        loss = step()
        grad = student.grad
    finally:
        student.grad = None
    if grad is None:
        raise RuntimeError("backward left no gradient on the student")
    return loss.item(), grad


def _float64_reference(student, teacher_input, dense, args, grads):
    """(batchmean loss, ErrorTracker results of the providers' student gradients) in float64, over
    blocks of rows."""
    rows, vocab = student.shape
    total, tracker = 0.0, ErrorTracker(student.device)
    for block in row_blocks(rows, vocab):
        s = student[block].detach().double().requires_grad_()
        if dense:
            block_sum = reference.kl_div_logits(s, teacher_input[block].double(), temperature=args.temperature,
                                                reduction="sum")
        else:
            indices, logprobs = teacher_input
            block_sum = reference.sparse_kl_div(s, indices[block], logprobs[block].double(), tail=args.tail,
                                                temperature=args.temperature, reduction="sum")
        total += block_sum.item()
        (ref_grad,) = torch.autograd.grad(block_sum, s)
        tracker.add("student", ref_grad / rows, {name: grad[block] for name, grad in grads.items()})
    return total / rows, tracker.results()


def bench_slots(case, slots, student, teacher, args, environment):
    """Check, then time, every provider on one case and K."""
    indices, logprobs = kl_fused.topk_teacher(teacher, slots, temperature=args.temperature)
    cached = (indices.long(), logprobs)
    inputs = {name: teacher if SPARSE_PROVIDERS[name].dense else cached for name in args.providers}
    steps = {name: make_step(SPARSE_PROVIDERS[name].build(args.temperature, args.tail), student, inputs[name], True)
             for name in _interleaved_order(args.providers)}
    outputs, failures, skipped = first_runs({name: (lambda step=step: _run_once(step, student))
                                             for name, step in steps.items()}, keep_outputs=not args.no_check)
    if not args.no_check:
        for dense in (False, True):
            group = {name: out for name, out in outputs.items() if SPARSE_PROVIDERS[name].dense == dense}
            if group:
                ref_loss, grad_results = _float64_reference(student, teacher if dense else cached, dense, args,
                                                            {name: grad for name, (_, grad) in group.items()})
                failures.update(disagreements({name: loss for name, (loss, _) in group.items()}, ref_loss,
                                              grad_results, student.dtype))
    del outputs
    for name in (*failures, *skipped):
        del steps[name]
    samples = time_interleaved(steps, args.warmup, args.reps, args.device)
    medians = {name: percentile(times, 0.5) for name, times in samples.items()}
    records = []
    for name, times in samples.items():
        floor_bytes = FLOOR_READS_WRITES[SPARSE_PROVIDERS[name].dense] * case.input_bytes
        records.append({
            "provider": name, "pass": "fwd+bwd", "tail": args.tail, "slots": slots, "dtype": case.dtype_name,
            "rows": case.rows, "vocab": case.vocab, "temperature": args.temperature,
            "median_ms": medians[name], "p10_ms": percentile(times, 0.1), "p90_ms": percentile(times, 0.9),
            "gbps": floor_bytes / medians[name] / 1e6,
            **{f"speedup_vs_{base}": (medians[base] / medians[name] if base in medians else None)
               for base in ("trl-eager", "trl-compile", "dense")},
            **record_environment(environment),
        })
    return records, failures, skipped


def results_table(records):
    header = ["provider", "dtype", "rows", "vocab", "K", "median_ms", "p10_ms", "p90_ms", "GB/s", "x_trl_eager",
              "x_trl_compile", "x_dense"]
    lines = [header]
    for r in records:
        lines.append([r["provider"], r["dtype"], str(r["rows"]), str(r["vocab"]), str(r["slots"]),
                      *(f"{r[key]:.3f}" for key in ("median_ms", "p10_ms", "p90_ms")), f"{r['gbps']:.1f}",
                      *(format_optional(r[f"speedup_vs_{base}"], ".2f", "x")
                        for base in ("trl-eager", "trl-compile", "dense"))])
    return format_table(lines, left_aligned=2)


def run(args, environment):
    args.providers = available_providers(args.providers, SPARSE_PROVIDERS, args.device)
    if not kl_fused.is_fused_available(args.device, "sparse_kl_div"):
        print(f"note: NO FUSED KERNEL for sparse_kl_div on {args.device.type}: 'fused' times the reference fallback")
    print(f"providers: {', '.join(args.providers) or 'none'}; tail {args.tail}; K {args.slots}; "
          f"warmup {args.warmup}, reps {args.reps}, T={args.temperature:g}")
    records, outcomes = [], []
    units = [(case, k) for case in args.cases for k in args.slots]
    inputs_case = student = teacher = None
    for index, (case, slots) in enumerate(units, start=1):
        print(f"[{index}/{len(units)}] {case} K={slots} fwd+bwd ...", file=sys.stderr, flush=True)
        if case != inputs_case:
            student = teacher = None
            student, teacher = make_inputs(case, args.device)
            inputs_case = case
        case_records, failures, skipped = bench_slots(case, slots, student, teacher, args, environment)
        for name, why in failures.items():
            print(f"ERROR: {name} on {case} K={slots}: {why}; left out of the timing", file=sys.stderr)
        records += case_records
        outcomes.append((f"{case} K={slots}", skipped, failures))
    print(results_table(records))
    if args.json:
        write_json(args.json, records)
    return report_failures(outcomes, checked=not args.no_check)


MODE = Mode(
    name="sparse",
    add_arguments=add_arguments,
    selected=lambda args: args.sparse,
    resolve=resolve,
    run=run,
    providers={name: provider.description for name, provider in SPARSE_PROVIDERS.items()},
)
