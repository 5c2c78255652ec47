"""Shared by the sparse_kl_div tests (CPU kernels and emulated CUDA kernels): inputs with the edges of
the contract, the float64 reference with its gradients, an independent numpy/scipy oracle, and TRL's
own server-distillation loss."""

from types import SimpleNamespace

import numpy as np
import scipy.special
import torch
import torch.nn.functional as F

import kl_fused
from kl_fused._sparse_args import support_mass_tolerance
from kl_fused._sparse_reference import sparse_kl_div_at_tolerance

NEG_INF = float("-inf")


def make_sparse(leading, vocab, slots, dtype, seed, *, unused=0, teacher_scale=3.0, lp_dtype=torch.float32,
                temperature=1.0, index_dtype=torch.int64):
    """(student logits, teacher indices, teacher log-probs): the teacher's top-`slots` tokens of a random
    distribution correlated with the student's, the last `unused` slots of every other row unused
    (-inf, with indices outside [0, V) that must never be read)."""
    gen = torch.Generator().manual_seed(seed)
    teacher = teacher_scale * torch.randn(*leading, vocab, generator=gen, dtype=torch.float64)
    student = 0.7 * teacher + teacher_scale * 0.6 * torch.randn(*leading, vocab, generator=gen, dtype=torch.float64)
    idx, lp = kl_fused.topk_teacher(teacher, slots, temperature=temperature)
    idx, lp = idx.to(index_dtype), lp.to(lp_dtype)
    if unused:
        rows = idx.view(-1, slots)[::2]
        rows[:, slots - unused:] = vocab + 7
        lp.view(-1, slots)[::2, slots - unused:] = NEG_INF
    return student.to(dtype), idx, lp


def reference64(student, indices, logprobs, *, logprobs_grad=True, **kwargs):
    """The pure-PyTorch reference in float64 on the same input values, with leaf tensors for its gradients."""
    s = student.detach().double().requires_grad_()
    lp = logprobs.detach().double().requires_grad_(logprobs_grad)
    options = dict(temperature=1.0, tail="bucket", reduction="batchmean", mask=None, validate=False)
    options.update(kwargs)
    # The tolerance on the support's mass is that of the dtype the log-probs came in.
    tolerance = support_mass_tolerance(logprobs.dtype, indices.shape[-1])
    loss = sparse_kl_div_at_tolerance(s, indices, lp, *options.values(), tolerance)
    return loss, s, lp


def op_call(student, indices, logprobs, *, mask=None, temperature=1.0, tail="bucket", reduction="sum",
            validate=True, student_grad=True, logprobs_grad=True):
    """The arguments of torch.ops.kl_fused.sparse_kl_div (and of its emulated twin)."""
    tolerance = support_mass_tolerance(logprobs.dtype, indices.shape[-1])
    return (student, indices, logprobs, mask, float(temperature), tail == "renormalize", reduction, tolerance,
            validate, student_grad, logprobs_grad)


def numpy_rows(student, indices, logprobs, temperature=1.0, tail="bucket"):
    """Independent oracle, per row in float64 numpy: the coarsened (bucket) or renormalized KL."""
    vocab, slots = student.shape[-1], indices.shape[-1]
    s = student.detach().double().cpu().numpy().reshape(-1, vocab) / temperature
    idx = indices.cpu().numpy().reshape(-1, slots)
    lp = logprobs.detach().double().cpu().numpy().reshape(-1, slots)
    out = []
    for row in range(s.shape[0]):
        used = lp[row] != -np.inf
        q = np.exp(scipy.special.log_softmax(s[row]))
        p = np.exp(lp[row][used])
        q_s = q[idx[row][used]]
        if tail == "renormalize":
            out.append(scipy.special.rel_entr(p / p.sum(), q_s / q_s.sum()).sum() if used.any() else 0.0)
            continue
        rest = np.ones(vocab, dtype=bool)
        rest[idx[row][used]] = False
        p_r = 0.0 if not rest.any() else max(1.0 - p.sum(), 0.0)
        out.append(scipy.special.rel_entr(p, q_s).sum() + scipy.special.rel_entr(p_r, q[rest].sum()))
    return np.array(out).reshape(student.shape[:-1])


def trl_loss(student_logits, indices, logprobs, mask, temperature, tail):
    """TRL 1.16's server-distillation forward KL (beta = 0), called directly with a stand-in `self` that
    provides what the method reads; labels are -100 where the mask is False."""
    from trl.experimental.server_distillation.server_distillation_trainer import ServerDistillationTrainer

    stand_in = SimpleNamespace(loss_add_tail=tail == "bucket",
                               _reduce_divergence_loss=ServerDistillationTrainer._reduce_divergence_loss)
    labels = torch.where(mask, 1, -100) if mask is not None else torch.ones(student_logits.shape[:-1], dtype=torch.long)
    student_log_probs = F.log_softmax(student_logits / temperature, dim=-1)
    # TRL's server path fills unused slots with token id 0 (it gathers them, then masks them out).
    ids = torch.where(logprobs == NEG_INF, 0, indices.long())
    teacher_result = {"topk_logprobs": logprobs, "topk_token_ids": ids}
    return ServerDistillationTrainer._compute_server_forward_kl_loss(stand_in, teacher_result, student_log_probs, labels)
