"""The range of |logit| / T that every kernel family computes right (README, "The contract"), on the
CPU kernels: kl_div_logits, jsd_logits, sparse_kl_div and the vocab-parallel shard kernels with their
merge, against the float64 reference on the same input values; a logit near float32's limit in rows
wider than one 1024-element chunk; and the temperatures that are rejected because 1/T is no normal
number of the accumulation type. (The CUDA kernels get the same cases in test_cuda_emulated*.py.)"""

import math

import pytest
import torch

import kl_fused
from kl_fused import _shard_math
from conftest import (TOLERANCES, assert_close, assert_grad_close, assert_weighted_grad_close, fused_op_must_run,
                      jsd_reference64, logits_at_scale, reference64)
from sparse_helpers import make_sparse
from sparse_helpers import reference64 as sparse_reference64

KL_OP = torch.ops.kl_fused.kl_div_logits.default
JSD_OP = torch.ops.kl_fused.jsd_logits.default
SPARSE_OP = torch.ops.kl_fused.sparse_kl_div.default
# |logit| / T: where the old kernels started failing (1e9 in float32), far beyond it, and the top of the
# documented range (float32 and 16-bit inputs; float64 inputs go to 1e300).
SCALES = [1e10, 1e20, 1e35]


def fused_rows_and_grads(fn, student, teacher, op, **options):
    s, t = student.clone().requires_grad_(), teacher.clone().requires_grad_()
    with fused_op_must_run(op):
        rows = fn(s, t, reduction="none", **options)
    rows.sum().backward()
    return rows, s.grad, t.grad


def test_the_reviews_example_is_1e10():
    student = torch.tensor([[0.0, 1, 2, 3]])
    teacher = student.flip(-1).clone()
    rows, grad_s, grad_t = fused_rows_and_grads(kl_fused.kl_div_logits, student, teacher, KL_OP, temperature=3e-10)
    ref, s64, t64 = reference64(student, teacher, temperature=3e-10, reduction="none")
    ref.sum().backward()
    assert_close(rows, ref, 1e-6, 0.0, "KL near 1e10")
    assert_grad_close(grad_s, s64.grad, torch.float32, "student grad")
    assert_grad_close(grad_t, t64.grad, torch.float32, "teacher grad")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("vocab", [50, 2100])
@pytest.mark.parametrize("scale", SCALES)
def test_kl_at_huge_logit_over_temperature(dtype, direction, vocab, scale):
    student, teacher, temperature = logits_at_scale((3, vocab), dtype, scale, seed=vocab)
    rows, grad_s, grad_t = fused_rows_and_grads(kl_fused.kl_div_logits, student, teacher, KL_OP,
                                                temperature=temperature, direction=direction)
    ref, s64, t64 = reference64(student, teacher, temperature=temperature, direction=direction, reduction="none")
    tol = TOLERANCES[dtype]
    assert_close(rows, ref, tol["loss_rtol"], tol["loss_atol"], "loss")
    if scale <= 1e10:  # beyond, the teacher's gradient (|logit| / T)^2 / |logit| overflows float32 itself
        ref.sum().backward()
        assert_grad_close(grad_s, s64.grad, dtype, "student grad")
        assert_weighted_grad_close(grad_t, t64.grad, dtype, scale, temperature, "teacher grad")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("beta", [0.5, 0.1])
@pytest.mark.parametrize("vocab", [50, 4000])
@pytest.mark.parametrize("scale", SCALES)
def test_jsd_at_huge_logit_over_temperature(dtype, beta, vocab, scale):
    student, teacher, temperature = logits_at_scale((4, vocab), dtype, scale, seed=vocab + 1)
    rows, grad_s, grad_t = fused_rows_and_grads(kl_fused.jsd_logits, student, teacher, JSD_OP,
                                                temperature=temperature, beta=beta)
    ref, s64, t64 = jsd_reference64(student, teacher, temperature=temperature, beta=beta, reduction="none")
    bound = -beta * math.log(beta) - (1 - beta) * math.log(1 - beta)  # JSD_beta <= H(beta)
    assert (rows <= bound * (1 + 1e-6)).all(), f"above the JSD's bound {bound}: {rows}"
    tol = TOLERANCES[dtype]
    assert_close(rows, ref, tol["loss_rtol"], tol["loss_atol"], "loss")
    ref.sum().backward()
    assert_grad_close(grad_s, s64.grad, dtype, "student grad")
    assert_grad_close(grad_t, t64.grad, dtype, "teacher grad")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize("vocab", [300, 2500])
