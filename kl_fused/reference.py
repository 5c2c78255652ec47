"""The pure-PyTorch reference of kl_fused.kl_div_logits: same signature and contract, differentiable.

It is the oracle the fused kernels are tested against (run it in float64 for that), the path taken
on devices without a compiled kernel, and the `reference`/`compile` providers of the benchmark.
It materialises several (rows x V) buffers, which is what the fused kernels avoid.
"""

import torch
import torch.nn.functional as F

from kl_fused._sparse_reference import sparse_kl_div  # noqa: F401  (kl_fused.reference.sparse_kl_div)
from kl_fused._validate import check_kl_args


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
    acc = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    s = student_logits.to(acc)
    t = teacher_logits.to(acc)
    if mask is not None:
        # Rows that do not count may hold NaN or garbage: keep them out of the math (and its gradient).
        keep = mask.unsqueeze(-1)
        s = torch.where(keep, s, 0.0)
        t = torch.where(keep, t, 0.0)
    log_q = F.log_softmax(s / temperature, dim=-1)
    log_p = F.log_softmax(t / temperature, dim=-1)
    if direction == "reverse":
        log_p, log_q = log_q, log_p
    p = log_p.exp()
    # p (log p - log q) with 0 * log(0 / q) = 0: a zero-probability entry contributes nothing, and
    # the where comes before the product so that no 0 * inf reaches the gradient either.
    row_loss = (p * torch.where(p > 0, log_p - log_q, 0.0)).sum(dim=-1)
    if mask is not None:
        row_loss = torch.where(mask, row_loss, 0.0)
    if reduction == "none":
        return row_loss
    total = row_loss.sum()
    if reduction == "sum":
        return total
    counted = mask.sum() if mask is not None else row_loss.numel()
    if isinstance(counted, torch.Tensor):
        counted = counted.clamp_min(1).to(acc)
    else:
        counted = max(counted, 1)
    if reduction == "mean":
        counted = counted * student_logits.shape[-1]
    return total / counted
