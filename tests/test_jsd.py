"""kl_fused.jsd_logits (the generalized Jensen-Shannon divergence) against the float64 reference, an
independent numpy/scipy oracle and TRL 1.16's real GKDTrainer.generalized_jsd_loss: values, both
gradients, masks, upstream weights, retained graphs, edges, errors, opcheck and torch.compile."""

import math
import os
import warnings

import pytest
import torch

import kl_fused
from conftest import DTYPES, TOLERANCES, assert_close, assert_grad_close, fused_op_must_run, make_logits
from conftest import jsd_reference64 as reference64
from conftest import numpy_jsd as numpy_rows

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
from trl.experimental.gkd import GKDTrainer  # noqa: E402  (the peer: a test dependency, never kl_fused's)

NEG_INF = float("-inf")
BETAS = [0.0, 0.1, 0.5, 0.9, 1.0]


def jsd_op_must_run():
    return fused_op_must_run(torch.ops.kl_fused.jsd_logits.default)


def trl_loss(student, teacher, mask, beta, temperature, reduction="batchmean"):
    """TRL's loss on float64 copies of the same values (labels -100 where the mask is False)."""
    labels = torch.where(mask, 0, -100) if mask is not None else None
    return GKDTrainer.generalized_jsd_loss(student, teacher, labels=labels, beta=beta, temperature=temperature,
                                           reduction=reduction)


# ------------------------------------------------------------------------------------- values


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 1), (4, 2), (3, 1271), (1, 70000), (2, 3, 257)], ids=str)
@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_row_values_match_reference_and_numpy(device, dtype, shape, beta):
    student, teacher = make_logits(shape, dtype, device, seed=sum(shape) + int(10 * beta))
    with jsd_op_must_run():
        rows = kl_fused.jsd_logits(student, teacher, beta=beta, temperature=1.5, reduction="none")
    assert rows.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and rows.shape == shape[:-1]
    ref, _, _ = reference64(student, teacher, beta=beta, temperature=1.5, reduction="none")
    tol = TOLERANCES[dtype]
    assert_close(rows, ref, tol["loss_rtol"], tol["loss_atol"], "vs float64 reference")
    oracle, _, _ = numpy_rows(student, teacher, beta, 1.5)
    assert_close(rows, torch.from_numpy(oracle), tol["loss_rtol"], tol["loss_atol"], "vs numpy oracle")
    assert (rows >= 0).all()
    if shape[-1] > 1:
        assert (rows[(student != teacher).any(-1)] > 0).all(), "rows whose logits differ have positive JSD"
    # JSD is bounded: beta KL(p || m) <= -beta log beta, likewise for q.
    bound = -beta * math.log(beta) - (1 - beta) * math.log(1 - beta)
    assert (rows <= bound + 1e-6).all()


@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_endpoints_are_the_kl_divergences_exactly(device, beta):
    student, teacher = make_logits((3, 4, 333), torch.float32, device, seed=2)
    student.requires_grad_()
    teacher.requires_grad_()
    mask = torch.tensor([[1, 0, 1, 1], [1, 1, 1, 1], [0, 1, 1, 0]], dtype=torch.bool, device=device)
    with jsd_op_must_run():
        jsd = kl_fused.jsd_logits(student, teacher, beta=beta, temperature=1.7, mask=mask, reduction="none")
    jsd_grads = torch.autograd.grad(jsd.sum(), (student, teacher))
    kl = kl_fused.kl_div_logits(student, teacher, temperature=1.7, mask=mask, reduction="none",
                                direction="forward" if beta == 0.0 else "reverse")
    kl_grads = torch.autograd.grad(kl.sum(), (student, teacher))
    assert torch.equal(jsd, kl), "beta = 0 is KL(teacher || student), beta = 1 KL(student || teacher), bit for bit"
    for got, want in zip(jsd_grads, kl_grads):
        assert torch.equal(got, want)