@pytest.mark.parametrize("scale", SCALES)
def test_sparse_at_huge_logit_over_temperature(dtype, tail, vocab, scale):
    student, idx, lp = make_sparse((3,), vocab, 16, dtype, seed=vocab, teacher_scale=10.0, temperature=10.0 / scale)
    temperature = 10.0 / scale
    s = student.clone().requires_grad_()
    with fused_op_must_run(SPARSE_OP):
        rows = kl_fused.sparse_kl_div(s, idx, lp, temperature=temperature, tail=tail, reduction="none")
    rows.sum().backward()
    ref, s64, _ = sparse_reference64(student, idx, lp, temperature=temperature, tail=tail, reduction="none")
    tol = TOLERANCES[dtype]
    assert_close(rows, ref, tol["loss_rtol"], tol["loss_atol"], "loss")
    if scale <= 1e10:
        ref.sum().backward()
        assert_grad_close(s.grad, s64.grad, dtype, "student grad")


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("scale", SCALES)
def test_shards_of_a_row_at_huge_logit_over_temperature(reverse, scale):
    """kl_row_states on two shards, the merge of _shard_math, kl_grad_from_stats: the full rows' KL."""
    student, teacher, temperature = logits_at_scale((5, 3000), torch.float32, scale, seed=7)
    cut = 1300
    shards = ((student[:, :cut], teacher[:, :cut]), (student[:, cut:], teacher[:, cut:]))
    with fused_op_must_run(torch.ops.kl_fused.kl_row_states.default):
        states = [torch.ops.kl_fused.kl_row_states(s, t, None, temperature, reverse) for s, t in shards]
    maxima = torch.maximum(states[0][:, :2], states[1][:, :2])
    sums = sum(_shard_math.rescaled_sums(st, maxima, reverse, temperature) for st in states)
    rows, stats = _shard_math.finish_rows(maxima, sums, None, reverse)
    direction = "reverse" if reverse else "forward"
    ref, s64, _ = reference64(student, teacher, temperature=temperature, direction=direction, reduction="none")
    assert_close(rows, ref, 2e-5, 0.0, "merged KL")
    if scale <= 1e10:
        factor = torch.ones(5)
        with fused_op_must_run(torch.ops.kl_fused.kl_grad_from_stats.default):
            grads = [torch.ops.kl_fused.kl_grad_from_stats(s, t, None, stats.contiguous(), factor, temperature, reverse,
                                                           True, False)[0] for s, t in shards]
        ref.sum().backward()
        grad = torch.cat(grads, dim=1) / temperature
        if reverse:  # the student's is the weighted gradient q (log q - log p - KL) / T
            assert_weighted_grad_close(grad, s64.grad, torch.float32, scale, temperature, "shard gradients")
        else:
            assert_grad_close(grad, s64.grad, torch.float32, "shard gradients")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("vocab", [500, 2100])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("big", [1e37, 3e38])
def test_a_logit_near_the_float32_limit(dtype, vocab, direction, big):
    """One logit of 1e37 in the distribution the expectation is over (the review's example), in rows
    narrower and wider than a 1024-element chunk: the chunk merge once gave NaN (0 * inf)."""
    student, teacher = (x.to(dtype) for x in logits_at_scale((2, vocab), torch.float64, 10.0, seed=3)[:2])
    (teacher if direction == "forward" else student)[:, vocab - 600] = big
    for fn, op, options in ((kl_fused.kl_div_logits, KL_OP, dict(direction=direction)),
                            (kl_fused.jsd_logits, JSD_OP, dict(beta=0.3))):
        rows, grad_s, grad_t = fused_rows_and_grads(fn, student, teacher, op, **options)
        if fn is kl_fused.kl_div_logits:
            ref, _, _ = reference64(student, teacher, reduction="none", **options)
        else:
            ref, _, _ = jsd_reference64(student, teacher, reduction="none", **options)
        assert_close(rows, ref, 2e-5, 1e-6, f"{fn.__name__}")
        assert not grad_s.isnan().any() and not grad_t.isnan().any()


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_beyond_the_range_a_kl_overflows_to_inf_never_nan(direction):
    """A logit of 1e37 in the other distribution: KL ~ 1e37 times the mass it weighs, whose running sum
    overflows float32 here (the documented limit of |logit| / T, 1e35); the row is then +inf, not NaN
    nor a wrong finite value, and the other rows are right."""
    student, teacher, _ = logits_at_scale((3, 2100), torch.float32, 10.0, seed=4)
    (student if direction == "forward" else teacher)[0, 1500] = 1e37
    rows = kl_fused.kl_div_logits(student, teacher, direction=direction, reduction="none")
    ref, _, _ = reference64(student, teacher, direction=direction, reduction="none")
    assert rows[0].item() == math.inf or math.isclose(rows[0].item(), ref[0].item(), rel_tol=1e-5)
    assert_close(rows[1:], ref[1:], 2e-5, 1e-6, "other rows")


