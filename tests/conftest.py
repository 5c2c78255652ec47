"""Shared test helpers: devices present, the tolerance table, oracles, and proof that the fused op ran."""

import contextlib

import numpy as np
import pytest
import scipy.special
import torch

import kl_fused

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]

# Tolerances against a float64 computation on the same (already rounded) inputs. The loss is
# accumulated in fp32 for 16-bit inputs, so its tolerance is fp32-like; gradients are stored in the
# input dtype (and, for a weighted loss, rounded once more when scaled), hence two ulps of it.
TOLERANCES = {
    torch.float64: dict(loss_rtol=1e-10, loss_atol=1e-12, grad_rtol=1e-9, grad_atol=1e-12),
    torch.float32: dict(loss_rtol=2e-5, loss_atol=2e-6, grad_rtol=1e-4, grad_atol=1e-6),
    torch.bfloat16: dict(loss_rtol=1e-4, loss_atol=1e-5, grad_rtol=2 * 2**-8, grad_atol=1e-5),
    torch.float16: dict(loss_rtol=1e-4, loss_atol=1e-5, grad_rtol=2 * 2**-11, grad_atol=1e-6),
}


def make_logits(shape, dtype, device, seed, scale=3.0):
    """A correlated (student, teacher) pair of random logits: never zeros, never equal."""
    gen = torch.Generator().manual_seed(seed)
    teacher = scale * torch.randn(shape, generator=gen, dtype=torch.float64)
    student = 0.7 * teacher + scale * 0.6 * torch.randn(shape, generator=gen, dtype=torch.float64)
    return student.to(device=device, dtype=dtype), teacher.to(device=device, dtype=dtype)


def logits_at_scale(shape, dtype, scale, seed):
    """(student, teacher, T): correlated logits of order 10 and the T that puts |logit| / T near scale."""
    gen = torch.Generator().manual_seed(seed)
    teacher = 10 * torch.randn(shape, generator=gen, dtype=torch.float64)
    student = 0.7 * teacher + 6 * torch.randn(shape, generator=gen, dtype=torch.float64)
    return student.to(dtype), teacher.to(dtype), 10.0 / scale


def reference64(student, teacher, **kwargs):
    """The pure-PyTorch reference in float64 on the same input values, with its gradients."""
    s = student.detach().double().requires_grad_()
    t = teacher.detach().double().requires_grad_()
    loss = kl_fused.reference.kl_div_logits(s, t, **kwargs)
    return loss, s, t


def scipy_row_kl(student, teacher, temperature=1.0, direction="forward"):
    """Independent oracle: per-row KL with scipy's log_softmax and rel_entr, in float64 numpy."""
    s = student.detach().double().cpu().numpy() / temperature
    t = teacher.detach().double().cpu().numpy() / temperature
    p = np.exp(scipy.special.log_softmax(t, axis=-1))
    q = np.exp(scipy.special.log_softmax(s, axis=-1))
    if direction == "reverse":
        p, q = q, p
    return scipy.special.rel_entr(p, q).sum(axis=-1)


def analytic_grads(student, teacher, temperature=1.0, direction="forward"):
    """Independent oracle of the per-row-loss gradients (design notes), float64 numpy."""
    s = student.detach().double().cpu().numpy() / temperature
    t = teacher.detach().double().cpu().numpy() / temperature
    log_q = scipy.special.log_softmax(s, axis=-1)
    log_p = scipy.special.log_softmax(t, axis=-1)
    p, q = np.exp(log_p), np.exp(log_q)
    if direction == "forward":
        kl = scipy.special.rel_entr(p, q).sum(-1, keepdims=True)
        return (q - p) / temperature, p * (log_p - log_q - kl) / temperature
    kl = scipy.special.rel_entr(q, p).sum(-1, keepdims=True)
    return q * (log_q - log_p - kl) / temperature, (p - q) / temperature


def jsd_reference64(student, teacher, **kwargs):
    """The pure-PyTorch jsd_logits reference in float64 on the same input values, with its gradients."""
    s = student.detach().double().clone().requires_grad_()
    t = teacher.detach().double().clone().requires_grad_()
    return kl_fused.reference.jsd_logits(s, t, **kwargs), s, t


