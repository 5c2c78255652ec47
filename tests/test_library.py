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


def test_a_device_without_a_kernel_falls_back_and_says_so_once(monkeypatch):
    """A build without CPU kernels for kl_div_logits (as a device type without any would be)."""
    from kl_fused import _ops, _warn_once

    monkeypatch.setitem(_ops._DEVICE_TYPES, "kl_div_logits", frozenset())
    student, teacher = make_logits((2, 3, 50), torch.float32, "cpu", seed=33)
    _warn_once.forget(("kl_div_logits", "cpu"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = kl_fused.kl_div_logits(student, teacher, reduction="none")
        kl_fused.kl_div_logits(student, teacher, reduction="none")
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "pure-PyTorch reference" in messages[0] and "built without cpu" in messages[0]
    assert_close(first, kl_fused.reference.kl_div_logits(student, teacher, reduction="none"), 0, 0, "the reference ran")


def _meta_calls():
    """(name, call, expected loss shape, dtype) of every public loss on meta tensors, with a mask."""
    meta = lambda *shape, dtype=torch.bfloat16: torch.empty(shape, device="meta", dtype=dtype)  # noqa: E731
    mask = torch.empty(2, 3, device="meta", dtype=torch.bool)
    idx = torch.empty(2, 3, 4, device="meta", dtype=torch.int64)
    labels = torch.empty(2, 3, device="meta", dtype=torch.int64)
    s, t = meta(2, 3, 50).requires_grad_(), meta(2, 3, 50).requires_grad_()
    h, w = meta(2, 3, 16).requires_grad_(), meta(50, 16).requires_grad_()
    return [
        ("kl_div_logits", lambda: kl_fused.kl_div_logits(s, t, mask=mask, reduction="none"), (2, 3), (s, t)),
        ("KLDivLogitsLoss", lambda: kl_fused.KLDivLogitsLoss()(s, t, mask=mask), (), (s, t)),
        ("jsd_logits", lambda: kl_fused.jsd_logits(s, t, mask=mask), (), (s, t)),
        ("sparse_kl_div", lambda: kl_fused.sparse_kl_div(s, idx, meta(2, 3, 4, dtype=torch.float32), mask=mask), (), (s,)),
        ("reference.sparse_kl_div",
         lambda: kl_fused.reference.sparse_kl_div(s, idx, meta(2, 3, 4, dtype=torch.float32), mask=mask), (), (s,)),
        ("linear_kl_div", lambda: kl_fused.linear_kl_div(h, w, meta(2, 3, 50), mask=mask), (), (h, w)),
        ("linear_jsd", lambda: kl_fused.linear_jsd(h, w, teacher_hidden=meta(2, 3, 16), teacher_weight=meta(50, 16),
                                                   reduction="none"), (2, 3), (h, w)),
        ("distillation_loss", lambda: kl_fused.distillation_loss(s, t, labels=labels, hard_weight=0.5, mask=mask,
                                                                 return_parts=True).loss, (), (s, t)),
        ("linear_distillation_loss",
         lambda: kl_fused.linear_distillation_loss(h, w, teacher_topk=(idx, meta(2, 3, 4, dtype=torch.float32)),
                                                   labels=labels, hard_weight=0.5, reduction="none"), (2, 3), (h, w)),
    ]


@pytest.mark.parametrize("index", range(len(_meta_calls())))
def test_meta_inputs_propagate_shapes_without_a_warning(index):
    name, call, shape, leaves = _meta_calls()[index]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss = call()
        grads = torch.autograd.grad(loss.sum(), leaves)
    assert loss.device.type == "meta" and loss.shape == shape and loss.dtype == torch.float32, name
    assert all(g.device.type == "meta" and g.shape == x.shape and g.dtype == x.dtype for g, x in zip(grads, leaves)), name


def test_meta_and_real_tensors_in_one_call_name_the_devices():
    hidden = torch.empty(2, 16, device="meta")
    with pytest.raises(ValueError, match="all tensors must be on one device, got student_hidden on meta, student_weight on cpu"):
        kl_fused.linear_kl_div(hidden, torch.randn(50, 16), torch.randn(2, 50))
    with pytest.raises(ValueError, match="same device, got meta and cpu"):
        kl_fused.kl_div_logits(torch.empty(2, 5, device="meta"), torch.randn(2, 5))