@pytest.mark.parametrize("dtype, temperature", [(torch.float32, 1e-39), (torch.bfloat16, 2e-39), (torch.float32, 1e38),
                                                (torch.float64, 1e-309)], ids=str)
def test_temperatures_whose_reciprocal_is_no_normal_number_are_rejected(dtype, temperature):
    student, teacher = (x.to(dtype) for x in logits_at_scale((2, 8), torch.float64, 10.0, seed=5)[:2])
    idx, lp = kl_fused.topk_teacher(teacher, 3)
    calls = [lambda: kl_fused.kl_div_logits(student, teacher, temperature=temperature),
             lambda: kl_fused.reference.kl_div_logits(student, teacher, temperature=temperature),
             lambda: kl_fused.jsd_logits(student, teacher, temperature=temperature),
             lambda: kl_fused.sparse_kl_div(student, idx, lp, temperature=temperature),
             lambda: kl_fused.linear_kl_div(student, torch.eye(8, dtype=dtype), teacher, temperature=temperature)]
    for call in calls:
        with pytest.raises(ValueError, match=r"temperature .* 1/T .* (float32|float64)"):
            call()


def test_float64_inputs_take_temperatures_float32_cannot():
    student, teacher, _ = logits_at_scale((2, 40), torch.float64, 10.0, seed=6)
    rows = kl_fused.kl_div_logits(student, teacher, temperature=1e-39, reduction="none")
    ref, _, _ = reference64(student, teacher, temperature=1e-39, reduction="none")
    assert_close(rows, ref, 1e-10, 0.0, "float64 at T = 1e-39")


DISTILL_OP = torch.ops.kl_fused.distillation_loss.default


@pytest.mark.parametrize("teacher", ["forward_kl", "reverse_kl", "jsd", "topk"])
@pytest.mark.parametrize("vocab", [50, 2100])
def test_distillation_step_at_huge_logit_over_temperature(teacher, vocab):
    """The distillation step's soft term at |logit| / T = 1e10 beside its hard term at T = 1 (the same
    logits, of order 10): rows, parts and the student's gradient against the float64 reference."""
    student, dense, temperature = logits_at_scale((3, vocab), torch.float32, 1e10, seed=vocab + 1)
    labels = torch.tensor([5, vocab - 1, -100])
    options = dict(labels=labels, hard_weight=0.5, label_smoothing=0.1, temperature=temperature, reduction="none",
                   return_parts=True)
    if teacher == "topk":
        idx, lp = kl_fused.topk_teacher(dense.double(), 8, temperature=temperature)
        fused_teacher, ref_teacher = dict(teacher_topk=(idx, lp.float())), dict(teacher_topk=(idx, lp.float().double()))
    else:
        options["divergence"] = teacher
        fused_teacher, ref_teacher = dict(teacher_logits=dense), dict(teacher_logits=dense.double())
    s = student.clone().requires_grad_()
    with fused_op_must_run(DISTILL_OP):
        parts = kl_fused.distillation_loss(s, **fused_teacher, **options)
    parts.loss.sum().backward()
    s64 = student.double().requires_grad_()
    ref = kl_fused.reference.distillation_loss(s64, **ref_teacher, **options)
    ref.loss.sum().backward()
    tol = TOLERANCES[torch.float32]
    for got, want, what in zip(parts, ref, ("loss", "soft", "hard")):
        assert_close(got, want, tol["loss_rtol"], tol["loss_atol"], what)
    assert_grad_close(s.grad, s64.grad, torch.float32, "student grad")
