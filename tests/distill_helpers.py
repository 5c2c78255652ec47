"""Shared by the distillation-step tests (CPU kernels, the linear form, the emulated CUDA kernels): inputs
with labels, ignored rows and NaN where nothing may be read, the float64 reference with its gradients, and an
independent oracle built from F.cross_entropy and scipy."""

import numpy as np
import scipy.special
import torch
import torch.nn.functional as F

import kl_fused
from conftest import make_logits
from sparse_helpers import make_sparse

IGNORE = -100


def make_labels(leading, vocab, seed, *, ignored=0.25, device="cpu", dtype=torch.int64):
    """Labels in [0, V) with about `ignored` of them IGNORE (always at least one counted row)."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, vocab, leading, generator=gen)
    drop = torch.rand(leading, generator=gen) < ignored
    drop.view(-1)[0] = False
    return labels.masked_fill(drop, IGNORE).to(device=device, dtype=dtype)


def make_step(leading, vocab, dtype, seed, teacher="dense", *, slots=8, device="cpu"):
    """(student, teacher logits or None, teacher_topk or None, labels)."""
    labels = make_labels(leading, vocab, seed + 1, device=device)
    if teacher == "topk":
        student, idx, lp = make_sparse(leading, vocab, slots, dtype, seed, unused=2)
        return student.to(device), None, (idx.to(device), lp.to(device)), labels
    student, teacher_logits = make_logits((*leading, vocab), dtype, device, seed)
    return student, teacher_logits if teacher == "dense" else None, None, labels


def poison_uncounted(student, teacher, topk, labels, mask=None):
    """NaN in every row that does not count (label IGNORE, or mask False), and garbage labels under a
    False mask: none of it may be read."""
    uncounted = labels == IGNORE
    if mask is not None:
        uncounted = uncounted | ~mask
        labels = labels.masked_fill(~mask, 10**9)
    student = student.clone()
    student[uncounted] = float("nan")
    if teacher is not None:
        teacher = teacher.clone()
        teacher[uncounted] = float("nan")
    if topk is not None:
        idx, lp = topk[0].clone(), topk[1].clone()
        idx[uncounted] = -5
        lp[uncounted] = float("nan")
        topk = (idx, lp)
    return student, teacher, topk, labels


def reference64(student, teacher, topk, labels, *, teacher_grad=True, **options):
    """The float64 reference and its leaves (student, teacher or top-k log-probs), for autograd."""
    s = student.detach().double().requires_grad_()
    t = teacher.detach().double().requires_grad_(teacher_grad) if teacher is not None else None
    topk64 = None
    if topk is not None:
        topk64 = (topk[0], topk[1].detach().double().requires_grad_(teacher_grad))
    loss = kl_fused.reference.distillation_loss(s, t, teacher_topk=topk64, labels=labels, **options)
    leaves = (s, t if t is not None else (topk64[1] if topk64 is not None else None))
    return loss, leaves


def oracle_rows(student, teacher, labels, *, divergence="forward_kl", beta=0.5, temperature=1.0, soft_weight=1.0,
                hard_weight=0.0, label_smoothing=0.0):
    """Independent per-row oracle of a dense-teacher step on rows that all count: F.cross_entropy (its own
    label smoothing) in float64 and scipy's rel_entr for the divergence."""
    s64 = student.detach().double().cpu()
    ce = F.cross_entropy(s64, labels.cpu().long(), reduction="none", label_smoothing=label_smoothing).numpy()
    if teacher is None:
        return hard_weight * ce
    s = s64.numpy() / temperature
    t = teacher.detach().double().cpu().numpy() / temperature
    p = np.exp(scipy.special.log_softmax(t, axis=-1))
    q = np.exp(scipy.special.log_softmax(s, axis=-1))
    if divergence == "forward_kl":
        d = scipy.special.rel_entr(p, q).sum(-1)
    elif divergence == "reverse_kl":
        d = scipy.special.rel_entr(q, p).sum(-1)
    else:
        m = beta * p + (1 - beta) * q
        d = beta * scipy.special.rel_entr(p, m).sum(-1) + (1 - beta) * scipy.special.rel_entr(q, m).sum(-1)
    return soft_weight * d + hard_weight * ce
