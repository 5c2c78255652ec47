"""Gradients of both inputs against the float64 reference and the analytic formulas, under upstream
gradients other than 1, retained graphs, and gradcheck of the fused CPU path in float64."""

import pytest
import torch

import kl_fused
from conftest import DTYPES, analytic_grads, assert_grad_close, fused_op_must_run, make_logits, reference64


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("shape", [(5, 1271), (2, 70000), (2, 3, 64), (1, 2)], ids=str)
def test_both_gradients_under_a_weighted_loss(device, dtype, direction, shape):
    student, teacher = make_logits(shape, dtype, device, seed=11)
    student.requires_grad_()
    teacher.requires_grad_()
    with fused_op_must_run():
        loss = kl_fused.kl_div_logits(student, teacher, temperature=2.0, direction=direction)
    (0.37 * loss).backward()
    ref, s64, t64 = reference64(student, teacher, temperature=2.0, direction=direction)
    (0.37 * ref).backward()
    assert student.grad.dtype == dtype and teacher.grad.dtype == dtype
    assert_grad_close(student.grad, s64.grad, dtype, "student grad vs reference")
    assert_grad_close(teacher.grad, t64.grad, dtype, "teacher grad vs reference")
    # Independent oracle: the design notes' formulas, scaled by 0.37 / rows (batchmean).
    rows = student[..., 0].numel()
    ds, dt = analytic_grads(student, teacher, 2.0, direction)
    assert_grad_close(student.grad, torch.from_numpy(ds) * 0.37 / rows, dtype, "student grad vs formula")
    assert_grad_close(teacher.grad, torch.from_numpy(dt) * 0.37 / rows, dtype, "teacher grad vs formula")


@pytest.mark.parametrize("reduction", ["none", "sum", "batchmean", "mean"])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_per_row_weights_and_masks(device, reduction, direction):
    student, teacher = make_logits((4, 3, 300), torch.float32, device, seed=12)
    mask = torch.rand(4, 3, generator=torch.Generator().manual_seed(1)) > 0.3
    mask = mask.to(device)
    student.requires_grad_()
    loss = kl_fused.kl_div_logits(student, teacher, reduction=reduction, direction=direction, mask=mask, temperature=0.7)
    ref, s64, _ = reference64(student, teacher, reduction=reduction, direction=direction, mask=mask, temperature=0.7)
    if reduction == "none":
        weights = torch.linspace(-1.0, 2.0, 12, dtype=torch.float64).reshape(4, 3).to(device)
        (loss * weights.float()).sum().backward()
        (ref * weights).sum().backward()
    else:
        (loss * -2.5).backward()
        (ref * -2.5).backward()
    assert_grad_close(student.grad, s64.grad, torch.float32, reduction)
    assert (student.grad[~mask] == 0).all(), "rows that do not count get zero gradient"


def test_gradient_only_to_teacher(device):
    student, teacher = make_logits((3, 500), torch.float32, device, seed=13)
    teacher.requires_grad_()
    kl_fused.kl_div_logits(student, teacher, direction="reverse").backward()
    _, _, t64 = reference64(student, teacher, direction="reverse")
    kl_fused.reference.kl_div_logits(student.double(), t64, direction="reverse").backward()
    assert student.grad is None
    assert_grad_close(teacher.grad, t64.grad, torch.float32, "teacher only")


@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_second_backward_through_retained_graph(device, reduction):
    student, teacher = make_logits((4, 777), torch.bfloat16, device, seed=14)
    student.requires_grad_()
    teacher.requires_grad_()
    loss = kl_fused.kl_div_logits(student, teacher, reduction=reduction)
    upstream = torch.tensor([0.5, 0.0, 2.0, -1.0], device=device) if reduction == "none" else torch.tensor(3.0, device=device)
    first_s, first_t = torch.autograd.grad(loss, (student, teacher), upstream, retain_graph=True)
    second_s, second_t = torch.autograd.grad(loss, (student, teacher), upstream, retain_graph=True)
    third_s, _ = torch.autograd.grad(loss, (student, teacher), 2 * upstream)
    ref, s64, t64 = reference64(student, teacher, reduction=reduction)
    expected_s, expected_t = torch.autograd.grad(ref, (s64, t64), upstream.double())
    for got_s, got_t in ((first_s, first_t), (second_s, second_t)):
        assert_grad_close(got_s, expected_s, torch.bfloat16, "student")
        assert_grad_close(got_t, expected_t, torch.bfloat16, "teacher")
    assert_grad_close(third_s, 2 * expected_s, torch.bfloat16, "third backward, doubled upstream")


def test_backward_into_an_upstream_layer(device):
    """The usual case: logits come out of a linear layer; the gradient reaches its weight."""
    gen = torch.Generator().manual_seed(15)
    hidden = torch.randn(6, 32, generator=gen).to(device)
    weight = (0.3 * torch.randn(500, 32, generator=gen)).to(device).requires_grad_()
    teacher = (2 * torch.randn(6, 500, generator=gen)).to(device)
    kl_fused.kl_div_logits(hidden @ weight.T, teacher, temperature=2.0).backward()
    w64 = weight.detach().double().requires_grad_()
    kl_fused.reference.kl_div_logits(hidden.double() @ w64.T, teacher.double(), temperature=2.0).backward()
    assert_grad_close(weight.grad, w64.grad, torch.float32, "weight grad")


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("reduction", ["none", "batchmean", "mean"])
def test_gradcheck_fused_cpu_float64(direction, reduction):
    assert kl_fused.is_fused_available("cpu")
    student, teacher = make_logits((3, 2, 7), torch.float64, "cpu", seed=16, scale=1.0)
    student.requires_grad_()
    teacher.requires_grad_()
    mask = torch.tensor([[True, False], [True, True], [False, True]])

    def fn(s, t):
        return kl_fused.kl_div_logits(s, t, temperature=1.3, direction=direction, reduction=reduction, mask=mask)

    with fused_op_must_run():
        fn(student, teacher)
    assert torch.autograd.gradcheck(fn, (student, teacher), eps=1e-6, atol=1e-8, rtol=1e-6)


def test_no_grad_forward_computes_no_gradient(device):
    student, teacher = make_logits((3, 100), torch.float32, device, seed=17)
    student.requires_grad_()
    with torch.no_grad():
        loss = kl_fused.kl_div_logits(student, teacher)
    assert loss.grad_fn is None and not loss.requires_grad
    _, grad_student, _ = torch.ops.kl_fused.kl_div_logits(student.detach(), teacher, None, 1.0, False, "sum", False, False)
    assert grad_student.numel() == 0


def test_double_backward_is_refused(device):
    student, teacher = make_logits((2, 50), torch.float64, device, seed=18)
    student.requires_grad_()
    loss = kl_fused.kl_div_logits(student, teacher)
    with pytest.raises(RuntimeError, match="first-order gradients only"):
        torch.autograd.grad(loss, student, create_graph=True)
