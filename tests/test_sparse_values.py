"""sparse_kl_div and topk_teacher: values and gradients against the float64 reference, a numpy/scipy
oracle and TRL's own server-distillation loss; the edges of the contract. Every test proves the fused
op ran (make test reruns this file on the portable kernels)."""

import math

import pytest
import torch

import kl_fused
from conftest import DEVICES, TOLERANCES, assert_close, assert_grad_close, fused_op_must_run
from sparse_helpers import NEG_INF, make_sparse, numpy_rows, reference64, trl_loss

SPARSE_OP = torch.ops.kl_fused.sparse_kl_div.default
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]


@pytest.fixture(params=DEVICES)
def device(request):
    assert kl_fused.is_fused_available(request.param, "sparse_kl_div"), kl_fused.fused_unavailable_reason(request.param, "sparse_kl_div")
    return request.param


def fused_with_grads(student, indices, logprobs, *, weights=None, **kwargs):
    """Loss, student gradient and log-prob gradient of the fused path (which must run)."""
    s = student.detach().clone().requires_grad_()
    lp = logprobs.detach().clone().requires_grad_()
    with fused_op_must_run(SPARSE_OP):
        loss = kl_fused.sparse_kl_div(s, indices, lp, **kwargs)
    loss.backward(weights if weights is not None else torch.ones_like(loss))
    return loss, s.grad, lp.grad


def check_against_reference(student, indices, logprobs, dtype, *, weights=None, **kwargs):
    loss, grad_s, grad_lp = fused_with_grads(student, indices, logprobs, weights=weights, **kwargs)
    ref, s64, lp64 = reference64(student, indices, logprobs, **kwargs)
    tol = TOLERANCES[dtype]
    assert_close(loss, ref, tol["loss_rtol"], tol["loss_atol"], "loss vs float64 reference")
    ref.backward(weights.double() if weights is not None else torch.ones_like(ref))
    assert grad_s.dtype == student.dtype and grad_lp.dtype == logprobs.dtype
    assert_grad_close(grad_s, s64.grad, dtype, "student grad")
    assert_grad_close(grad_lp, lp64.grad, logprobs.dtype, "log-prob grad")
    return loss, grad_s, grad_lp


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 2.0])
def test_values_and_gradients_match_the_float64_reference_and_numpy(device, dtype, tail, temperature):
    student, idx, lp = make_sparse((3, 5), 700, 24, dtype, seed=1 + int(10 * temperature), unused=5,
                                   temperature=1.3)
    student, idx, lp = student.to(device), idx.to(device), lp.to(device)
    check_against_reference(student, idx, lp, dtype, temperature=temperature, tail=tail, reduction="sum")
    with fused_op_must_run(SPARSE_OP):
        rows = kl_fused.sparse_kl_div(student, idx, lp, temperature=temperature, tail=tail, reduction="none")
    tol = TOLERANCES[dtype]
    assert rows.shape == (3, 5)
    assert_close(rows, numpy_rows(student, idx, lp, temperature, tail), tol["loss_rtol"], tol["loss_atol"], "vs numpy")


@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize("masked", [False, True])
def test_values_and_student_gradients_equal_trl_server_distillation(device, tail, masked):
    """TRL's _compute_server_forward_kl_loss (beta = 0) on the same inputs: labels -100 <-> mask False,
    rows with fewer than K used slots (-inf), batchmean over the counted rows."""
    student, idx, lp = make_sparse((3, 6), 500, 16, torch.float32, seed=7, unused=4, temperature=1.0)
    student, idx, lp = student.to(device), idx.to(device), lp.to(device)
    mask = None
    if masked:
        mask = torch.rand(3, 6, generator=torch.Generator().manual_seed(8)).to(device) > 0.3
        mask[0, 0] = False
    s_trl = student.clone().requires_grad_()
    expected = trl_loss(s_trl, idx, lp, mask, 1.7, tail)
    expected.backward()
    loss, grad_s, _ = fused_with_grads(student, idx, lp, temperature=1.7, tail=tail, mask=mask)
    assert_close(loss, expected, 2e-5, 1e-6, "loss vs TRL")
    assert_grad_close(grad_s, s_trl.grad, torch.float32, "student grad vs TRL")


