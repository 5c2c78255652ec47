"""The pure-PyTorch reference of the distillation step (kl_fused.distillation_loss and
kl_fused.linear_distillation_loss): same signatures and contracts, differentiable (second order too).

The oracle the fused kernels are tested against (in float64), and the path taken on devices without
a compiled kernel. It materialises (rows x V) buffers, which is what the fused kernels avoid."""

import torch
import torch.nn.functional as F

from kl_fused._distill_args import check_num_items, check_options, check_teacher_form, check_teacher_topk


def _counted_rows(leading, device, labels, ignore_index, mask):
    """mask & (labels != ignore_index) as a bool tensor of the leading shape, or None when every row counts."""
    counted = mask
    if labels is not None:
        labelled = labels != ignore_index
        counted = labelled if counted is None else counted & labelled
    return counted


def _cross_entropy_rows(student_logits, labels, counted, label_smoothing):
    """(CE per row (0 where a row does not count), rows whose label is out of range), in the accumulation type."""
    acc = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    vocab = student_logits.shape[-1]
    keep = counted if counted is not None else torch.ones(labels.shape, dtype=torch.bool, device=labels.device)
    bad = keep & ((labels < 0) | (labels >= vocab))
    live = keep & ~bad
    s = torch.where(live.unsqueeze(-1), student_logits.to(acc), 0.0)  # uncounted rows may hold NaN
    log_q = F.log_softmax(s, dim=-1)
    target = torch.where(live, labels.long(), 0)
    nll = -log_q.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    rows = nll if label_smoothing == 0 else (1 - label_smoothing) * nll - label_smoothing * log_q.mean(-1)
    return torch.where(live, rows, 0.0), bad


def distillation_loss(student_logits, teacher_logits=None, *, teacher_topk=None, labels=None, divergence="forward_kl",
                      beta=0.5, tail="bucket", temperature=1.0, soft_weight=1.0, hard_weight=0.0, ignore_index=-100,
                      label_smoothing=0.0, reduction="batchmean", mask=None, num_items_in_batch=None,
                      return_parts=False, validate=True):
    """The distillation step in plain PyTorch; see kl_fused.distillation_loss for the contract."""
    from kl_fused.distill import LossParts, _check_args
    from kl_fused.reference import jsd_logits, kl_div_logits, sparse_kl_div

    teacher_topk = _check_args(student_logits, teacher_logits, teacher_topk, labels, divergence, beta, tail,
                               temperature, soft_weight, hard_weight, ignore_index, label_smoothing, reduction, mask,
                               validate)
    num_items = check_num_items(num_items_in_batch, reduction, student_logits.device)
    leading, vocab = student_logits.shape[:-1], student_logits.shape[-1]
    acc = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    counted = _counted_rows(leading, student_logits.device, labels, ignore_index, mask)

    hard, bad = None, None
    if labels is not None:
        hard, bad = _cross_entropy_rows(student_logits, labels, counted, label_smoothing)
        if validate and bad.any():
            row = int(bad.reshape(-1).nonzero()[0, 0])
            raise ValueError(f"labels must lie in [0, V) = [0, {vocab}) or equal ignore_index = {ignore_index} on "
                             f"every counted row, but row {row} holds {int(labels.reshape(-1)[row])}")
    soft_mask = counted if bad is None else counted & ~bad
    if teacher_logits is not None:
        if divergence == "jsd":
            soft = jsd_logits(student_logits, teacher_logits, beta=beta, temperature=temperature, reduction="none",
                              mask=soft_mask)
        else:
            soft = kl_div_logits(student_logits, teacher_logits, temperature=temperature, reduction="none",
                                 direction="reverse" if divergence == "reverse_kl" else "forward", mask=soft_mask)
    elif teacher_topk is not None:
        soft = sparse_kl_div(student_logits, *teacher_topk, temperature=temperature, tail=tail, reduction="none",
                             mask=soft_mask, validate=validate)
    else:
        soft = torch.zeros(leading, dtype=acc, device=student_logits.device)
    if hard is None:
        hard = torch.zeros_like(soft)
    if bad is not None:  # validate=False: such rows are NaN, soft and hard alike
        soft = torch.where(bad, float("nan"), soft)
        hard = torch.where(bad, float("nan"), hard)

    rows = torch.zeros_like(soft)
    if (teacher_logits is not None or teacher_topk is not None) and soft_weight != 0:
        rows = rows + soft_weight * soft
    if labels is not None and hard_weight != 0:
        rows = rows + hard_weight * hard

    def reduce(per_row):
        if reduction == "none":
            return per_row
        total = per_row.sum()
        if reduction == "sum":
            return total
        if num_items is not None:
            count = num_items.clamp_min(1).to(acc)
        elif counted is not None:
            count = counted.sum().clamp_min(1).to(acc)
        else:
            count = max(per_row.numel(), 1)
        return total / (count * vocab if reduction == "mean" else count)

    loss = reduce(rows)
    if return_parts:
        return LossParts(loss, reduce(soft).detach(), reduce(hard).detach())
    return loss


def linear_distillation_loss(student_hidden, student_weight, teacher_logits=None, *, teacher_hidden=None,
                             teacher_weight=None, teacher_topk=None, student_bias=None, teacher_bias=None,
                             chunk_rows=None, student_logit_scale=1.0, teacher_logit_scale=1.0, student_softcap=None,
                             teacher_softcap=None, labels=None, mask=None, **options):
    """kl_fused.linear_distillation_loss in plain PyTorch: the logits materialised in full (rows that do
    not count zeroed first, so that NaN there reaches neither logits nor gradients), then
    distillation_loss. chunk_rows is accepted for the fused function's signature and ignored."""
    from kl_fused.reference import _post_logits

    counted = _counted_rows(None, None, labels, options.get("ignore_index", -100), mask)
    if counted is not None:
        keep = counted.unsqueeze(-1)
        student_hidden = torch.where(keep, student_hidden, 0.0)
        teacher_hidden = torch.where(keep, teacher_hidden, 0.0) if teacher_hidden is not None else None
    student = _post_logits(F.linear(student_hidden, student_weight, student_bias), student_logit_scale, student_softcap)
    if teacher_hidden is not None:
        teacher_logits = _post_logits(F.linear(teacher_hidden, teacher_weight, teacher_bias), teacher_logit_scale,
                                      teacher_softcap)
    return distillation_loss(student, teacher_logits, teacher_topk=teacher_topk, labels=labels, mask=mask, **options)
