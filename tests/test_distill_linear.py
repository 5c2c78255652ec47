"""kl_fused.linear_distillation_loss: the distillation step from hidden states in the shared chunk loop,
against the materialised float64 reference (values and every gradient) for each teacher form (hidden
states, logits, top-k slots, none), F.cross_entropy for the fused linear cross-entropy, and Liger's chunked
distillation loss where its semantics agree; labels, masks, num_items_in_batch, errors."""

import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F

import kl_fused
from conftest import TOLERANCES, assert_close, assert_grad_close, fused_op_must_run
from distill_helpers import IGNORE, make_labels
from sparse_helpers import make_sparse

OPS = (torch.ops.kl_fused.chunked_linear_loss.default, torch.ops.kl_fused.distillation_loss.default)


def make_layers(rows, hidden, vocab, dtype, device, seed, *, teacher="hidden", slots=8):
    """Student layer (with bias), a teacher of the given form, labels with ignored rows."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (scale * torch.randn(shape, generator=gen, dtype=torch.float64)).to(device=device, dtype=dtype)

    t = dict(student_hidden=randn(rows, hidden), student_weight=randn(vocab, hidden, scale=3 / math.sqrt(hidden)),
             student_bias=randn(vocab, scale=0.5))
    if teacher == "hidden":
        t.update(teacher_hidden=randn(rows, hidden + 3), teacher_weight=randn(vocab, hidden + 3, scale=0.5),
                 teacher_bias=randn(vocab, scale=0.5))
    elif teacher == "logits":
        t["teacher_logits"] = randn(rows, vocab, scale=3.0)
    elif teacher == "topk":
        _, idx, lp = make_sparse((rows,), vocab, slots, torch.float64, seed + 1, unused=2)
        t["teacher_topk"] = (idx.to(device), lp.to(device=device, dtype=torch.float32))
    labels = make_labels((rows,), vocab, seed + 2, device=device)
    return t, labels


def leaves(tensors, dtype=None):
    out = {}
    for name, x in tensors.items():
        if name == "teacher_topk":
            lp = x[1].detach().clone()
            out[name] = (x[0], (lp.double() if dtype else lp).requires_grad_())
        else:
            y = x.detach().clone()
            out[name] = (y.double() if dtype else y).requires_grad_()
    return out


def grads_of(tensors):
    return {name: (x[1].grad if name == "teacher_topk" else x.grad) for name, x in tensors.items()}


@pytest.mark.parametrize("teacher", ["hidden", "logits", "topk", "none"])
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_every_teacher_form_against_the_materialised_reference(device, teacher, reduction):
    tensors, labels = make_layers(13, 16, 300, torch.float32, device, seed=1, teacher=teacher)
    mask = torch.ones(13, dtype=torch.bool, device=device)
    mask[[2, 9]] = False
    tensors["student_hidden"][~mask] = float("nan")  # rows that do not count are never read
    options = dict(labels=labels, mask=mask, hard_weight=0.6, soft_weight=0.8, temperature=1.5, label_smoothing=0.1,
                   reduction=reduction, student_softcap=20.0)
    got_t = leaves(tensors)
    with fused_op_must_run(*OPS):
        got = kl_fused.linear_distillation_loss(**got_t, chunk_rows=4, **options)
    weights = torch.linspace(-1, 2, 13, device=device) if reduction == "none" else torch.ones((), device=device)
    got.backward(weights)
    ref_t = leaves({k: torch.where(mask[:, None], v, 0.0) if k == "student_hidden" else v for k, v in tensors.items()},
                   dtype=torch.float64)
    ref = kl_fused.reference.linear_distillation_loss(**ref_t, **options)
    ref.backward(weights.double())
    assert_close(got, ref, 2e-5, 2e-6, "loss")
    for name, grad in grads_of(got_t).items():
        expected = grads_of(ref_t)[name]
        if expected is None:
            continue
        if name == "student_hidden":
            grad, expected = grad[mask], expected[mask]
        assert_grad_close(grad, expected, torch.float32, name)


@pytest.mark.parametrize("eps", [0.0, 0.2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_without_a_teacher_it_is_a_fused_linear_cross_entropy(device, eps, dtype):
    tensors, labels = make_layers(2 * 9, 24, 500, dtype, device, seed=2, teacher="none")
    h = tensors["student_hidden"].view(2, 9, 24).clone().requires_grad_()
    w = tensors["student_weight"].clone().requires_grad_()
    y = labels.view(2, 9)
    with fused_op_must_run(*OPS):
        loss = kl_fused.linear_distillation_loss(h, w, labels=y, hard_weight=1, label_smoothing=eps, chunk_rows=5)
    loss.backward()
    # The same matmuls in the layer's dtype (as nn.Linear runs them), the cross-entropy in fp32.
    h2, w2 = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    expected = F.cross_entropy((h2 @ w2.T).float().view(-1, 500), y.view(-1), ignore_index=-100, label_smoothing=eps)
    expected.backward()
    tol = TOLERANCES[dtype]
    assert_close(loss, expected, 10 * tol["loss_rtol"], tol["loss_atol"], "loss vs F.cross_entropy")
    assert_grad_close(h.grad, h2.grad, dtype, "hidden grad")
    assert_grad_close(w.grad, w2.grad, dtype, "weight grad")


def test_num_items_in_batch_and_parts(device):
    tensors, labels = make_layers(10, 8, 120, torch.float64, device, seed=3, teacher="logits")
    parts = kl_fused.linear_distillation_loss(**tensors, labels=labels, hard_weight=0.5, num_items_in_batch=torch.tensor(
        23, device=device), return_parts=True)
    total = kl_fused.reference.linear_distillation_loss(**tensors, labels=labels, hard_weight=0.5, reduction="sum",
                                                         return_parts=True)
    for got, expected in zip(parts, total):
        assert_close(got, expected / 23, 1e-12, 1e-14, "parts")
    assert_close(parts.loss, parts.soft + 0.5 * parts.hard, 1e-12, 1e-14, "weighted")


def test_teacher_scale_or_softcap_with_given_logits_is_an_error(device):
    tensors, labels = make_layers(4, 8, 30, torch.float32, device, seed=4, teacher="logits")
    for fn in (kl_fused.linear_kl_div, kl_fused.linear_distillation_loss):
        for option in (dict(teacher_logit_scale=2.0), dict(teacher_softcap=30.0)):
            with pytest.raises(ValueError, match="teacher_logit_scale .* and teacher_softcap .* apply to logits built"):
                fn(tensors["student_hidden"], tensors["student_weight"], tensors["teacher_logits"], **option)
    topk, _ = make_layers(4, 8, 30, torch.float32, device, seed=4, teacher="topk")
    with pytest.raises(ValueError, match="apply to logits built"):
        kl_fused.linear_distillation_loss(topk["student_hidden"], topk["student_weight"],
                                          teacher_topk=topk["teacher_topk"], teacher_softcap=3.0)
    with pytest.raises(ValueError, match="nothing to compute"):
        kl_fused.linear_distillation_loss(tensors["student_hidden"], tensors["student_weight"])
    with pytest.raises(ValueError, match=r"labels must lie in \[0, V\)"):
        kl_fused.linear_distillation_loss(tensors["student_hidden"], tensors["student_weight"],
                                          labels=torch.full((4,), 30, device=device), hard_weight=1.0)


def test_module(device):
    tensors, labels = make_layers(6, 8, 70, torch.float64, device, seed=5, teacher="topk")
    module = kl_fused.LinearDistillationLoss(hard_weight=0.3, temperature=2.0, chunk_rows=4, tail="renormalize")
    got = module(tensors["student_hidden"], tensors["student_weight"], teacher_topk=tensors["teacher_topk"],
                 labels=labels, student_bias=tensors["student_bias"])
    expected = kl_fused.reference.linear_distillation_loss(**tensors, labels=labels, hard_weight=0.3, temperature=2.0,
                                                           tail="renormalize")
    assert_close(got, expected, 1e-12, 1e-14, "module")
    with pytest.raises(ValueError, match="chunk_rows must be at least 1"):
        kl_fused.LinearDistillationLoss(chunk_rows=0)


def test_a_teacher_topk_of_another_vocabulary_is_an_error_at_the_loss(device):
    """A TeacherTopK (the cache's batches) carries its vocabulary: the loss refuses a student of another
    one, whether or not its ids happen to lie below V; ids at or above V are refused on a plain pair too."""
    from kl_fused._teacher_topk import TeacherTopK

    tensors, labels = make_layers(6, 8, 70, torch.float32, device, seed=6, teacher="topk")
    h, w, (idx, lp) = tensors["student_hidden"], tensors["student_weight"], tensors["teacher_topk"]
    logits = (h @ w.T).detach()
    ok = TeacherTopK(idx, lp, 70)
    kl_fused.linear_distillation_loss(h, w, teacher_topk=ok, labels=labels, hard_weight=0.5)
    kl_fused.distillation_loss(logits, teacher_topk=ok, labels=labels, hard_weight=0.5)
    other = TeacherTopK(idx, lp, 71)
    with pytest.raises(ValueError, match="vocabulary of 71 tokens .* the student's logits have 70"):
        kl_fused.linear_distillation_loss(h, w, teacher_topk=other, labels=labels, hard_weight=0.5)
    with pytest.raises(ValueError, match="vocabulary of 71 tokens .* the student's logits have 70"):
        kl_fused.distillation_loss(logits, teacher_topk=other, labels=labels, hard_weight=0.5)
    beyond = idx.clone()
    beyond[3, 0] = 70
    with pytest.raises(ValueError, match=r"teacher_indices must lie in \[0, V\) = \[0, 70\)"):
        kl_fused.linear_distillation_loss(h, w, teacher_topk=(beyond, lp), chunk_rows=2)


def test_validate_synchronises_once_per_call_not_per_chunk(monkeypatch):
    """With validate, where reading the kernels' row status is a host synchronisation (CUDA), the chunks
    run unvalidated and one flag is read at the end; forced here on the CPU, where the logic is the same.
    A bad label in a late chunk still raises, naming its row; a NaN input row raises nothing."""
    from kl_fused import _chunked_linear

    reads, validated = [], []
    real_rows = _chunked_linear.distillation_rows

    def counting_flag(flag):
        reads.append(flag)
        return bool(flag)

    def counting_rows(*args):
        validated.append(args[17])
        return real_rows(*args)

    monkeypatch.setattr(_chunked_linear, "defers_validation", lambda device: True)
    monkeypatch.setattr(_chunked_linear, "host_flag", counting_flag)
    monkeypatch.setattr(_chunked_linear, "distillation_rows", counting_rows)
    tensors, labels = make_layers(32, 8, 50, torch.float64, "cpu", seed=7, teacher="topk")
    options = dict(labels=labels, hard_weight=0.5, chunk_rows=4)
    loss = kl_fused.linear_distillation_loss(**tensors, **options)
    expected = kl_fused.reference.linear_distillation_loss(**tensors, labels=labels, hard_weight=0.5)
    assert_close(loss, expected, 1e-12, 1e-14, "deferred validation")
    assert len(reads) == 1 and len(validated) >= 6 and not any(validated), (reads, validated)

    reads.clear()
    bad = labels.clone()
    bad[29] = 50
    with pytest.raises(ValueError, match=r"labels must lie in \[0, V\) = \[0, 50\).* row 29 of the leading shape \(32,\)"):
        kl_fused.linear_distillation_loss(**tensors, **{**options, "labels": bad})
    assert len(reads) == 1

    reads.clear()
    nan_hidden = tensors["student_hidden"].clone()
    nan_hidden[torch.nonzero(labels != IGNORE)[5, 0]] = float("nan")
    loss = kl_fused.linear_distillation_loss(**{**tensors, "student_hidden": nan_hidden}, **options)
    assert loss.isnan() and len(reads) == 1


LIGER = importlib.util.find_spec("liger_kernel") is not None


@pytest.mark.skipif(not LIGER, reason="liger-kernel is not installed (the test extra installs it)")
@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_equals_ligers_chunked_distillation_loss(beta, temperature):
    """LigerFusedLinearJSDLoss (liger-kernel's chunked losses are plain PyTorch and run on the CPU): CE on
    labels (ignore_index -100, no smoothing) + Liger's generalized JSD (beta 0: forward KL, 1: reverse KL,
    TRL's convention, as jsd_logits), each the sum over counted rows / counted rows, no T^2."""
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    tensors, labels = make_layers(24, 16, 200, torch.float32, "cpu", seed=6, teacher="hidden")
    del tensors["teacher_bias"], tensors["student_bias"]
    divergence = {0.0: "forward_kl", 1.0: "reverse_kl"}.get(beta, "jsd")
    ours, theirs = leaves(tensors), leaves(tensors)
    loss = kl_fused.linear_distillation_loss(**ours, labels=labels, divergence=divergence, beta=beta,
                                             temperature=temperature, soft_weight=0.3, hard_weight=0.7, chunk_rows=7)
    loss.backward()
    liger = LigerFusedLinearJSDLoss(weight_hard_loss=0.7, weight_soft_loss=0.3, beta=beta, temperature=temperature,
                                    compiled=False, chunk_size=8)
    expected = liger(theirs["student_hidden"], theirs["student_weight"], theirs["teacher_hidden"],
                     theirs["teacher_weight"], labels)
    expected.backward()
    assert_close(loss, expected, 2e-5, 2e-6, "loss vs Liger")
    for name in ("student_hidden", "student_weight"):
        assert_grad_close(ours[name].grad, theirs[name].grad, torch.float32, name)
