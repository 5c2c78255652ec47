"""What each spawned rank runs in test_distributed.py. Every rank builds the same full logits from a
seed, keeps its own vocabulary shard, and compares the vocab-parallel loss and its shard's gradients
with single-process kl_fused.kl_div_logits on the full logits."""

import datetime
import itertools
import os
import re
import sys

import pytest
import torch
import torch.distributed as dist

import kl_fused
from conftest import TOLERANCES, assert_close, assert_grad_close, fused_op_must_run, make_logits
from kl_fused.distributed import kl_div_logits_vocab_parallel

# Unequal shard widths per world size: a narrow rank (width 1 or 2) in each, and a shard wider
# than the CPU kernel's 1024-element chunk.
WIDTHS = {2: [1500, 37], 3: [1, 1203, 400], 4: [250, 2, 1101, 251]}


def run(rank, world_size, init_file, scenario):
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size,
        timeout=datetime.timedelta(seconds=60),
    )
    torch.set_num_threads(1)
    try:
        SCENARIOS[scenario](rank, world_size)
    finally:
        dist.destroy_process_group()
    exit_without_finalizing()


def exit_without_finalizing():
    """Ends a rank that succeeded without Python's finalisation. A gloo worker thread may still be
    releasing a finished all_reduce's tensors when the interpreter shuts down; it then needs the GIL
    and the process aborts ("terminate called without an active exception", about 1 run in 12
    here; the core dump shows ProcessGroupGloo::runLoop -> ~AsyncAllreduceWork -> decref_pyobject
    -> take_gil -> pthread_exit). That is torch's race, not this test's result."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _bounds(widths, rank):
    start = sum(widths[:rank])
    return start, start + widths[rank]


def _check(full_student, full_teacher, widths, rank, group=None, dtype=torch.float32, what="", **options):
    """Vocab-parallel on this rank's shard against kl_div_logits on the full logits: loss and both
    shard gradients, under an upstream gradient that is not 1 (per-row weights for "none")."""
    start, end = _bounds(widths, rank)
    student = full_student[..., start:end].clone().requires_grad_()
    teacher = full_teacher[..., start:end].clone().requires_grad_()
    inputs_before = (student.detach().clone(), teacher.detach().clone())
    with fused_op_must_run(torch.ops.kl_fused.kl_row_states.default):
        loss = kl_div_logits_vocab_parallel(student, teacher, group=group, **options)

    ref_student = full_student.clone().requires_grad_()
    ref_teacher = full_teacher.clone().requires_grad_()
    ref = kl_fused.kl_div_logits(ref_student, ref_teacher, **options)
    assert loss.dtype == ref.dtype and loss.shape == ref.shape, what
    tol = TOLERANCES[dtype]
    assert_close(loss, ref, tol["loss_rtol"], tol["loss_atol"], f"{what} loss")

    weights = torch.linspace(0.5, 2.0, ref.numel(), dtype=ref.dtype).view(ref.shape) if ref.dim() else torch.tensor(1.7, dtype=ref.dtype)
    weights = torch.where(torch.isfinite(ref), weights, 0.0) if ref.dim() else weights
    finite = torch.isfinite(ref).all()
    if finite or ref.dim():
        with fused_op_must_run(torch.ops.kl_fused.kl_grad_from_stats.default):
            (loss.nan_to_num(0.0) * weights).sum().backward()
        (ref.nan_to_num(0.0) * weights).sum().backward()
        assert_grad_close(student.grad, ref_student.grad[..., start:end], dtype, f"{what} student grad")
        assert_grad_close(teacher.grad, ref_teacher.grad[..., start:end], dtype, f"{what} teacher grad")
    for after, before in zip((student.detach(), teacher.detach()), inputs_before):
        torch.testing.assert_close(after, before, rtol=0, atol=0, equal_nan=True, msg=f"{what}: an input was modified")
    return loss


def compare_with_full_rows(rank, world_size):
    """Both directions, temperatures, masks, every reduction, 16-bit and fp32, unequal shards."""
    widths = WIDTHS[world_size]
    vocab = sum(widths)
    dtypes = [torch.float32, torch.bfloat16, torch.float16]
    for dtype, direction, temperature, masked, reduction in itertools.product(
        dtypes, ["forward", "reverse"], [1.0, 2.5], [False, True], ["none", "sum", "batchmean", "mean"]
    ):
        seed = 100 * world_size + dtypes.index(dtype)
        student, teacher = make_logits((3, 5, vocab), dtype, "cpu", seed=seed)
        mask = None
        if masked:
            mask = torch.rand(3, 5, generator=torch.Generator().manual_seed(seed)) > 0.4
            student[~mask] = float("nan")  # padding rows are never read
        what = f"world {world_size} rank {rank} {dtype} {direction} T={temperature} mask={masked} {reduction}"
        _check(student, teacher, widths, rank, dtype=dtype, what=what, temperature=temperature,
               direction=direction, reduction=reduction, mask=mask)
    # float64: agreement far below the 16-bit tolerances.
    student, teacher = make_logits((4, vocab), torch.float64, "cpu", seed=7)
    _check(student, teacher, widths, rank, dtype=torch.float64, what="float64", reduction="none")


def edge_rows(rank, world_size):
    """Rows whose maxima live on one rank, a side that is all -inf on a whole shard, infinite and
    NaN rows, huge logits; and every row masked (loss 0, zero gradient, no hang)."""
    widths = WIDTHS[world_size]
    start0, end0 = _bounds(widths, 0)
    student, teacher = make_logits((6, sum(widths)), torch.float32, "cpu", seed=55)
    teacher[0, start0:end0] = float("-inf")      # rank 0 holds no teacher mass in row 0
    student[1, start0:end0] = float("-inf")      # nor student mass in row 1
    teacher[2, -1] = 60.0                        # row 2's teacher mass sits on the last rank
    student[3, end0 - 1] = float("-inf")         # student has no mass where the teacher has: KL = inf
    teacher[3, end0 - 1] = 5.0
    student[4] += 1e4                            # huge logits
    teacher[4] -= 1e4
    for direction in ("forward", "reverse"):
        loss = _check(student, teacher, widths, rank, what=f"edges {direction}", reduction="none", direction=direction)
        # forward: student -inf where the teacher has mass (rows 1, 3); reverse: the other way (row 0)
        infinite = [1, 3] if direction == "forward" else [0]
        assert torch.isinf(loss[infinite]).all(), f"rank {rank} {direction}: {loss}"
        assert torch.isfinite(loss[[2, 4, 5]]).all(), f"rank {rank} {direction}: {loss}"

    clean_student, clean_teacher = make_logits((6, sum(widths)), torch.float32, "cpu", seed=56)
    clean_student[5, -1] = float("nan")          # a NaN on the last rank only
    start, end = _bounds(widths, rank)
    shard = clean_student[:, start:end].clone().requires_grad_()
    rows = kl_div_logits_vocab_parallel(shard, clean_teacher[:, start:end], reduction="none")
    assert torch.isnan(rows[5]) and torch.isfinite(rows[:5]).all(), f"rank {rank}: the NaN reaches every rank"
    rows.sum().backward()
    assert torch.isnan(shard.grad[5]).all() and torch.isfinite(shard.grad[:5]).all()

    all_masked = torch.zeros(6, dtype=torch.bool)
    shard = student[:, start:end].clone().requires_grad_()
    loss = kl_div_logits_vocab_parallel(shard, teacher[:, start:end], mask=all_masked)
    loss.backward()
    assert loss.item() == 0.0 and (shard.grad == 0).all()


def sub_group(rank, world_size):
    """A two-rank sub-group of a larger world: ranks 0 and 1 split the vocabulary between them."""
    group = dist.new_group([0, 1])
    if rank > 1:
        return
    widths = [333, 500]
    student, teacher = make_logits((4, 833), torch.float32, "cpu", seed=77)
    _check(student, teacher, widths, rank, group=group, what="sub-group", reduction="batchmean", temperature=2.0)


def bad_calls_raise_everywhere(rank, world_size):
    """Each bad call raises on every rank (none of them waits on a collective the others skip),
    and the group still works afterwards."""
    widths = WIDTHS[world_size]
    start, end = _bounds(widths, rank)
    student, teacher = make_logits((4, sum(widths)), torch.float32, "cpu", seed=88)
    s, t = student[:, start:end], teacher[:, start:end]
    last = world_size - 1

    rows = 3 if rank == last else 4
    with pytest.raises(ValueError, match="disagree on the number of rows"):
        kl_div_logits_vocab_parallel(s[:rows], t[:rows])
    dtype = torch.bfloat16 if rank == last else torch.float32
    with pytest.raises(ValueError, match="disagree on the logits' dtype"):
        kl_div_logits_vocab_parallel(s.to(dtype), t.to(dtype))
    mask = torch.tensor([True, True, rank != last, True])
    with pytest.raises(ValueError, match="disagree on the mask's counted rows"):
        kl_div_logits_vocab_parallel(s, t, mask=mask)
    with pytest.raises(ValueError, match="disagree on direction"):
        kl_div_logits_vocab_parallel(s, t, direction="reverse" if rank == last else "forward")
    # The same rows in another leading shape: the message shows each rank's shape.
    shapes = ["(4,)"] * last + ["(2, 2)"]
    with pytest.raises(ValueError, match=re.escape(f"disagree on the leading shape (rank by rank: {shapes})")):
        kl_div_logits_vocab_parallel(s.reshape(2, 2, -1) if rank == last else s, t.reshape(2, 2, -1) if rank == last else t)
    # Meta tensors hold no statistics to exchange: that rank names the device, the others name that rank.
    expected = "on device 'meta'" if rank == last else r"rank \d+ of the group rejected its arguments .*device 'meta'"
    with pytest.raises(ValueError, match=expected):
        kl_div_logits_vocab_parallel(s.to("meta") if rank == last else s, t.to("meta") if rank == last else t)
    # An invalid argument on one rank only: that rank raises its own error, the others name it.
    expected = "temperature must be finite" if rank == last else r"rank \d+ of the group rejected its arguments \(ValueError: temperature must be finite"
    with pytest.raises(ValueError, match=expected):
        kl_div_logits_vocab_parallel(s, t, temperature=0.0 if rank == last else 1.0)
    expected = "must have the same shape" if rank == last else "rejected its arguments"
    with pytest.raises(ValueError, match=expected):
        kl_div_logits_vocab_parallel(s, t[:, :-1] if rank == last else t)

    _check(student, teacher, widths, rank, what="after the errors")


def data_parallel_batchmean(rank, world_size):
    """The README's recipe on 4 ranks, 2-way data parallel x 2-way tensor parallel: reduction="sum"
    divided by the global count of counted rows gives, on every rank, the global per-token mean
    and the gradient of its rows and vocabulary shard."""
    assert world_size == 4
    tp_groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    dp_groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    dp_rank, tp_rank = divmod(rank, 2)
    tp_group, dp_group = tp_groups[dp_rank], dp_groups[tp_rank]
    widths = [700, 301]
    student, teacher = make_logits((2, 6, sum(widths)), torch.float32, "cpu", seed=99)
    mask = torch.tensor([[True, True, False, True, True, True], [False, True, False, False, True, False]])
    start, end = _bounds(widths, tp_rank)

    s = student[dp_rank, :, start:end].clone().requires_grad_()
    t = teacher[dp_rank, :, start:end]
    loss_sum = kl_div_logits_vocab_parallel(s, t, mask=mask[dp_rank], reduction="sum", group=tp_group)
    counted = mask[dp_rank].sum().to(loss_sum.dtype)
    dist.all_reduce(counted, group=dp_group)
    loss = loss_sum / counted.clamp_min(1)
    loss.backward()

    full_student = student.clone().requires_grad_()
    expected = kl_fused.kl_div_logits(full_student, teacher, mask=mask)  # batchmean of the global batch
    expected.backward()
    global_loss = loss.detach().clone()
    dist.all_reduce(global_loss, group=dp_group)
    assert_close(global_loss, expected, 2e-5, 2e-6, f"rank {rank}: global batchmean")
    assert_grad_close(s.grad, full_student.grad[dp_rank, :, start:end], torch.float32, f"rank {rank}: gradient")


SCENARIOS = {
    f.__name__: f
    for f in (compare_with_full_rows, edge_rows, sub_group, bad_calls_raise_everywhere, data_parallel_batchmean)
}
