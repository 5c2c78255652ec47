"""What the CUDA kernels move per element, counted by the SIMT emulator (tests/simt), and the table
bench/results/cuda-traffic.md made from it: PREDICTED H100 figures, never measured.

    python tests/cuda_traffic.py                   print the table
    python tests/cuda_traffic.py --write           rewrite bench/results/cuda-traffic.md
    python tests/cuda_traffic.py --json F          also save the counts as JSON
    python tests/cuda_traffic.py --before F        add F's model bytes (an earlier build's --json) as "before"

The "before" column of the recorded table: the row's count before the last change that altered it,
each from an earlier build's --json: for the kl_div_logits rows with a gradient, the one-block kernel
before the cluster kernel (commit 451448a); for the distillation_loss kl rows, the one-block hard
kernel (commit 6ca41c8); for the JSD rows (jsd_logits and distillation_loss jsd), the one-block JSD
kernels before their cluster forms (the commit before them); every other row, any of these (no
change altered it). The JSONs were merged row by row into the --before file ({vocab: {scenario:
{"dram": model B/elem}}}).

Each scenario is one op and path, run by the emulator on a few rows at the real vocabulary width:
every global byte each launch loads and stores is counted (per tensor), with the L2 model of
tests/simt/memory_checks.cpp for re-reads (an LRU of 128-byte lines per block, holding the block's
share of 50 MB: 50 MB / 132 resident blocks, one per SM as the row kernels' registers and shared
memory allow; fed in lock-step order). Bytes per element scale exactly with the number of rows
(every row is the same work), so the full shapes' bytes are the counted ones times rows / emulated
rows. The implied time divides the modelled device-memory bytes by an assumed bandwidth (90% of
3.35 TB/s); it ignores launch overhead, the tail wave and compute (JSD's MUFU load included).

The budgets of tests/test_cuda_traffic.py use the same scenarios at small sizes.
"""

import argparse
import dataclasses
import datetime
import json
import pathlib
import sys

import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
TABLE = ROOT / "bench" / "results" / "cuda-traffic.md"
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # this checkout's kl_fused, not an installed one

H100_BANDWIDTH = 0.9 * 3.35e12  # bytes/s assumed: 90% of the HBM3 datasheet figure
SHAPES = ((8192, 128256), (4096, 262144))
EMULATED_ROWS = 1  # rows emulated per scenario at the real width (each row is the same work)
RESIDENT_BLOCKS = 132  # one row block per SM of an H100 SXM


@dataclasses.dataclass(frozen=True)
class Counted:
    """One op call's counted traffic, per element of its rows x V."""
    launches: int
    loaded: float            # global bytes loaded per element (re-reads included)
    stored: float
    reread: float            # bytes per element loaded a second time
    dram: float              # the L2 model's device-memory bytes per element (reads + distinct writes)
    reread_hit_rate: float   # the model's share of re-read bytes served from L2
    ex2: float               # MUFU ex2 per element
    lg2: float


def count(launches, elements):
    reread = sum(t.reread_bytes for t in launches)
    reread_dram = sum(t.reread_dram_bytes for t in launches)
    distinct_stores = sum(x.distinct_stored for t in launches for x in t.tensors)
    return Counted(
        launches=len(launches),
        loaded=sum(t.loaded for t in launches) / elements,
        stored=sum(t.stored for t in launches) / elements,
        reread=reread / elements,
        dram=(sum(t.dram_read_bytes for t in launches) + distinct_stores) / elements,
        reread_hit_rate=1.0 if reread == 0 else max(0.0, 1.0 - reread_dram / reread),
        ex2=sum(t.ex2 for t in launches) / elements,
        lg2=sum(t.lg2 for t in launches) / elements,
    )


def logits(rows, vocab, dtype, seed=1):
    gen = torch.Generator().manual_seed(seed)
    teacher = 3.0 * torch.randn(rows, vocab, generator=gen)
    student = 0.7 * teacher + 1.8 * torch.randn(rows, vocab, generator=gen)
    return student.to(dtype), teacher.to(dtype)


def sparse_support(rows, vocab, slots, seed=2):
    gen = torch.Generator().manual_seed(seed)
    indices = torch.stack([torch.randperm(vocab, generator=gen)[:slots] for _ in range(rows)])
    logprobs = torch.log_softmax(torch.randn(rows, slots, generator=gen), -1) - 0.05  # mass 0.95
    return indices, logprobs


# Each scenario: (emu, rows, vocab, dtype, **l2) -> (result, [LaunchTraffic]). The formula is the
# documented global bytes per element (e: bytes of one logit) that the counted loads + stores must
# equal when the row fits the shared-memory cache, before O(rows) terms.
def _kl(student_grad, teacher_grad):
    def run(emu, rows, vocab, dtype, **l2):
        s, t = logits(rows, vocab, dtype)
        return emu.traffic("kl_div_logits", s, t, None, 1.0, False, "sum", student_grad, teacher_grad, **l2)
    return run


