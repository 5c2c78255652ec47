"""`kl-fused-bench --vocab-parallel N`: the vocab-parallel loss on N CPU processes (gloo) next to the
single-process fused kernel on the full rows, forward + backward.

The single-process kernel runs first with all the threads the benchmark has; then N ranks start,
each with its share of those threads and its slice of the same logits (widths as even as
possible, as a tensor-parallel output layer splits them). A step on the ranks is timed from a
barrier to the end of backward, and its time is the slowest rank's. The collectives alone, with
the same payload, are timed as well, and bytes sent per rank come from the payload of the three
collectives (kl_fused.distributed.collective_bytes_per_call).
"""

import datetime
import json

import torch
import torch.distributed as dist

import kl_fused
from kl_fused.bench import vocab_parallel_linear
from kl_fused.bench.cases import cases_from_args, make_inputs, make_step
from kl_fused.bench.linear_inputs import TEACHER_FORMS, parse_linear_cases
from kl_fused.bench.options import DTYPES, Mode, choices
from kl_fused.bench.ranks import exit_rank, run_ranks, shard_widths, time_on_ranks
from kl_fused.bench.report import write_json
from kl_fused.bench.timing import summarize, time_interleaved
from kl_fused.distributed import collective_bytes_per_call, kl_div_logits_vocab_parallel

AGREEMENT_RTOL = 1e-4


def _time_single_process(case, args):
    student, teacher = make_inputs(case, torch.device("cpu"))
    step = make_step(lambda s, t: kl_fused.kl_div_logits(s, t, temperature=args.temperature), student, teacher, True)
    samples = time_interleaved({"fused": step}, args.warmup, args.reps, torch.device("cpu"))["fused"]
    return summarize(samples)


def _rank_main(rank, ranks, init_file, out_file, case, args_dict):
    threads = args_dict["threads_per_rank"]
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=ranks,
                            timeout=datetime.timedelta(seconds=300))
    try:
        student, teacher = make_inputs(case, torch.device("cpu"))
        widths = shard_widths(case.vocab, ranks)
        start = sum(widths[:rank])
        shard_s = student.detach()[:, start:start + widths[rank]].clone().requires_grad_()
        shard_t = teacher[:, start:start + widths[rank]].clone()
        temperature = args_dict["temperature"]

        def step():
            shard_s.grad = None
            loss = kl_div_logits_vocab_parallel(shard_s, shard_t, temperature=temperature)
            loss.backward()
            return loss

        loss = step().item()
        if rank == 0:  # agreement with the single-process kernel on the full rows
            full = kl_fused.kl_div_logits(student.detach(), teacher, temperature=temperature).item()
            agreement = abs(loss - full) / max(abs(full), 1e-30)
        del student, teacher

        acc = torch.float64 if case.dtype == torch.float64 else torch.float32
        record = torch.zeros(51, dtype=torch.int64)
        maxima, sums = torch.zeros(case.rows, 2, dtype=acc), torch.zeros(case.rows, 3, dtype=acc)

        def collectives_only():
            dist.all_gather([torch.empty_like(record) for _ in range(ranks)], record)
            dist.all_reduce(maxima, op=dist.ReduceOp.MAX)
            dist.all_reduce(sums)

        timings = time_on_ranks({"step": step, "comm": collectives_only}, args_dict["warmup"], args_dict["reps"])
        if rank == 0:
            with open(out_file, "w") as out:
                json.dump({"loss": loss, "relative_difference": agreement, "widths": widths, **timings}, out)
    finally:
        dist.destroy_process_group()
    exit_rank()


