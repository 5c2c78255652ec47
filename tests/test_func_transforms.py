"""torch.func (grad, vjp, jvp) and forward-mode AD (torch.autograd.forward_ad) through every fused loss,
against the same transforms of the pure-PyTorch reference; second derivatives raise a clear error."""

import pytest
import torch
import torch.autograd.forward_ad as forward_ad

import kl_fused
from conftest import assert_close, fused_op_must_run, make_logits
from sparse_helpers import make_sparse

OPS = {
    "kl_div_logits": torch.ops.kl_fused.kl_div_logits.default,
    "jsd_logits": torch.ops.kl_fused.jsd_logits.default,
    "sparse_kl_div": torch.ops.kl_fused.sparse_kl_div.default,
    "linear_kl_div": torch.ops.kl_fused.chunked_linear_loss.default,
    "linear_jsd": torch.ops.kl_fused.chunked_linear_loss.default,
    "distillation_loss": torch.ops.kl_fused.distillation_loss.default,
    "linear_distillation_loss": torch.ops.kl_fused.chunked_linear_loss.default,
}
# The distillation step's labels (row (0, 1) ignored) and hard-term options.
LABELS = torch.tensor([[3, -100, 17], [0, 39, 8]])
HARD = dict(labels=LABELS, hard_weight=0.4, label_smoothing=0.1)


def problem(name, reduction):
    """(fused f, reference f, primals, tangents): the loss as a function of its differentiable inputs,
    in float64 (so that fused and reference agree to 1e-10), with a mask."""
    gen = torch.Generator().manual_seed(len(name))
    mask = torch.tensor([[True, False, True], [True, True, True]])
    options = dict(reduction=reduction, mask=mask)
    if name in ("kl_div_logits", "jsd_logits"):
        student, teacher = make_logits((2, 3, 40), torch.float64, "cpu", seed=1)
        options.update(temperature=1.7, **({"beta": 0.3} if name == "jsd_logits" else {"direction": "reverse"}))
        primals = (student, teacher)
        fused, ref = getattr(kl_fused, name), getattr(kl_fused.reference, name)
    elif name == "sparse_kl_div":
        student, idx, lp = make_sparse((2, 3), 40, 6, torch.float64, seed=2, lp_dtype=torch.float64)
        options.update(temperature=0.8)
        primals = (student, lp)
        fused = lambda s, l, **o: kl_fused.sparse_kl_div(s, idx, l, **o)  # noqa: E731
        ref = lambda s, l, **o: kl_fused.reference.sparse_kl_div(s, idx, l, **o)  # noqa: E731
    elif name == "distillation_loss":
        student, teacher = make_logits((2, 3, 40), torch.float64, "cpu", seed=3)
        options.update(temperature=1.7, divergence="reverse_kl", **HARD)
        primals = (student, teacher)
        fused, ref = kl_fused.distillation_loss, kl_fused.reference.distillation_loss
    elif name == "linear_distillation_loss":
        hidden = torch.randn(2, 3, 16, generator=gen, dtype=torch.float64)
        weight = torch.randn(40, 16, generator=gen, dtype=torch.float64)
        _, idx, lp = make_sparse((2, 3), 40, 6, torch.float64, seed=4, lp_dtype=torch.float64)
        options.update(temperature=1.3, chunk_rows=2, **HARD)
        primals = (hidden, weight, lp)
        fused = lambda h, w, l, **o: kl_fused.linear_distillation_loss(h, w, teacher_topk=(idx, l), **o)  # noqa: E731
        ref = lambda h, w, l, **o: kl_fused.reference.linear_distillation_loss(h, w, teacher_topk=(idx, l), **o)  # noqa: E731
    else:
        hidden = torch.randn(2, 3, 16, generator=gen, dtype=torch.float64)
        weight = torch.randn(40, 16, generator=gen, dtype=torch.float64)
        teacher = torch.randn(2, 3, 40, generator=gen, dtype=torch.float64) * 2
        options.update(temperature=1.3, chunk_rows=2)
        primals = (hidden, weight, teacher)
        fused = lambda h, w, t, **o: getattr(kl_fused, name)(h, w, t, **o)  # noqa: E731
        ref = lambda h, w, t, **o: getattr(kl_fused.reference, name)(h, w, t, **o)  # noqa: E731
    tangents = tuple(torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in primals)
    return (lambda *x: fused(*x, **options)), (lambda *x: ref(*x, **options)), primals, tangents