@pytest.mark.parametrize("reduction", ["none", "sum", "batchmean", "mean"])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
@pytest.mark.parametrize("masked", [False, True])
def test_reductions_temperatures_masks(device, reduction, temperature, masked):
    student, teacher = make_logits((3, 5, 333), torch.float32, device, seed=7)
    mask = None
    if masked:
        mask = torch.tensor([[1, 0, 1, 1, 0], [0, 0, 0, 0, 0], [1, 1, 1, 0, 1]], dtype=torch.bool, device=device)
    loss = kl_fused.jsd_logits(student, teacher, beta=0.3, temperature=temperature, reduction=reduction, mask=mask)
    ref, _, _ = reference64(student, teacher, beta=0.3, temperature=temperature, reduction=reduction, mask=mask)
    assert loss.shape == ref.shape
    assert_close(loss, ref, 2e-5, 2e-6, f"{reduction} T={temperature}")
    rows = torch.from_numpy(numpy_rows(student, teacher, 0.3, temperature)[0])
    keep = torch.ones(3, 5, dtype=torch.bool) if mask is None else mask.cpu()
    rows = torch.where(keep, rows, 0.0)
    count = max(int(keep.sum()), 1)
    expected = {"none": rows, "sum": rows.sum(), "batchmean": rows.sum() / count, "mean": rows.sum() / (count * 333)}
    assert_close(loss, expected[reduction], 2e-5, 2e-6, f"{reduction} from the numpy rows")


def test_no_counted_rows_gives_zero(device):
    student, teacher = make_logits((4, 10), torch.float32, device, seed=5)
    mask = torch.zeros(4, dtype=torch.bool, device=device)
    for reduction in ("sum", "batchmean", "mean"):
        assert kl_fused.jsd_logits(student, teacher, reduction=reduction, mask=mask).item() == 0.0
        assert kl_fused.jsd_logits(student[:0], teacher[:0], reduction=reduction).item() == 0.0
    assert kl_fused.jsd_logits(student[:0], teacher[:0], reduction="none").shape == (0,)


def test_module_matches_function(device):
    student, teacher = make_logits((4, 100), torch.float32, device, seed=6)
    module = kl_fused.JSDLogitsLoss(beta=0.25, temperature=2.0, reduction="sum")
    expected = kl_fused.jsd_logits(student, teacher, beta=0.25, temperature=2.0, reduction="sum")
    assert torch.equal(module(student, teacher), expected)
    assert repr(module) == "JSDLogitsLoss(beta=0.25, temperature=2.0, reduction='sum')"


# ------------------------------------------------------------------------------------- TRL parity


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("beta", BETAS)
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_values_and_student_gradients_equal_trl_generalized_jsd_loss(device, dtype, beta, temperature):
    """TRL's loss on (B, S, V) logits with labels -100 on padding is jsd_logits with mask = labels != -100,
    batchmean over the counted tokens. TRL runs on float64 copies of the same rounded values."""
    student, teacher = make_logits((3, 5, 301), dtype, device, seed=40 + int(10 * beta))
    mask = torch.rand(3, 5, generator=torch.Generator().manual_seed(3)).to(device) > 0.3
    student.requires_grad_()
    with jsd_op_must_run():
        loss = kl_fused.jsd_logits(student, teacher, beta=beta, temperature=temperature, mask=mask)
    (0.7 * loss).backward()
    s64 = student.detach().double().clone().requires_grad_()
    trl = trl_loss(s64, teacher.double(), mask, beta, temperature)
    (0.7 * trl).backward()
    tol = TOLERANCES[dtype]
    assert_close(loss, trl, tol["loss_rtol"], tol["loss_atol"], "loss vs TRL")
    assert_grad_close(student.grad, s64.grad, dtype, "student gradient vs TRL")
    assert (student.grad[~mask] == 0).all()


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("reduction", ["sum", "mean", "batchmean"])
def test_trl_in_float32_on_two_dim_input(device, beta, reduction):
    """TRL in its own precision (float32, no labels): 2-D rows, each of its reductions."""
    student, teacher = make_logits((6, 2000), torch.float32, device, seed=41)
    student.requires_grad_()
    loss = kl_fused.jsd_logits(student, teacher, beta=beta, reduction=reduction)
    loss.backward()
    s_trl = student.detach().clone().requires_grad_()
    trl = trl_loss(s_trl, teacher, None, beta, 1.0, reduction)
    trl.backward()
    assert_close(loss, trl, 2e-5, 2e-6, "loss vs TRL float32")
    assert_grad_close(student.grad, s_trl.grad, torch.float32, "student gradient vs TRL float32")