def _run_ranks(case, ranks, args):
    threads_per_rank = max(1, torch.get_num_threads() // ranks)
    args_dict = {"threads_per_rank": threads_per_rank, "temperature": args.temperature,
                 "warmup": args.warmup, "reps": args.reps}
    return run_ranks(_rank_main, ranks, (case, args_dict)), threads_per_rank


def main(args, environment):
    """Runs every case of args.cases; prints a table and writes --json records. Returns the exit code."""
    if args.linear:
        return vocab_parallel_linear.main(args, environment)
    ranks = args.vocab_parallel
    records, failed = [], False
    common = {key: environment[key] for key in ("device", "device_name", "torch_version", "kl_fused_version", "date")}
    header = (f"{'provider':<16} {'ranks':>5} {'thr/rank':>8} {'dtype':<9} {'rows':>6} {'vocab':>7} {'median_ms':>10} "
              f"{'p10_ms':>8} {'p90_ms':>8} {'comm_ms':>8} {'bytes/rank':>11} {'x_single':>8}")
    lines = [header]
    for index, case in enumerate(args.cases, start=1):
        print(f"[{index}/{len(args.cases)}] {case} fwd+bwd, 1 process then {ranks} ranks ...", flush=True)
        single = _time_single_process(case, args)
        ranked, threads_per_rank = _run_ranks(case, ranks, args)
        step, comm = summarize(ranked["step"]), summarize(ranked["comm"])
        sent = collective_bytes_per_call(case.rows, case.dtype)
        base = {"pass": "fwd+bwd", "dtype": case.dtype_name, "rows": case.rows, "vocab": case.vocab,
                "temperature": args.temperature, **common}
        records.append({"provider": "fused", "ranks": 1, "threads_per_rank": torch.get_num_threads(), **single, **base})
        records.append({
            "provider": "vocab-parallel", "ranks": ranks, "threads_per_rank": threads_per_rank, **step,
            "comm_median_ms": comm["median_ms"], "bytes_sent_per_rank": sent, "shard_widths": ranked["widths"],
            "relative_difference_vs_fused": ranked["relative_difference"],
            "speedup_vs_single_process": single["median_ms"] / step["median_ms"], **base,
        })
        if not ranked["relative_difference"] <= AGREEMENT_RTOL:
            print(f"FAILED: vocab-parallel loss differs from the single-process loss by "
                  f"{ranked['relative_difference']:.3g} (relative) on {case}")
            failed = True
        lines.append(f"{'fused':<16} {1:>5} {torch.get_num_threads():>8} {case.dtype_name:<9} {case.rows:>6} "
                     f"{case.vocab:>7} {single['median_ms']:>10.3f} {single['p10_ms']:>8.3f} {single['p90_ms']:>8.3f} "
                     f"{'-':>8} {'-':>11} {'1.00x':>8}")
        lines.append(f"{'vocab-parallel':<16} {ranks:>5} {threads_per_rank:>8} {case.dtype_name:<9} {case.rows:>6} "
                     f"{case.vocab:>7} {step['median_ms']:>10.3f} {step['p10_ms']:>8.3f} {step['p90_ms']:>8.3f} "
                     f"{comm['median_ms']:>8.3f} {sent:>11} {single['median_ms'] / step['median_ms']:>7.2f}x")
    print("\n".join(lines))
    if args.json:
        write_json(args.json, records)
    if not failed:
        print(f"agreement check: the vocab-parallel loss matches the single-process fused loss (rtol {AGREEMENT_RTOL:g})")
    return 1 if failed else 0


def add_arguments(parser):
    parser.add_argument(
        "--vocab-parallel",
        type=int,
        metavar="N",
        help="instead of the providers: kl_fused.distributed on N CPU processes (gloo), each with a vocabulary "
        "shard and its share of the threads, next to the single-process fused kernel (fwd+bwd); with --linear, "
        "linear_distillation_loss_vocab_parallel from hidden states and lm_head shards (--linear-cases, default "
        "4096x256x32000, --teacher hidden|logits)",
    )


def resolve(args):
    if args.vocab_parallel < 1 or args.device.type != "cpu":
        raise ValueError("--vocab-parallel needs N >= 1 and the cpu device (it spawns gloo processes)")
    if args.linear:  # linear_distillation_loss_vocab_parallel on ROWSxHxV cases
        if args.cases is not None or args.rows is not None or args.vocab is not None:
            raise ValueError("--vocab-parallel N --linear takes its shapes from --linear-cases (ROWSxHxV)")
        args.linear_cases = parse_linear_cases(args.linear_cases or vocab_parallel_linear.DEFAULT_CASES,
                                               choices(args.dtypes or "float32", DTYPES, "dtype"),
                                               choices(args.teacher or "hidden", TEACHER_FORMS, "teacher form"))
        return
    args.cases = cases_from_args(args, args.device.type)


MODE = Mode(
    name="vocab-parallel",
    add_arguments=add_arguments,
    selected=lambda args: args.vocab_parallel is not None,
    resolve=resolve,
    run=main,
    providers={},
)
