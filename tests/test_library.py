"""The torch.library contract: opcheck on every op, torch.compile(fullgraph=True) parity, the
fallback path and what it says."""

import warnings

import pytest
import torch

import kl_fused
from conftest import assert_close, assert_grad_close, fused_op_must_run, make_logits


def _op_samples(device):
    student, teacher = make_logits((2, 3, 37), torch.float32, device, seed=31)
    mask = torch.tensor([[True, False, True], [True, True, False]], device=device)
    samples = []
    for reduction in ("none", "sum", "batchmean", "mean"):
        for reverse in (False, True):
            s = student.clone().requires_grad_()
            t = teacher.clone().requires_grad_()
            samples.append((s, t, mask if reverse else None, 1.7, reverse, reduction, True, True))
    samples.append((student, teacher.to(torch.bfloat16).float(), None, 1.0, False, "batchmean", False, False))
    return samples


def test_opcheck_kl_div_logits(device):
    for args in _op_samples(device):
        torch.library.opcheck(torch.ops.kl_fused.kl_div_logits.default, args)


def test_opcheck_grad_scale(device):
    gen = torch.Generator().manual_seed(32)
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        grad = torch.randn(2, 3, 50, generator=gen).to(device, dtype)
        for upstream in (torch.tensor(0.25, dtype=acc), torch.tensor(1.0, dtype=acc), torch.randn(2, 3, generator=gen).to(acc)):
            torch.library.opcheck(torch.ops.kl_fused.grad_scale_.default, (grad.clone(), upstream.to(device)))


def test_grad_scale_scales_rows_and_skips_factor_one(device):
    grad = torch.randn(3, 20, generator=torch.Generator().manual_seed(33)).to(device)
    expected = grad.clone()
    torch.ops.kl_fused.grad_scale_(grad, torch.tensor([2.0, 1.0, -0.5], device=device))
    assert torch.equal(grad[1], expected[1])
    assert_close(grad, expected * torch.tensor([[2.0], [1.0], [-0.5]], device=device), 0, 0, "scaled rows")


@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_compile_fullgraph_matches_eager(device, reduction):
    torch._dynamo.reset()
    student, teacher = make_logits((4, 6, 300), torch.float32, device, seed=34)
    mask = torch.rand(4, 6, generator=torch.Generator().manual_seed(2)).to(device) > 0.2

    def step(s, t):
        loss = kl_fused.kl_div_logits(s, t, temperature=2.0, reduction=reduction, mask=mask, direction="reverse")
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


def test_compiled_graph_calls_the_fused_op(device):
    torch._dynamo.reset()
    student, teacher = make_logits((4, 100), torch.float32, device, seed=35)
    compiled = torch.compile(lambda s, t: kl_fused.kl_div_logits(s, t), fullgraph=True)
    compiled(student, teacher)  # compile outside the counting mode
    with fused_op_must_run():
        kl_fused.kl_div_logits(student, teacher)


def test_availability_is_reported():
    assert kl_fused.is_fused_available("cpu") and kl_fused.is_fused_available(torch.device("cpu"))
    assert kl_fused.fused_unavailable_reason("cpu") is None
    assert not kl_fused.is_fused_available("meta")
    assert "meta" in kl_fused.fused_unavailable_reason("meta")


def test_a_device_without_a_kernel_falls_back_and_says_so_once():
    student = torch.randn(2, 3, 50, device="meta")
    teacher = torch.randn(2, 3, 50, device="meta")
    from kl_fused import _warn_once

    _warn_once.forget(("kl_div_logits", "meta"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = kl_fused.kl_div_logits(student, teacher, reduction="none")
        kl_fused.kl_div_logits(student, teacher, reduction="none")
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "pure-PyTorch reference" in messages[0] and "meta" in messages[0]
    assert first.shape == (2, 3) and first.device.type == "meta"