def numpy_jsd(student, teacher, beta, temperature):
    """Independent oracle of jsd_logits, float64 numpy: per-row JSD and the gradients of each row's JSD
    (design notes' formulas), with log m = logsumexp([log p, log q], b=[beta, 1 - beta]) and scipy's
    rel_entr. beta = 0 and beta = 1 are forward and reverse KL (scipy_row_kl, analytic_grads)."""
    if beta in (0.0, 1.0):
        direction = "forward" if beta == 0.0 else "reverse"
        return (scipy_row_kl(student, teacher, temperature, direction),
                *analytic_grads(student, teacher, temperature, direction))
    s = student.detach().double().cpu().numpy() / temperature
    t = teacher.detach().double().cpu().numpy() / temperature
    log_q = scipy.special.log_softmax(s, axis=-1)
    log_p = scipy.special.log_softmax(t, axis=-1)
    p, q = np.exp(log_p), np.exp(log_q)
    weights = np.array([beta, 1 - beta]).reshape(2, *([1] * log_p.ndim))
    log_m = scipy.special.logsumexp(np.stack([log_p, log_q]), axis=0, b=weights)
    m = np.exp(log_m)
    kl_p = scipy.special.rel_entr(p, m).sum(-1, keepdims=True)
    kl_q = scipy.special.rel_entr(q, m).sum(-1, keepdims=True)
    rows = beta * kl_p + (1 - beta) * kl_q
    grad_s = (1 - beta) * q * (log_q - log_m - kl_q) / temperature
    grad_t = beta * p * (log_p - log_m - kl_p) / temperature
    return rows[..., 0], grad_s, grad_t


def assert_close(actual, expected, rtol, atol, what=""):
    actual = torch.as_tensor(actual).detach().double().cpu()
    expected = torch.as_tensor(expected).detach().double().cpu()
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, equal_nan=True, msg=lambda m: f"{what}: {m}")


def assert_grad_close(actual, expected, dtype, what=""):
    """Gradient comparison: rtol of the dtype, atol relative to the gradient's scale."""
    tol = TOLERANCES[dtype]
    expected = torch.as_tensor(expected).detach().double().cpu()
    finite = expected[expected.isfinite()]
    scale = finite.abs().max().item() if finite.numel() else 0.0
    assert_close(actual, expected, rtol=tol["grad_rtol"], atol=tol["grad_atol"] + tol["grad_rtol"] * 0.05 * scale, what=what)


def check_against_reference64(reference, loss, grad_s, grad_t, student, teacher, dtype, *, student_grad=True,
                              teacher_grad=True, **options):
    """An op's loss and its gradients at upstream 1, as the row-loss ops return them (an empty tensor for
    a gradient not asked for), against the float64 reference's autograd: `reference` is reference64
    (kl_div_logits) or jsd_reference64 (jsd_logits), called with **options."""
    ref, s64, t64 = reference(student, teacher, **options)
    tol = TOLERANCES[dtype]
    assert_close(loss, ref, tol["loss_rtol"], tol["loss_atol"], "loss vs float64 reference")
    if student_grad or teacher_grad:
        ref.backward(torch.ones_like(ref))
    for wanted, got, want, like, name in ((student_grad, grad_s, s64.grad, student, "student"),
                                          (teacher_grad, grad_t, t64.grad, teacher, "teacher")):
        if wanted:
            assert got.dtype == dtype and got.shape == like.shape
            assert_grad_close(got, want, dtype, f"{name} grad")
        else:
            assert got.numel() == 0


def assert_weighted_grad_close(actual, expected, dtype, scale, temperature, what=""):
    """A gradient of the form p (log p - log q - KL) / T at |logit| / T near `scale`: a difference of terms
    of size scale / T that cancel to ~0 there, so that its error is the rounding of those terms."""
    rounding = 4 * torch.finfo(actual.dtype).eps * scale / temperature
    assert_close(actual, expected, TOLERANCES[dtype]["grad_rtol"], rounding, what)


@contextlib.contextmanager
def fused_op_must_run(*ops):
    """Fails the test unless each of `ops` (default: torch.ops.kl_fused.kl_div_logits) ran, that is,
    the compiled kernel and not the reference fallback. The profiler sees ops called inside other ops
    too (the fused linear losses call the row ops from their chunk loop)."""
    ops = ops or (torch.ops.kl_fused.kl_div_logits.default,)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        yield
    ran = {event.name for event in profile.events()}
    for op in ops:
        name = op.name()  # "kl_fused::kl_div_logits"
        assert name in ran, f"{name} did not run (fell back to plain PyTorch?)"


@pytest.fixture(params=DEVICES)
def device(request):
    assert kl_fused.is_fused_available(request.param), kl_fused.fused_unavailable_reason(request.param)
    return request.param