@pytest.mark.parametrize("name", sorted(OPS))
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_jvp_matches_the_reference(name, reduction):
    fused, ref, primals, tangents = problem(name, reduction)
    if reduction == "none" and name.startswith("linear"):
        with pytest.raises(RuntimeError, match=rf"kl_fused.{name}: forward-mode AD .* reduction='none' is not supported"):
            torch.func.jvp(fused, primals, tangents)
        return
    with fused_op_must_run(OPS[name]):
        value, tangent = torch.func.jvp(fused, primals, tangents)
    ref_value, ref_tangent = torch.func.jvp(ref, primals, tangents)
    assert_close(value, ref_value, 1e-10, 1e-12, "value")
    assert tangent.shape == ref_tangent.shape and tangent.abs().sum() > 0
    assert_close(tangent, ref_tangent, 1e-9, 1e-12, "tangent")
    # A tangent on one input only (the others are constants).
    one = lambda x: fused(x, *primals[1:])  # noqa: E731
    one_ref = lambda x: ref(x, *primals[1:])  # noqa: E731
    assert_close(torch.func.jvp(one, primals[:1], tangents[:1])[1], torch.func.jvp(one_ref, primals[:1], tangents[:1])[1],
                 1e-9, 1e-12, "tangent of the first input")


@pytest.mark.parametrize("name", ["kl_div_logits", "sparse_kl_div", "linear_jsd", "distillation_loss"])
def test_forward_ad_dual_tensors(name):
    fused, ref, primals, tangents = problem(name, "sum")
    results = []
    for f in (fused, ref):
        with forward_ad.dual_level():
            out = f(*(forward_ad.make_dual(p, t) for p, t in zip(primals, tangents)))
            results.append(forward_ad.unpack_dual(out))
    assert_close(results[0].primal, results[1].primal, 1e-10, 1e-12, "value")
    assert results[0].tangent is not None, "a silent zero tangent"
    assert_close(results[0].tangent, results[1].tangent, 1e-9, 1e-12, "tangent")


@pytest.mark.parametrize("name", sorted(OPS))
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_grad_and_vjp_match_the_reference(name, reduction):
    fused, ref, primals, _ = problem(name, reduction)
    upstream = torch.linspace(-1.0, 2.0, 6, dtype=torch.float64).view(2, 3) if reduction == "none" else torch.tensor(0.7, dtype=torch.float64)
    with fused_op_must_run(OPS[name]):
        value, vjp_fn = torch.func.vjp(fused, *primals)
        grads = vjp_fn(upstream)
    ref_value, ref_vjp = torch.func.vjp(ref, *primals)
    assert_close(value, ref_value, 1e-10, 1e-12, "value")
    for got, want in zip(grads, ref_vjp(upstream)):
        assert_close(got, want, 1e-9, 1e-12, "vjp")
    scalar = lambda *x: (fused(*x) * upstream).sum()  # noqa: E731
    scalar_ref = lambda *x: (ref(*x) * upstream).sum()  # noqa: E731
    argnums = tuple(range(len(primals)))
    for got, want in zip(torch.func.grad(scalar, argnums)(*primals), torch.func.grad(scalar_ref, argnums)(*primals)):
        assert_close(got, want, 1e-9, 1e-12, "grad")


@pytest.mark.parametrize("name", ["kl_div_logits", "jsd_logits", "sparse_kl_div", "linear_kl_div", "distillation_loss",
                                  "linear_distillation_loss"])
def test_second_derivatives_raise(name):
    fused, _, primals, _ = problem(name, "sum")
    first = lambda x: torch.func.grad(lambda y: fused(y, *primals[1:]))(x).sum()  # noqa: E731
    with pytest.raises(RuntimeError, match=rf"kl_fused.{name} supports first-order gradients only"):
        torch.func.grad(first)(primals[0])
    leaf = primals[0].clone().requires_grad_()
    with pytest.raises(RuntimeError, match=rf"kl_fused.{name} supports first-order gradients only"):
        torch.autograd.grad(fused(leaf, *primals[1:]), leaf, create_graph=True)
