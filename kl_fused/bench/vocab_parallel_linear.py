"""`kl-fused-bench --vocab-parallel N --linear`: linear_distillation_loss_vocab_parallel on N CPU processes
(gloo), each with a vocabulary shard of the student's and the teacher's output layers (widths as even as
possible) and the same hidden states, next to the single-process kl_fused.linear_distillation_loss on
the full layers; one training step of the student (forward + backward to its hidden states, complete on
every rank, and its weight shard).

Reported per case: time per step (the slowest rank's, from a barrier), the bytes each rank sends per
step (payload; formula in bytes_sent_per_rank), and the peak memory of one step above what the process
held before it: on each rank, and for the single process in a fresh process (memory.py), both as peak
RSS under MALLOC_MMAP_THRESHOLD_.
"""

import datetime
import json

import torch
import torch.distributed as dist

import kl_fused
from kl_fused._rank_agreement import record_bytes
from kl_fused._vocab_parallel_distill import _FIELDS, collective_bytes_per_chunk
from kl_fused.bench.linear_inputs import make_linear_inputs
from kl_fused.bench.memory import MMAP_THRESHOLD_BYTES, measure_cpu_peak, step_peak_rss
from kl_fused.bench.report import write_json
from kl_fused.bench.timing import summarize, time_interleaved
from kl_fused.bench.ranks import exit_rank, run_ranks, shard_widths, time_on_ranks
from kl_fused.distributed import linear_distillation_loss_vocab_parallel
from kl_fused.linear import default_chunk_rows

AGREEMENT_RTOL = 1e-4
DEFAULT_CASES = "4096x256x32000"


def bytes_sent_per_rank(rows, hidden, vocab, dtype, ranks, teacher_dense=True, divergence="forward_kl"):
    """Payload one rank sends per step (forward + backward; batchmean, every row counted):

        record + 8 (the shard widths) + rows x v x e_acc (the row statistics of every chunk: v values per
        row, 5 for forward KL: 2 maxima, Z_a, Z_b, W; see kl_fused._shard_distill) + rows x H x e (the hidden states' gradient,
        all-reduced once in backward: the only O(rows x H) term, as in any column-parallel lm_head)

    e_acc = 4 (8 for float64), e = the dtype's bytes. Never O(rows x V)."""
    element = torch.empty((), dtype=dtype).element_size()
    statistics = collective_bytes_per_chunk(rows, dtype, divergence=divergence, dense=teacher_dense)
    return record_bytes(_FIELDS) + 8 + statistics + rows * hidden * element


def single_step(rows, hidden, vocab, dtype_name, teacher, temperature):
    """(step, tensors whose .grad it fills): the single-process fused linear loss, for timing and memory.py."""
    inputs = make_linear_inputs(rows, hidden, vocab, dtype_name, teacher, "cpu")

    def step():
        loss = kl_fused.linear_distillation_loss(
            inputs["student_hidden"], inputs["student_weight"], inputs.get("teacher_logits"),
            teacher_hidden=inputs.get("teacher_hidden"), teacher_weight=inputs.get("teacher_weight"),
            temperature=temperature)
        loss.backward()
        return loss

    return step, (inputs["student_hidden"], inputs["student_weight"])


def _rank_main(rank, ranks, init_file, out_file, case, options):
    torch.set_num_threads(options["threads_per_rank"])
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=ranks,
                            timeout=datetime.timedelta(seconds=600))
    try:
        inputs = make_linear_inputs(case.rows, case.hidden, case.vocab, case.dtype_name, case.teacher, "cpu")
        widths = shard_widths(case.vocab, ranks)
        start, end = sum(widths[:rank]), sum(widths[:rank + 1])
        hidden = inputs["student_hidden"].detach().clone().requires_grad_()
        weight = inputs["student_weight"].detach()[start:end].clone().requires_grad_()
        teacher_logits = inputs["teacher_logits"][:, start:end].clone() if "teacher_logits" in inputs else None
        teacher_hidden = inputs.get("teacher_hidden")
        teacher_weight = inputs["teacher_weight"][start:end].clone() if "teacher_weight" in inputs else None
        temperature = options["temperature"]

        def step():
            hidden.grad = weight.grad = None
            loss = linear_distillation_loss_vocab_parallel(hidden, weight, teacher_logits, teacher_hidden=teacher_hidden,
                                                           teacher_weight_shard=teacher_weight, temperature=temperature)
            loss.backward()
            return loss

        loss = step().item()
        agreement = None
        if rank == 0:  # agreement with the single-process loss on the full layers
            full, _ = single_step(case.rows, case.hidden, case.vocab, case.dtype_name, case.teacher, temperature)
            expected = full().item()
            agreement = abs(loss - expected) / max(abs(expected), 1e-30)
            del full
        del inputs
        dist.barrier()
        memory = step_peak_rss(step)
        peaks = [torch.zeros(1, dtype=torch.float64) for _ in range(ranks)]
        dist.all_gather(peaks, torch.tensor([memory["peak_above_mib"]], dtype=torch.float64))
        timings = time_on_ranks({"step": step}, options["warmup"], options["reps"])
        if rank == 0:
            with open(out_file, "w") as out:
                json.dump({"loss": loss, "relative_difference": agreement, "widths": widths,
                           "peak_above_mib_per_rank": [p.item() for p in peaks], **timings}, out)
    finally:
        dist.destroy_process_group()
    exit_rank()