def _jsd(student_grad):
    def run(emu, rows, vocab, dtype, **l2):
        s, t = logits(rows, vocab, dtype)
        return emu.traffic("jsd_logits", s, t, None, 0.5, 1.0, "sum", student_grad, False, **l2)
    return run


def _sparse(renormalize, slots=64):
    def run(emu, rows, vocab, dtype, **l2):
        s, _ = logits(rows, vocab, dtype)
        indices, logprobs = sparse_support(rows, vocab, slots)
        return emu.traffic("sparse_kl_div", s, indices, logprobs, None, 1.0, renormalize, "sum", 1e-3, False,
                           True, False, **l2)
    return run


def _grad_scale(factor):
    def run(emu, rows, vocab, dtype, **l2):
        grad, _ = logits(rows, vocab, dtype)
        return emu.traffic("grad_scale_", grad, torch.tensor(factor, dtype=torch.float32), **l2)
    return run


def hard_labels(rows, vocab, seed=3):
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (rows,), generator=gen)


DISTILL_TEMPERATURE = 2.0  # the front door's rows: T != 1, where the hard term keeps sums of its own


def distillation(emu, rows, vocab, dtype, form, *, labels=True, temperature=DISTILL_TEMPERATURE,
                 label_smoothing=0.0, slots=64, **l2):
    """The front door's op (kl_fused.distillation_loss) with the student's gradient: form "kl" or "jsd"
    (a dense teacher) or "topk" (the bucket tail, K = slots); labels=False leaves the hard term out
    (the soft kernels run). Returns (result, [LaunchTraffic])."""
    from kl_fused._sparse_args import support_mass_tolerance
    s, t = logits(rows, vocab, dtype)
    idx, lp = sparse_support(rows, vocab, slots) if form == "topk" else (None, None)
    tolerance = support_mass_tolerance(lp.dtype, slots) if form == "topk" else 0.0
    return emu.traffic("distillation_loss", s, None if form == "topk" else t, idx, lp,
                       hard_labels(rows, vocab) if labels else None, None, None,
                       "jsd" if form == "jsd" else "forward_kl", 0.5, False, temperature, 0.7,
                       0.5 if labels else 0.0, -100, label_smoothing, "sum", tolerance, False, True, False, False,
                       **l2)


def _distill(form, upstream):
    """One training step of the front door: the op's launch (loss, student gradient at upstream 1,
    the weights applied inside), then backward's grad_scale_ of that gradient by the upstream."""
    def run(emu, rows, vocab, dtype, **l2):
        result, forward = distillation(emu, rows, vocab, dtype, form, **l2)
        _, backward = emu.traffic("grad_scale_", result[1], torch.tensor(upstream, dtype=torch.float32), **l2)
        return result, forward + backward
    return run


def _shards(emu, rows, vocab, dtype, **l2):
    """One rank's shard through both launches of the vocab-parallel path (forward: states; backward:
    the gradient from the merged statistics, here the shard's own)."""
    from kl_fused import _shard_math
    s, t = logits(rows, vocab, dtype)
    states, first = emu.traffic("kl_row_states", s, t, None, 1.0, False, **l2)
    maxima = states[:, :2].contiguous()
    _, stats = _shard_math.finish_rows(maxima, _shard_math.rescaled_sums(states, maxima, False, 1.0), None, False)
    factor = torch.ones(rows, dtype=states.dtype)
    grads, second = emu.traffic("kl_grad_from_stats", s, t, None, stats.contiguous(), factor, 1.0, False, True, False,
                                **l2)
    return grads, first + second


@dataclasses.dataclass(frozen=True)
class Scenario:
    name: str
    run: object
    formula: str          # documented bytes per element, in e
    bytes_in_e: int       # the formula's number of e (logits-sized reads and writes)
    launches: int
    floor_in_e: int       # the design notes' floor for what the call delivers


_OP_SCENARIOS = (
    Scenario("kl_div_logits, loss only", _kl(False, False), "2e (read s, t)", 2, 1, 2),
    Scenario("kl_div_logits + student grad", _kl(True, False), "3e (read s, t; write ds)", 3, 1, 3),
    Scenario("kl_div_logits + both grads", _kl(True, True), "4e (read s, t; write ds, dt)", 4, 1, 4),
    Scenario("jsd_logits + student grad", _jsd(True), "3e (3 passes, row cached)", 3, 1, 3),
    Scenario("sparse_kl_div bucket + grad (K=64)", _sparse(False), "2e (read s; write ds) + O(K)", 2, 1, 2),
    Scenario("sparse_kl_div renormalize + grad (K=64)", _sparse(True), "1e (write ds) + O(K)", 1, 1, 1),
    Scenario("vocab-parallel shard: states + student grad", _shards, "5e (read s, t twice; write ds)", 5, 2, 3),
)
_GRAD_SCALE_SCENARIOS = (
    Scenario("grad_scale_, factor 2 (backward, upstream != 1)", _grad_scale(2.0), "2e (read, write g)", 2, 1, 0),
    Scenario("grad_scale_, factor 1 (backward, upstream 1)", _grad_scale(1.0), "0 (factor read only)", 0, 1, 0),
)