# ------------------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
@pytest.mark.parametrize("shape", [(5, 1271), (2, 70000), (2, 3, 64)], ids=str)
def test_both_gradients_under_a_weighted_loss(device, dtype, beta, shape):
    student, teacher = make_logits(shape, dtype, device, seed=11)
    student.requires_grad_()
    teacher.requires_grad_()
    with jsd_op_must_run():
        loss = kl_fused.jsd_logits(student, teacher, beta=beta, temperature=2.0)
    (0.37 * loss).backward()
    ref, s64, t64 = reference64(student, teacher, beta=beta, temperature=2.0)
    (0.37 * ref).backward()
    assert student.grad.dtype == dtype and teacher.grad.dtype == dtype
    assert_grad_close(student.grad, s64.grad, dtype, "student grad vs reference")
    assert_grad_close(teacher.grad, t64.grad, dtype, "teacher grad vs reference")
    rows = student[..., 0].numel()
    _, ds, dt = numpy_rows(student, teacher, beta, 2.0)
    assert_grad_close(student.grad, torch.from_numpy(ds) * 0.37 / rows, dtype, "student grad vs formula")
    assert_grad_close(teacher.grad, torch.from_numpy(dt) * 0.37 / rows, dtype, "teacher grad vs formula")


@pytest.mark.parametrize("reduction", ["none", "sum", "batchmean", "mean"])
def test_per_row_weights_and_masks_holding_nan(device, reduction):
    student, teacher = make_logits((4, 3, 300), torch.float32, device, seed=12)
    mask = (torch.rand(4, 3, generator=torch.Generator().manual_seed(1)) > 0.3).to(device)
    clean_student, clean_teacher = student.clone(), teacher.clone()
    student[~mask] = float("nan")  # padding garbage: never read
    teacher[~mask] = float("inf")
    student.requires_grad_()
    teacher.requires_grad_()
    loss = kl_fused.jsd_logits(student, teacher, beta=0.6, reduction=reduction, mask=mask, temperature=0.7)
    ref, s64, t64 = reference64(clean_student, clean_teacher, beta=0.6, reduction=reduction, mask=mask, temperature=0.7)
    assert_close(loss, ref, 2e-5, 2e-6, "masked loss")
    if reduction == "none":
        weights = torch.linspace(-1.0, 2.0, 12, dtype=torch.float64).reshape(4, 3).to(device)
        (loss * weights.float()).sum().backward()
        (ref * weights).sum().backward()
    else:
        (loss * -2.5).backward()
        (ref * -2.5).backward()
    assert_grad_close(student.grad, s64.grad, torch.float32, reduction)
    assert_grad_close(teacher.grad, t64.grad, torch.float32, reduction)
    assert (student.grad[~mask] == 0).all() and (teacher.grad[~mask] == 0).all()


def test_gradient_only_to_teacher(device):
    student, teacher = make_logits((3, 500), torch.float32, device, seed=13)
    teacher.requires_grad_()
    kl_fused.jsd_logits(student, teacher, beta=0.4).backward()
    ref, _, t64 = reference64(student, teacher, beta=0.4)
    ref.backward()
    assert student.grad is None
    assert_grad_close(teacher.grad, t64.grad, torch.float32, "teacher only")