@pytest.mark.parametrize("temperature", [1.0, 1.5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_topk_teacher_with_k_equal_v_round_trips_to_kl_div_logits(device, temperature, dtype):
    gen = torch.Generator().manual_seed(11)
    teacher = (3 * torch.randn(4, 3, 300, generator=gen)).to(device, dtype)
    student = (3 * torch.randn(4, 3, 300, generator=gen)).to(device, dtype)
    idx, lp = kl_fused.topk_teacher(teacher, 300, temperature=temperature)
    assert idx.dtype == torch.int32 and lp.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert (lp[..., :-1] >= lp[..., 1:]).all(), "most likely first"
    s1, s2 = student.clone().requires_grad_(), student.clone().requires_grad_()
    with fused_op_must_run(SPARSE_OP):
        sparse = kl_fused.sparse_kl_div(s1, idx, lp, temperature=temperature)
    dense = kl_fused.kl_div_logits(s2, teacher, temperature=temperature)
    sparse.backward()
    dense.backward()
    tol = TOLERANCES[dtype]
    assert_close(sparse, dense, tol["loss_rtol"], 5e-6 if dtype != torch.float64 else 1e-12, "sparse K = V vs dense")
    assert_grad_close(s1.grad, s2.grad.double(), dtype, "student grad K = V vs dense")


def test_topk_teacher_values(device):
    teacher = torch.randn(5, 50, generator=torch.Generator().manual_seed(12)).to(device, torch.bfloat16)
    idx, lp = kl_fused.topk_teacher(teacher, 7, temperature=0.8)
    full = torch.log_softmax(teacher.double() / 0.8, -1)
    expected_lp, expected_idx = full.topk(7, dim=-1)
    assert torch.equal(idx.long(), expected_idx)
    assert_close(lp, expected_lp, 1e-6, 1e-6, "log-probs")


@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
def test_masks_with_nan_in_masked_rows_and_reductions(device, tail):
    student, idx, lp = make_sparse((4, 3), 200, 8, torch.float32, seed=13, unused=2)
    mask = torch.tensor([[1, 0, 1], [0, 0, 0], [1, 1, 0], [1, 0, 1]], dtype=torch.bool)
    student[~mask] = float("nan")     # masked rows are never read: NaN logits,
    idx[~mask] = -3                   # indices out of range,
    lp[~mask] = float("nan")          # and NaN log-probs change nothing
    student, idx, lp, mask = student.to(device), idx.to(device), lp.to(device), mask.to(device)
    for reduction in ("none", "sum", "batchmean", "mean"):
        loss, grad_s, grad_lp = check_against_reference(student, idx, lp, torch.float32, mask=mask, tail=tail,
                                                        reduction=reduction, temperature=1.2)
        assert torch.isfinite(loss).all()
        assert (grad_s[~mask] == 0).all() and (grad_lp[~mask] == 0).all()
    all_masked = torch.zeros_like(mask)
    loss, grad_s, _ = fused_with_grads(student, idx, lp, mask=all_masked, tail=tail)
    assert loss.item() == 0.0 and (grad_s == 0).all()


@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
def test_upstream_weights_with_reduction_none(device, tail):
    student, idx, lp = make_sparse((2, 3), 150, 6, torch.bfloat16, seed=14, unused=1)
    student, idx, lp = student.to(device), idx.to(device), lp.to(device)
    weights = torch.tensor([[0.5, 0.0, 2.0], [-1.0, 1.0, 3.0]], device=device)
    check_against_reference(student, idx, lp, torch.bfloat16, weights=weights, tail=tail, reduction="none",
                            temperature=0.9)


@pytest.mark.parametrize("lead", [35.0, 120.0])
def test_confident_student_keeps_an_accurate_positive_tail(device, lead):
    """The support holds all but ~1e-13 (or 1e-50) of the student's mass: q_r summed over the
    complement stays accurate where 1 - sum_S q (TRL clamps its log to <= -1e-7) has no digit left.
    At 120 nats the complement's terms fall below the exponential's floor relative to the support:
    the kernel must shift them by their own maximum."""
    student, idx, lp = make_sparse((4,), 3000, 10, torch.float32, seed=15)
    support = torch.zeros_like(student, dtype=torch.bool).scatter(-1, idx.long(), True)
    student = torch.where(support, student + lead, student)
    student, idx, lp = student.to(device), idx.to(device), lp.to(device)
    rows = kl_fused.sparse_kl_div(student, idx, lp, reduction="none")
    oracle = numpy_rows(student, idx, lp)
    assert torch.isfinite(rows).all() and (rows > 0).all()
    assert_close(rows, oracle, 2e-5, 0, f"loss vs numpy with the support {lead} nats ahead")
    loss, grad_s, grad_lp = check_against_reference(student, idx, lp, torch.float32, reduction="sum")
    rest = ~support.to(device)
    assert (grad_s[rest] < 0).all(), "the tail pulls every token off the support up"


@pytest.mark.parametrize("lp_dtype", [torch.bfloat16, torch.float16])
def test_support_mass_above_one_by_rounding_is_clamped_and_beyond_raises(device, lp_dtype):
    """A peaked teacher whose 16-bit log-probs sum above 1 within the tolerance: p_r = 0, the loss is the
    support's terms alone (and matches the reference); above the tolerance: ValueError."""
    student, idx, lp = make_sparse((6,), 300, 40, torch.float32, seed=16, teacher_scale=9.0)
    lp16 = (lp + 0.0015).to(lp_dtype)  # every p about 0.15% high
    mass = lp16.double().exp().sum(-1)
    assert (mass > 1).all(), "the test needs support masses above 1"
    student, idx, lp16 = student.to(device), idx.to(device), lp16.to(device)
    loss, _, _ = check_against_reference(student, idx, lp16, torch.float32, reduction="none")
    p = lp16.double().exp()
    log_q = torch.log_softmax(student.double(), -1).gather(-1, idx.long())
    assert_close(loss, (p * (lp16.double() - log_q)).sum(-1), 2e-5, 1e-6, "no bucket once p_r = 0")
    too_much = lp16.clone()
    too_much[2, :2] = math.log(0.6)
    with pytest.raises(ValueError, match=r"support mass .* row 2 .* above 1 by more than the rounding tolerance"):
        kl_fused.sparse_kl_div(student, idx, too_much)
    # Renormalize divides the mass out: no bound.
    kl_fused.sparse_kl_div(student, idx, too_much, tail="renormalize")


@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
def test_unused_slots_edges(device, tail):
    """K = 1; a row with no used slot; -inf slots anywhere; a support covering the whole vocabulary."""
    student, idx, lp = make_sparse((5,), 64, 64, torch.float32, seed=17)
    lp[1] = NEG_INF                      # no support at all: the loss is 0
    lp[2, ::3] = NEG_INF                 # unused slots in between
    idx[2, ::3] = 10**6
    lp[3, 1:] = NEG_INF                  # a single slot
    student, idx, lp = student.to(device), idx.to(device), lp.to(device)
    loss, grad_s, grad_lp = check_against_reference(student, idx, lp, torch.float32, tail=tail, reduction="none")
    assert loss[1].item() == 0.0 and (grad_s[1] == 0).all()
    assert_close(loss, numpy_rows(student, idx, lp, 1.0, tail), 2e-5, 2e-6, "vs numpy")
    assert (grad_lp[lp == NEG_INF] == 0).all()
    one_slot = check_against_reference(student, idx[:, :1], lp[:, :1], torch.float32, tail=tail)[0]
    assert torch.isfinite(one_slot)


def test_nan_and_infinities_in_counted_rows(device):
    student, idx, lp = make_sparse((4,), 80, 6, torch.float32, seed=18)
    off_support = [j for j in range(80) if j not in idx[0].tolist()][0]
    student[0, off_support] = float("nan")                 # NaN off the support
    student[1, idx[1, 2]] = float("nan")                   # NaN on it
    student[2, idx[2, 0]] = NEG_INF                        # a supported token the student rules out
    student, idx, lp = student.to(device), idx.to(device), lp.to(device)
    rows = kl_fused.sparse_kl_div(student, idx, lp, reduction="none")
    assert math.isnan(rows[0]) and math.isnan(rows[1]) and rows[2].item() == math.inf and math.isfinite(rows[3])
    renormalized = kl_fused.sparse_kl_div(student, idx, lp, reduction="none", tail="renormalize")
    assert math.isfinite(renormalized[0]), "renormalize reads only the support"
    assert math.isnan(renormalized[1]) and renormalized[2].item() == math.inf


def test_huge_logits_and_a_shifted_view_read_in_place(device):
    student, idx, lp = make_sparse((3, 9), 256, 12, torch.float32, seed=19)
    student = student + torch.tensor([1e4, -1e4, 0.0], dtype=torch.float32)[:, None, None]
    base = torch.cat([student, torch.zeros(3, 9, 1)], -1).to(device)
    view = base[:, :-1, :-1]  # a shifted view: strided leading dims, rows starting at odd offsets
    assert not view.is_contiguous()
    check_against_reference(view, idx[:, :-1].to(device), lp[:, :-1].to(device), torch.float32)


def test_int32_indices_low_precision_logprobs_and_long_rows(device):
    student, idx, lp = make_sparse((2,), 70000, 64, torch.bfloat16, seed=20, index_dtype=torch.int32,
                                   lp_dtype=torch.bfloat16)
    student, idx, lp = student.to(device), idx.to(device), lp.to(device)
    assert idx.dtype == torch.int32
    check_against_reference(student, idx, lp, torch.bfloat16, temperature=1.3)


def test_retained_graph_second_backward(device):
    student, idx, lp = make_sparse((3,), 90, 5, torch.float32, seed=21)
    s = student.to(device).requires_grad_()
    l = lp.to(device).requires_grad_()
    loss = kl_fused.sparse_kl_div(s, idx.to(device), l, temperature=1.4)
    loss.backward(retain_graph=True)
    first_s, first_l = s.grad.clone(), l.grad.clone()
    s.grad = None
    l.grad = None
    (2.0 * loss).backward()
    assert_close(s.grad, 2 * first_s, 1e-6, 1e-8, "second backward, student")
    assert_close(l.grad, 2 * first_l, 1e-6, 1e-8, "second backward, log-probs")


def test_inputs_are_never_modified(device):
    student, idx, lp = make_sparse((4,), 120, 10, torch.bfloat16, seed=22, unused=3)
    mask = torch.tensor([True, False, True, True])
    student, idx, lp, mask = student.to(device), idx.to(device), lp.to(device), mask.to(device)
    copies = [x.clone() for x in (student, idx, lp, mask)]
    for tail in ("bucket", "renormalize"):
        fused_with_grads(student, idx, lp, mask=mask, tail=tail, weights=torch.tensor(3.0, device=device))
    for before, after in zip(copies, (student, idx, lp, mask)):
        assert torch.equal(before, after)


def test_gradcheck_in_float64(device):
    student, idx, lp = make_sparse((2, 2), 30, 6, torch.float64, seed=23, unused=2, lp_dtype=torch.float64)
    s = student.to(device).requires_grad_()
    l = lp.to(device).requires_grad_()
    for tail in ("bucket", "renormalize"):
        fn = lambda s, l: kl_fused.sparse_kl_div(s, idx.to(device), l, tail=tail, reduction="none", temperature=1.3)  # noqa: E731
        # -inf slots are constants: perturb only the used ones.
        assert torch.autograd.gradcheck(lambda s, used: fn(s, torch.where(l != NEG_INF, used, NEG_INF)),
                                        (s, torch.where(l != NEG_INF, l, 0.0).detach().requires_grad_()))