def _distill_scenarios():
    """The front door's rows: each form at upstream 1 (the op's bytes) and 0.5 (grad_scale_ adds 2e)."""
    forms = (("kl", "kl", "3e (read s, t; write ds)", "", 3), ("jsd", "jsd", "3e (3 passes, row cached)", "", 3),
             ("topk", "top-k bucket (K=64)", "2e (read s; write ds)", " + O(K)", 2))
    for form, label, formula, slots, n in forms:
        yield Scenario(f"distillation_loss {label} + labels, upstream 1", _distill(form, 1.0),
                       f"{formula}{slots} + label logit per row", n, 2, n)
        yield Scenario(f"distillation_loss {label} + labels, upstream 0.5", _distill(form, 0.5),
                       f"{n + 2}e ({n}e; grad_scale_ 2e){slots} + label logit per row", n + 2, 2, n)


SCENARIOS = (*_OP_SCENARIOS, *_distill_scenarios(), *_GRAD_SCALE_SCENARIOS)

# Liger-Kernel (github:linkedin/Liger-Kernel, src/liger_kernel/ops/kl_div.py and jsd.py at
# ead96b6) takes log-probabilities: the caller's torch.log_softmax of student and teacher is a pass
# of its own each (read e, write e: a lower bound, PyTorch's softmax of a row wider than shared
# memory reads it more than once), and autograd's log_softmax backward reads the gradient and the
# saved output and writes ds (3e). Its KL kernel reads both log-prob rows (2e); its backward
# kernel reads the target and writes a new gradient (2e), then `derivative / BT` for batchmean (2e)
# and `new_grads * grad_output` when the upstream is not 1 (2e; its torch.equal against 1.0 is a
# host synchronisation). Its JSD kernel reads 2e and writes dX (e) and a float32 loss per element
# (4 bytes, then summed: 4 bytes read).
LIGER = {
    "kl_div_logits + student grad": ("2e+2e log_softmax, 2e fwd, 2e bwd, 2e batchmean, 3e log_softmax bwd", lambda e: 13 * e),
    "jsd_logits + student grad": ("2e+2e log_softmax, 3e + 8 B fwd, 3e log_softmax bwd", lambda e: 10 * e + 8),
}


def predicted_ms(bytes_per_element, rows, vocab):
    return bytes_per_element * rows * vocab / H100_BANDWIDTH * 1e3


def measure(emu, vocab, dtype=torch.bfloat16, rows=EMULATED_ROWS):
    """{scenario name: Counted} at one width, the L2 share of a full H100 grid."""
    out = {}
    for sc in SCENARIOS:
        _, launches = sc.run(emu, rows, vocab, dtype, resident_blocks=RESIDENT_BLOCKS)
        out[sc.name] = count(launches, rows * vocab)
    return out