@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_second_backward_through_retained_graph(device, reduction):
    student, teacher = make_logits((4, 777), torch.bfloat16, device, seed=14)
    student.requires_grad_()
    teacher.requires_grad_()
    loss = kl_fused.jsd_logits(student, teacher, beta=0.5, reduction=reduction)
    upstream = torch.tensor([0.5, 0.0, 2.0, -1.0], device=device) if reduction == "none" else torch.tensor(3.0, device=device)
    first = torch.autograd.grad(loss, (student, teacher), upstream, retain_graph=True)
    second = torch.autograd.grad(loss, (student, teacher), upstream, retain_graph=True)
    third_s, _ = torch.autograd.grad(loss, (student, teacher), 2 * upstream)
    ref, s64, t64 = reference64(student, teacher, beta=0.5, reduction=reduction)
    expected_s, expected_t = torch.autograd.grad(ref, (s64, t64), upstream.double())
    for got_s, got_t in (first, second):
        assert_grad_close(got_s, expected_s, torch.bfloat16, "student")
        assert_grad_close(got_t, expected_t, torch.bfloat16, "teacher")
    assert_grad_close(third_s, 2 * expected_s, torch.bfloat16, "third backward, doubled upstream")


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_gradcheck_fused_cpu_float64(beta):
    student, teacher = make_logits((3, 2, 7), torch.float64, "cpu", seed=16, scale=1.0)
    student.requires_grad_()
    teacher.requires_grad_()
    mask = torch.tensor([[True, False], [True, True], [False, True]])

    def fn(s, t):
        return kl_fused.jsd_logits(s, t, beta=beta, temperature=1.3, reduction="none", mask=mask)

    with jsd_op_must_run():
        fn(student, teacher)
    assert torch.autograd.gradcheck(fn, (student, teacher), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_no_grad_forward_and_double_backward(device):
    student, teacher = make_logits((3, 100), torch.float64, device, seed=17)
    student.requires_grad_()
    with torch.no_grad():
        loss = kl_fused.jsd_logits(student, teacher)
    assert loss.grad_fn is None
    _, grad_student, grad_teacher = torch.ops.kl_fused.jsd_logits(student.detach(), teacher, None, 0.5, 1.0, "sum",
                                                                 False, False)
    assert grad_student.numel() == 0 and grad_teacher.numel() == 0
    loss = kl_fused.jsd_logits(student, teacher)
    with pytest.raises(RuntimeError, match="first-order gradients only"):
        torch.autograd.grad(loss, student, create_graph=True)


# ------------------------------------------------------------------------------------- edges


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("zeroed", ["teacher", "student", "both"])
def test_zero_probability_entries(device, dtype, zeroed):
    """-inf logits: p = 0, q = 0, or both at the same entries. For 0 < beta < 1 the mixture keeps the
    JSD finite even where only one side has mass, and zero-probability entries never give NaN."""
    student, teacher = make_logits((3, 40), dtype, device, seed=21)
    if zeroed in ("teacher", "both"):
        teacher[:, ::3] = NEG_INF
    if zeroed in ("student", "both"):
        student[:, ::3 if zeroed == "both" else 4] = NEG_INF
    student.requires_grad_()
    teacher.requires_grad_()
    rows = kl_fused.jsd_logits(student, teacher, beta=0.3, reduction="none")
    rows.sum().backward()
    assert torch.isfinite(rows).all()
    assert torch.isfinite(student.grad.float()).all() and torch.isfinite(teacher.grad.float()).all()
    ref, s64, t64 = reference64(student, teacher, beta=0.3, reduction="none")
    ref.sum().backward()
    tol = TOLERANCES[dtype]
    assert_close(rows, ref, tol["loss_rtol"], tol["loss_atol"], "loss")
    assert_grad_close(student.grad, s64.grad, dtype, "student grad")
    assert_grad_close(teacher.grad, t64.grad, dtype, "teacher grad")


@pytest.mark.parametrize("which", ["student", "teacher"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "all -inf"])
def test_undefined_rows_give_nan(device, which, bad):
    student, teacher = make_logits((3, 100), torch.float32, device, seed=23)
    target = student if which == "student" else teacher
    if bad == "all -inf":
        target[1] = NEG_INF
    else:
        target[1, 17] = bad
    student.requires_grad_()
    rows = kl_fused.jsd_logits(student, teacher, beta=0.5, reduction="none")
    rows.sum().backward()
    ref, _, _ = reference64(student, teacher, beta=0.5, reduction="none")
    assert math.isnan(ref[1].item()), "the reference calls this row undefined too"
    assert math.isnan(rows[1].item()) and torch.isfinite(rows[[0, 2]]).all()
    assert torch.isnan(student.grad[1]).all() and torch.isfinite(student.grad[[0, 2]]).all()
    assert math.isnan(kl_fused.jsd_logits(student.detach(), teacher, beta=0.5).item())


def test_nan_gives_nan_even_where_neither_side_has_mass(device):
    student, teacher = make_logits((2, 300), torch.float32, device, seed=25)
    teacher[1, 40] = -1e3  # exp(-1e3 - max) is 0 in float32: p = 0 there ...
    student[1, 40] = float("nan")  # ... and q is NaN
    rows = kl_fused.jsd_logits(student, teacher, reduction="none")
    assert math.isnan(rows[1].item()) and math.isfinite(rows[0].item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_huge_logits_are_exact(device, dtype):
    student, teacher = make_logits((4, 1000), dtype, device, seed=24, scale=1.0)
    student = student + 1e4
    teacher = teacher - 1e4
    student[:, 0] = -1e4
    teacher[:, 1] = 1e4
    rows = kl_fused.jsd_logits(student, teacher, beta=0.5, reduction="none")
    ref, _, _ = reference64(student, teacher, beta=0.5, reduction="none")
    assert torch.isfinite(rows).all()
    tol = TOLERANCES[dtype]
    assert_close(rows, ref, tol["loss_rtol"], tol["loss_atol"], "logits near +-1e4")


def test_strided_views_are_read_in_place(device):
    student_full, teacher_full = make_logits((3, 9, 130), torch.bfloat16, device, seed=26)
    leaf = student_full.clone().requires_grad_()
    loss = kl_fused.jsd_logits(leaf[:, :-1], teacher_full[:, 1:], beta=0.7, reduction="sum")
    loss.backward()
    ref, s64, _ = reference64(student_full[:, :-1], teacher_full[:, 1:], beta=0.7, reduction="sum")
    ref.backward()
    tol = TOLERANCES[torch.bfloat16]
    assert_close(loss, ref, tol["loss_rtol"], tol["loss_atol"], "shifted views")
    assert_grad_close(leaf.grad[:, :-1], s64.grad, torch.bfloat16, "grad through the view")
    assert (leaf.grad[:, -1] == 0).all()


def test_deterministic_and_inputs_untouched(device):
    student, teacher = make_logits((64, 3001), torch.float16, device, seed=27)
    mask = torch.rand(64, generator=torch.Generator().manual_seed(5)).to(device) > 0.2
    copies = (student.clone(), teacher.clone(), mask.clone())
    student.requires_grad_()
    teacher.requires_grad_()
    results = []
    for _ in range(2):
        student.grad = teacher.grad = None
        loss = kl_fused.jsd_logits(student, teacher, beta=0.2, mask=mask, temperature=3.0, reduction="mean")
        (loss * 7).backward()
        results.append((loss.detach().clone(), student.grad.clone(), teacher.grad.clone()))
    for a, b in zip(*results):
        assert torch.equal(a, b)
    for before, after in zip(copies, (student.detach(), teacher.detach(), mask)):
        assert torch.equal(before, after)


# ------------------------------------------------------------------------------------- errors


BAD_BETAS = [(-0.1, ValueError), (1.5, ValueError), (float("nan"), ValueError), (float("inf"), ValueError),
             (True, TypeError), ("0.5", TypeError), (torch.tensor(0.5), TypeError), (None, TypeError)]


@pytest.mark.parametrize("fn", [kl_fused.jsd_logits, kl_fused.reference.jsd_logits], ids=["fused", "reference"])
@pytest.mark.parametrize("beta,error", BAD_BETAS, ids=[repr(b) for b, _ in BAD_BETAS])
def test_bad_beta_raises_a_clear_error(fn, beta, error):
    s, t = make_logits((3, 10), torch.float32, "cpu", seed=1)
    with pytest.raises(error, match="beta"):
        fn(s, t, beta=beta)
    with pytest.raises(error, match="beta"):
        kl_fused.JSDLogitsLoss(beta=beta)


@pytest.mark.parametrize("fn", [kl_fused.jsd_logits, kl_fused.reference.jsd_logits], ids=["fused", "reference"])
@pytest.mark.parametrize(
    "overrides,error,message",
    [
        (dict(student_logits=torch.randn(3, 11)), ValueError, "same shape"),
        (dict(mask=torch.ones(3, 1, dtype=torch.bool)), ValueError, "leading shape"),
        (dict(mask=torch.ones(3)), TypeError, "bool"),
        (dict(reduction="average"), ValueError, "reduction"),
        (dict(temperature=0.0), ValueError, "temperature"),
        (dict(teacher_logits=torch.randn(3, 10, dtype=torch.float64)), TypeError, "same dtype"),
        (dict(student_logits=torch.randint(0, 5, (3, 10))), TypeError, "floating-point"),
    ],
)
def test_other_bad_arguments_share_kl_div_logits_checks(fn, overrides, error, message):
    kwargs = dict(student_logits=torch.randn(3, 10), teacher_logits=torch.randn(3, 10))
    kwargs.update(overrides)
    with pytest.raises(error, match=message):
        fn(kwargs.pop("student_logits"), kwargs.pop("teacher_logits"), **kwargs)


@pytest.mark.parametrize(
    "args,error,message",
    [
        ((torch.randn(3, 10), torch.randn(3, 9), None, 0.5, 1.0, "sum", False, False), ValueError, "same shape"),
        ((torch.randn(3, 10), torch.randn(3, 10), None, 1.5, 1.0, "sum", False, False), ValueError, "beta"),
        ((torch.randn(3, 10), torch.randn(3, 10), None, -0.5, 1.0, "sum", False, False), ValueError, "beta"),
        ((torch.randn(3, 10), torch.randn(3, 10), None, float("nan"), 1.0, "sum", False, False), ValueError, "beta"),
        ((torch.randn(3, 10), torch.randn(3, 10), None, 0.5, 0.0, "sum", False, False), ValueError, "temperature"),
        ((torch.randn(3, 10), torch.randn(3, 10), None, 0.5, 1.0, "avg", False, False), ValueError, "reduction"),
        ((torch.randn(3, 10), torch.randn(3, 10), torch.ones(3), 0.5, 1.0, "sum", False, False), TypeError, "bool"),
    ],
)
def test_the_op_itself_checks_its_arguments(args, error, message):
    with pytest.raises(error, match=message):
        torch.ops.kl_fused.jsd_logits(*args)


# ------------------------------------------------------------------------------------- torch.library


def test_opcheck_jsd_logits(device):
    student, teacher = make_logits((2, 3, 37), torch.float32, device, seed=31)
    mask = torch.tensor([[True, False, True], [True, True, False]], device=device)
    for reduction in ("none", "sum", "batchmean", "mean"):
        for beta in (0.0, 0.35, 1.0):
            s = student.clone().requires_grad_()
            t = teacher.clone().requires_grad_()
            torch.library.opcheck(torch.ops.kl_fused.jsd_logits.default,
                                  (s, t, mask if reduction != "sum" else None, beta, 1.7, reduction, True, True))
    torch.library.opcheck(torch.ops.kl_fused.jsd_logits.default, (student, teacher, None, 0.5, 1.0, "batchmean", False, False))


@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_compile_fullgraph_matches_eager(device, reduction):
    torch._dynamo.reset()
    student, teacher = make_logits((4, 6, 300), torch.float32, device, seed=34)
    mask = torch.rand(4, 6, generator=torch.Generator().manual_seed(2)).to(device) > 0.2

    def step(s, t):
        loss = kl_fused.jsd_logits(s, t, beta=0.3, temperature=2.0, reduction=reduction, mask=mask)
        return (loss * 1.5).sum()

    compiled = torch.compile(step, fullgraph=True)
    s_eager = student.clone().requires_grad_()
    s_compiled = student.clone().requires_grad_()
    eager_loss = step(s_eager, teacher)
    eager_loss.backward()
    compiled_loss = compiled(s_compiled, teacher)
    compiled_loss.backward()
    assert_close(compiled_loss, eager_loss, 1e-6, 1e-7, "compiled loss")
    assert_grad_close(s_compiled.grad, s_eager.grad, torch.float32, "compiled grad")


def test_availability_and_fallback_say_so_once(monkeypatch):
    assert kl_fused.is_fused_available("cpu", op="jsd_logits")
    assert kl_fused.fused_unavailable_reason("cpu", op="jsd_logits") is None
    from kl_fused import _ops, _warn_once

    monkeypatch.setitem(_ops._DEVICE_TYPES, "jsd_logits", frozenset())  # a build without CPU kernels for it
    _warn_once.forget(("jsd_logits", "cpu"))
    student, teacher = make_logits((2, 3, 50), torch.float32, "cpu", seed=35)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = kl_fused.jsd_logits(student, teacher, reduction="none")
        kl_fused.jsd_logits(student, teacher, reduction="none")
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "jsd_logits" in messages[0] and "built without cpu" in messages[0]
    assert_close(first, kl_fused.reference.jsd_logits(student, teacher, reduction="none"), 0, 0, "the reference ran")