def main(args, environment):
    """Runs every case of args.linear_cases; prints a table and writes --json records. Returns the exit code."""
    ranks = args.vocab_parallel
    records, failed = [], False
    common = {key: environment[key] for key in ("device", "device_name", "torch_version", "kl_fused_version", "date")}
    lines = [f"{'provider':<24} {'ranks':>5} {'thr/rank':>8} {'case':<28} {'median_ms':>10} {'p10_ms':>9} "
             f"{'p90_ms':>9} {'peak_MiB/rank':>13} {'bytes/rank':>11} {'x_single':>8}"]
    threads = torch.get_num_threads()
    threads_per_rank = max(1, threads // ranks)
    for index, case in enumerate(args.linear_cases, start=1):
        print(f"[{index}/{len(args.linear_cases)}] {case} fwd+bwd, 1 process then {ranks} ranks ...", flush=True)
        step, _ = single_step(case.rows, case.hidden, case.vocab, case.dtype_name, case.teacher, args.temperature)
        single = summarize(time_interleaved({"single": step}, args.warmup, args.reps, torch.device("cpu"))["single"])
        del step
        single_memory = measure_cpu_peak("kl_fused.bench.vocab_parallel_linear:single_step", dict(
            rows=case.rows, hidden=case.hidden, vocab=case.vocab, dtype_name=case.dtype_name, teacher=case.teacher,
            temperature=args.temperature))
        options = {"threads_per_rank": threads_per_rank, "temperature": args.temperature, "warmup": args.warmup,
                   "reps": args.reps}
        ranked = run_ranks(_rank_main, ranks, (case, options), env={"MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD_BYTES)})
        timed = summarize(ranked["step"])
        sent = bytes_sent_per_rank(case.rows, case.hidden, case.vocab, case.dtype, ranks, case.teacher != "none")
        chunk = default_chunk_rows(case.vocab, torch.device("cpu"), case.dtype, case.hidden)
        base = {"pass": "fwd+bwd", "dtype": case.dtype_name, "rows": case.rows, "hidden": case.hidden,
                "vocab": case.vocab, "teacher": case.teacher, "temperature": args.temperature, "chunk_rows": chunk,
                **common}
        records.append({"provider": "linear_distillation_loss", "ranks": 1, "threads_per_rank": threads, **single,
                        "peak_above_mib": single_memory["peak_above_mib"], **base})
        records.append({
            "provider": "linear_distillation_loss_vocab_parallel", "ranks": ranks, "threads_per_rank": threads_per_rank,
            **timed, "peak_above_mib_per_rank": ranked["peak_above_mib_per_rank"], "bytes_sent_per_rank": sent,
            "bytes_formula": "record + 8 + rows*5*e_acc + rows*H*e (see bytes_sent_per_rank)",
            "shard_widths": ranked["widths"], "relative_difference_vs_single": ranked["relative_difference"],
            "speedup_vs_single_process": single["median_ms"] / timed["median_ms"], **base,
        })
        if not ranked["relative_difference"] <= AGREEMENT_RTOL:
            print(f"FAILED: the vocab-parallel loss differs from the single-process loss by "
                  f"{ranked['relative_difference']:.3g} (relative) on {case}")
            failed = True
        shape = f"{case.rows}x{case.hidden}x{case.vocab} {case.dtype_name}"
        lines.append(f"{'linear_distillation_loss':<24} {1:>5} {threads:>8} {shape:<28} {single['median_ms']:>10.1f} "
                     f"{single['p10_ms']:>9.1f} {single['p90_ms']:>9.1f} {single_memory['peak_above_mib']:>13.1f} "
                     f"{'-':>11} {'1.00x':>8}")
        peak = max(ranked["peak_above_mib_per_rank"])
        lines.append(f"{'vocab-parallel':<24} {ranks:>5} {threads_per_rank:>8} {shape:<28} {timed['median_ms']:>10.1f} "
                     f"{timed['p10_ms']:>9.1f} {timed['p90_ms']:>9.1f} {peak:>13.1f} {sent:>11} "
                     f"{single['median_ms'] / timed['median_ms']:>7.2f}x")
    print("\n".join(lines))
    print("bytes/rank = record + 8 + rows x 5 x 4 (row statistics, forward KL, fp32) + rows x H x e (the hidden "
          "states' gradient all-reduce); peak = peak RSS of one step above the RSS before it (max over ranks)")
    if args.json:
        write_json(args.json, records)
    if not failed:
        print(f"agreement check: the vocab-parallel loss matches the single-process loss (rtol {AGREEMENT_RTOL:g})")
    return 1 if failed else 0