def table(results, e=2, before=None):
    lines = [
        "# CUDA kernels' memory traffic: counted by the SIMT emulator, H100 time PREDICTED",
        "",
        "PREDICTED, NOT MEASURED: no GPU has run these kernels for this table. Generated by",
        "`python tests/cuda_traffic.py --write` (" + datetime.date.today().isoformat() + "): each scenario ran under the SIMT",
        f"emulator on {EMULATED_ROWS} row(s) of bf16 at the real width, which counted every global byte each",
        "launch loaded and stored; every row is the same work, so bytes per element hold for any number",
        "of rows. *Model* is the L2 model's device-memory traffic (tests/simt/memory_checks.cpp: an LRU",
        "of 128-byte lines per block holding 50 MB / 132 resident blocks, fed in lock-step order; evict-",
        "first accesses enter at its cold end): first reads, re-reads the share lost, and every byte",
        "written. *Re-read hit* is the model's share of re-read bytes served from L2. Time = model bytes /",
        f"({H100_BANDWIDTH / 1e12:.3f} TB/s, 90% of an H100 SXM's 3.35 TB/s), ignoring launch overhead, the last wave",
        "and compute (JSD's 6 ex2 + 2 lg2 per element may make it MUFU-bound first). Floor: the design",
        "notes' bytes for what the call delivers (2e loss only, 3e loss + student gradient). The",
        "PyTorch reductions around the kernels (a sum over rows) are not counted: O(rows).",
        "*Before*: the model's count before the change that altered the row: for the kl_div_logits and",
        "jsd_logits rows with a gradient and the distillation_loss kl and jsd rows, the one-block kernels",
        "(a row too wide for 227 KB of shared memory re-read its uncached tail, once per later pass: JSD",
        "has two, the first most recently read first; at 262144 the L2 share keeps only part of it); now,",
        "on sm_90+, such a row is spread over a thread-block cluster of up to 8 blocks (csrc/cuda/",
        "kl_div_cuda.cu's kl_cluster_rows_kernel and kl_hard_cluster_rows_kernel, jsd_cuda.cu's",
        "jsd_cluster_rows_kernel and jsd_hard_cluster_rows_kernel: 5 blocks at 262144, 3 at 128256), each",
        "caching a slice, their row states (and JSD's K_p, K_q) merged through distributed shared memory:",
        "every byte read once. Rows no change altered show the same count (the third decimal moves with",
        "where the tensors fall on 128-byte lines). The sparse kernels keep the one-block row cache (their",
        "re-reads are of the student alone, and the model serves them all). Their last pass reads",
        "forward: it is evict-first, which in the model keeps the lines it has not reached yet in either",
        "order (whether the hardware's evict-first hint does as much is what a GPU would have to show),",
        "and its backward loop made kernels spill on sm_90.",
        "A training step in eager mode with an upstream gradient other than 1 adds the grad_scale_",
        "row (2e); with upstream 1 (or under `kl_fused.linear`'s chunk loop, whose row kernel is the",
        "kl_div_logits + student grad row per chunk) it moves nothing over rows x V.",
        "The *distillation_loss* rows are the front door (`kl_fused.distillation_loss` with labels, T = "
        f"{DISTILL_TEMPERATURE:g},",
        "soft weight 0.7, hard weight 0.5; its hard kernels, csrc/cuda/distill_cuda.cu) in one training step:",
        "the op's launch (loss and student gradient, the weights applied inside), then backward's",
        "grad_scale_ by the upstream gradient (nothing over rows x V at upstream 1, 2e otherwise). The",
        "hard term adds no pass over rows x V: the label's logit and gradient element per row, and the",
        "labels read by every thread (8 B a thread and row: the ~0.03 B/elem of *loaded* beyond the soft",
        "kernel's, absorbed by L2 in the model); at T != 1 its own softmax at T = 1 adds 2 ex2 per element.",
        "",
    ]
    for vocab, counted in results.items():
        rows = {v: r for r, v in SHAPES}[vocab]
        lines += [
            f"## {rows} x {vocab} bf16 (e = 2 bytes)",
            "",
            "| op and path | launches | documented | loaded B/elem | stored B/elem | re-read B/elem | re-read hit (model) "
            "| model B/elem | model B/elem before | floor B/elem | predicted H100 ms | floor ms | ex2/elem | lg2/elem |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for sc in SCENARIOS:
            c = counted[sc.name]
            floor = sc.floor_in_e * e
            old = (before or {}).get(str(vocab), {}).get(sc.name)
            old = f"{old['dram']:.3f}" if old else "-"
            lines.append(
                f"| {sc.name} | {c.launches} | {sc.formula} | {c.loaded:.3f} | {c.stored:.3f} | {c.reread:.3f} | "
                f"{c.reread_hit_rate:.0%} | {c.dram:.3f} | {old} | {floor} | {predicted_ms(c.dram, rows, vocab):.2f} | "
                f"{predicted_ms(floor, rows, vocab):.2f} | {c.ex2:.2f} | {c.lg2:.2f} |")
        lines.append("")
        lines += [
            "Liger-Kernel, same shape, counted on paper from its source (PREDICTED, lower bounds):",
            "",
            "| op | passes | B/elem | predicted H100 ms |",
            "|---|---|---|---|",
        ]
        for name, (passes, per_e) in LIGER.items():
            b = per_e(e)
            lines.append(f"| {name} | {passes} | {b} | {predicted_ms(b, rows, vocab):.2f} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"rewrite {TABLE.relative_to(ROOT)}")
    parser.add_argument("--json", type=pathlib.Path, help="save the counts here")
    parser.add_argument("--before", type=pathlib.Path, help="an earlier --json, shown as the 'before' column")
    args = parser.parse_args(argv)
    from simt.emulator import Emulator
    emu = Emulator()
    results = {vocab: measure(emu, vocab) for _, vocab in SHAPES}
    if args.json:
        args.json.write_text(json.dumps({str(v): {n: dataclasses.asdict(c) for n, c in r.items()}
                                         for v, r in results.items()}, indent=1))
    text = table(results, before=json.loads(args.before.read_text()) if args.before else None)
    if args.write:
        TABLE.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
