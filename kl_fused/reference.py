"""The pure-PyTorch references of kl_fused's losses on logits: same signatures and contracts as the
fused functions, differentiable (second order too).

They are the oracles the fused kernels are tested against (run them in float64 for that), the path
taken on devices without a compiled kernel, and the `reference`/`compile` providers of the
benchmark. They materialise several (rows x V) buffers, which is what the fused kernels avoid.
"""

import torch
import torch.nn.functional as F

from kl_fused._distill_reference import distillation_loss, linear_distillation_loss  # noqa: F401  (kl_fused.reference.*)
from kl_fused._sparse_reference import sparse_kl_div  # noqa: F401  (kl_fused.reference.sparse_kl_div)
from kl_fused._validate import check_jsd_args, check_kl_args


def _log_probs(student_logits, teacher_logits, temperature, mask):
    """(log q, log p): log_softmax of student and teacher at `temperature`, in the accumulation type
    (float64 for float64 input, else float32). Rows that do not count are zeroed first: they may
    hold NaN or garbage, which must stay out of the math and of its gradient."""
    acc = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    s = student_logits.to(acc)
    t = teacher_logits.to(acc)
    if mask is not None:
        keep = mask.unsqueeze(-1)
        s = torch.where(keep, s, 0.0)
        t = torch.where(keep, t, 0.0)
    return F.log_softmax(s / temperature, dim=-1), F.log_softmax(t / temperature, dim=-1)


def _kl_rows(log_p, log_q):
    """Per-row KL(p || q) = sum p (log p - log q) with 0 * log(0 / q) = 0: a zero-probability entry
    contributes nothing, and the where comes before the product so that no 0 * inf reaches the
    gradient either."""
    p = log_p.exp()
    return (p * torch.where(p > 0, log_p - log_q, 0.0)).sum(dim=-1)


def _reduce(row_loss, reduction, mask, vocab):
    """none -> per row (leading shape); sum; batchmean -> / max(counted rows, 1); mean -> also / V."""
    if mask is not None:
        row_loss = torch.where(mask, row_loss, 0.0)
    if reduction == "none":
        return row_loss
    total = row_loss.sum()
    if reduction == "sum":
        return total
    counted = mask.sum() if mask is not None else row_loss.numel()
    if isinstance(counted, torch.Tensor):
        counted = counted.clamp_min(1).to(row_loss.dtype)
    else:
        counted = max(counted, 1)
    if reduction == "mean":
        counted = counted * vocab
    return total / counted


def kl_div_logits(
    student_logits,
    teacher_logits,
    *,
    temperature=1.0,
    reduction="batchmean",
    direction="forward",
    mask=None,
):
    """KL divergence between softmax(teacher/T) and softmax(student/T) over the last dim.

    See kl_fused.kl_div_logits for the contract; this is the same function in plain PyTorch.
    """
    check_kl_args(student_logits, teacher_logits, temperature, reduction, direction, mask)
    log_q, log_p = _log_probs(student_logits, teacher_logits, temperature, mask)
    if direction == "reverse":
        log_p, log_q = log_q, log_p
    return _reduce(_kl_rows(log_p, log_q), reduction, mask, student_logits.shape[-1])


def jsd_logits(
    student_logits,
    teacher_logits,
    *,
    beta=0.5,
    temperature=1.0,
    reduction="batchmean",
    mask=None,
):
    """Generalized Jensen-Shannon divergence beta KL(p || m) + (1 - beta) KL(q || m), with
    p = softmax(teacher/T), q = softmax(student/T), m = beta p + (1 - beta) q; beta = 0 is
    KL(p || q) and beta = 1 KL(q || p).

    See kl_fused.jsd_logits for the contract; this is the same function in plain PyTorch.
    """
    check_jsd_args(student_logits, teacher_logits, beta, temperature, reduction, mask)
    if beta in (0, 1):  # TRL's endpoints: the KL divergences themselves, not the limits of the mixture
        direction = "forward" if beta == 0 else "reverse"
        return kl_div_logits(
            student_logits, teacher_logits, temperature=temperature, reduction=reduction, direction=direction, mask=mask
        )
    log_q, log_p = _log_probs(student_logits, teacher_logits, temperature, mask)
    # log m in probability space: m > 0 wherever p > 0 or q > 0, and only those entries count; the
    # where keeps log 0 = -inf (both zero) out of the values and the gradient.
    m = beta * log_p.exp() + (1 - beta) * log_q.exp()
    log_m = torch.log(torch.where(m > 0, m, 1.0))
    row_loss = beta * _kl_rows(log_p, log_m) + (1 - beta) * _kl_rows(log_q, log_m)
    return _reduce(row_loss, reduction, mask, student_logits.shape[-1])


def _post_logits(logits, scale, softcap):
    """The logit scale, then the softcap c tanh(z / c), as the fused linear losses apply them."""
    logits = logits * scale if scale != 1.0 else logits
    return softcap * torch.tanh(logits / softcap) if softcap is not None else logits


def materialized_logits(student_hidden, student_weight, teacher_logits=None, *, teacher_hidden=None,
                        teacher_weight=None, student_bias=None, teacher_bias=None, student_logit_scale=1.0,
                        teacher_logit_scale=1.0, student_softcap=None, teacher_softcap=None, mask=None):
    """(student logits, teacher logits) of the fused linear losses, materialised in full. Masked rows'
    hidden states are zeroed first, so that NaN there reaches neither logits nor gradients."""
    if mask is not None:
        keep = mask.unsqueeze(-1)
        student_hidden = torch.where(keep, student_hidden, 0.0)
        teacher_hidden = torch.where(keep, teacher_hidden, 0.0) if teacher_hidden is not None else None
    student = _post_logits(F.linear(student_hidden, student_weight, student_bias), student_logit_scale, student_softcap)
    if teacher_logits is None:
        teacher_logits = _post_logits(F.linear(teacher_hidden, teacher_weight, teacher_bias), teacher_logit_scale,
                                      teacher_softcap)
    return student, teacher_logits


def _linear_reference(loss_fn, name):
    """The reference of a fused linear loss: the logits materialised in full, then loss_fn on them.
    chunk_rows is accepted for the fused function's signature and ignored."""

    def linear_loss(student_hidden, student_weight, teacher_logits=None, *, teacher_hidden=None, teacher_weight=None,
                    student_bias=None, teacher_bias=None, mask=None, chunk_rows=None, student_logit_scale=1.0,
                    teacher_logit_scale=1.0, student_softcap=None, teacher_softcap=None, **options):
        student, teacher = materialized_logits(
            student_hidden, student_weight, teacher_logits, teacher_hidden=teacher_hidden,
            teacher_weight=teacher_weight, student_bias=student_bias, teacher_bias=teacher_bias,
            student_logit_scale=student_logit_scale, teacher_logit_scale=teacher_logit_scale,
            student_softcap=student_softcap, teacher_softcap=teacher_softcap, mask=mask)
        return loss_fn(student, teacher, mask=mask, **options)

    linear_loss.__name__ = linear_loss.__qualname__ = name
    return linear_loss


# kl_fused.linear_kl_div and kl_fused.linear_jsd in plain PyTorch (same signatures).
linear_kl_div = _linear_reference(kl_div_logits, "linear_kl_div")
linear_jsd = _linear_reference(jsd_logits, "linear_jsd")
