"""kl_fused.distillation_loss: the whole distillation step on logits -- the hard cross-entropy on labels
and a weighted soft divergence from the teacher, in the soft term's own passes -- and the torch.library
glue of its op (fake kernel, the shared autograd of _fused_loss.py)."""

from typing import NamedTuple

import torch
from torch import Tensor

from kl_fused import _ops
from kl_fused._distill_args import (check_labels, check_num_items, check_options, check_teacher_form,
                                    check_teacher_topk)
from kl_fused._distill_reference import distillation_loss as _reference
from kl_fused._fused_loss import fused_loss, register_fused_loss_autograd
from kl_fused._sparse_args import check_sparse_args, support_mass_tolerance
from kl_fused._teacher_topk import check_teacher_vocab
from kl_fused._validate import SUPPORTED_DTYPES, check_logits_pair, check_mask, check_temperature

OP_NAME = "kl_fused::distillation_loss"


class LossParts(NamedTuple):
    """What ``return_parts=True`` returns: the loss (differentiable) and its two unweighted terms, reduced
    alike and detached, for logging: ``loss = soft_weight * soft + hard_weight * hard``."""

    loss: Tensor
    soft: Tensor
    hard: Tensor


def distillation_loss(
    student_logits,
    teacher_logits=None,
    *,
    teacher_topk=None,
    labels=None,
    divergence="forward_kl",
    beta=0.5,
    tail="bucket",
    temperature=1.0,
    soft_weight=1.0,
    hard_weight=0.0,
    ignore_index=-100,
    label_smoothing=0.0,
    reduction="batchmean",
    mask=None,
    num_items_in_batch=None,
    return_parts=False,
    validate=True,
):
    r"""One distillation step's loss: ``soft_weight * D(teacher, student) + hard_weight * CE(student, labels)``
    per counted row, fused: the cross-entropy rides in the passes the soft term's kernel makes.

    Per counted row, with s the student's logits, y its label, eps = label_smoothing and q = softmax(s)
    at temperature 1: ``CE = (1 - eps)(-log q_y) + eps * mean_v(-log q_v)`` (``F.cross_entropy``'s
    label smoothing), and D the divergence of :func:`kl_div_logits` (``"forward_kl"``,
    ``"reverse_kl"``) or :func:`jsd_logits` (``"jsd"``, TRL's beta) on a dense teacher, or of
    :func:`sparse_kl_div` on a top-k teacher, at ``temperature`` (which softens the soft term only). No
    T**2 inside: ``soft_weight`` is where α·T² goes.

    Args:
        student_logits: ``(..., V)`` float32, bfloat16, float16 or float64; strided leading dims are read
            in place.
        teacher_logits: ``(..., V)`` logits of the same shape and dtype (a dense teacher); or
        teacher_topk: ``(indices, logprobs)``, each ``(..., K)``, a sparse teacher as
            :func:`sparse_kl_div` takes it (``divergence="forward_kl"`` only; ``tail`` as there); or
            neither: then the loss is the cross-entropy alone (a fused cross-entropy), which needs
            labels and ``hard_weight > 0``.
        labels: ``(...)`` int64 or int32 targets: row i's label is row i's target (shifting is the
            caller's). Rows whose label is ``ignore_index`` do not count, for either term.
        divergence, beta, tail, temperature: the soft term's, as in the functions above.
        soft_weight, hard_weight: finite weights >= 0.
        ignore_index, label_smoothing: as in ``F.cross_entropy``.
        reduction: ``"none"`` (one value per row), ``"sum"``, ``"batchmean"`` (sum / counted rows) or
            ``"mean"`` (sum / (counted rows * V)), over the counted rows.
        mask: optional bool tensor of the leading shape; counted rows are ``mask & (labels !=
            ignore_index)``. Rows that do not count are never read (they may hold NaN, and so may their
            labels and top-k slots) and get zero gradients.
        num_items_in_batch: batchmean divides by this instead of the counted rows (gradient accumulation
            as transformers' Trainer and TRL pass it): an int, or a 0-dim tensor (on the logits' device it
            is read there, with no host synchronisation). Only with ``reduction="batchmean"``.
        return_parts: return ``LossParts(loss, soft, hard)``, the terms unweighted and detached.
        validate: raise ValueError for a label outside [0, V) (other than ignore_index) on a counted row,
            and for a bad top-k support as :func:`sparse_kl_div` does. The kernels find these as they
            go; raising costs one host synchronisation on CUDA. ``validate=False`` skips it: such rows
            then get NaN losses and gradients, and nothing is read out of bounds.

    Returns:
        The loss (float32 for 16-bit logits, else their dtype), or ``LossParts`` with ``return_parts``.
        Gradients flow to the student logits and, when they require grad, the teacher's logits or top-k
        log-probs; the forward pass computes them with both weights folded in.
    """
    teacher_topk = _check_args(student_logits, teacher_logits, teacher_topk, labels, divergence, beta, tail, temperature,
                               soft_weight, hard_weight, ignore_index, label_smoothing, reduction, mask, validate)
    num_items = check_num_items(num_items_in_batch, reduction, student_logits.device)
    if not _ops.fused_path("distillation_loss", student_logits.device):
        return _reference(student_logits, teacher_logits, teacher_topk=teacher_topk, labels=labels,
                          divergence=divergence, beta=beta, tail=tail, temperature=temperature,
                          soft_weight=soft_weight, hard_weight=hard_weight, ignore_index=ignore_index,
                          label_smoothing=label_smoothing, reduction=reduction, mask=mask,
                          num_items_in_batch=num_items, return_parts=return_parts, validate=validate)
    indices, logprobs = teacher_topk if teacher_topk is not None else (None, None)
    grad_enabled = torch.is_grad_enabled()
    loss, parts = fused_loss(
        OP_NAME,
        student_logits,
        teacher_logits,
        indices,
        logprobs,
        labels,
        mask,
        num_items,
        divergence,
        float(beta),
        tail == "renormalize",
        float(temperature),
        float(soft_weight),
        float(hard_weight),
        int(ignore_index),
        float(label_smoothing),
        reduction,
        support_mass_tolerance(logprobs.dtype, indices.shape[-1]) if indices is not None else 0.0,
        validate,
        grad_enabled and student_logits.requires_grad,
        grad_enabled and teacher_logits is not None and teacher_logits.requires_grad,
        grad_enabled and logprobs is not None and logprobs.requires_grad,
        outputs=2,
    )
    return LossParts(loss, parts[0], parts[1]) if return_parts else loss


def _check_args(student_logits, teacher_logits, teacher_topk, labels, divergence, beta, tail, temperature, soft_weight,
                hard_weight, ignore_index, label_smoothing, reduction, mask, validate):
    """Raises TypeError/ValueError naming the first problem; returns teacher_topk as a tuple or None."""
    check_options(divergence, beta, tail, temperature, soft_weight, hard_weight, ignore_index, label_smoothing,
                  reduction, validate)
    given_topk, teacher_topk = teacher_topk, check_teacher_topk(teacher_topk)
    check_teacher_form(teacher_logits is not None, teacher_topk, divergence, labels, hard_weight)
    if teacher_logits is not None:
        check_logits_pair(student_logits, teacher_logits, mask)
    elif teacher_topk is not None:
        check_sparse_args(student_logits, *teacher_topk, temperature, tail, reduction, mask, validate)
        check_teacher_vocab(given_topk, student_logits.shape[-1])  # a TeacherTopK of another vocabulary
    else:
        if not isinstance(student_logits, torch.Tensor):
            raise TypeError(f"student_logits must be a torch.Tensor, got {type(student_logits).__name__}")
        if student_logits.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"student_logits must be float32, float64, float16 or bfloat16, got {student_logits.dtype}")
        if student_logits.dim() == 0 or student_logits.shape[-1] == 0:
            raise ValueError(f"student_logits must have shape (..., V) with V >= 1, got {tuple(student_logits.shape)}")
        check_mask(mask, tuple(student_logits.shape[:-1]), student_logits.device, "the logits")
    check_temperature(temperature, student_logits.dtype)  # 1/T a normal number of the accumulation type
    check_labels(labels, student_logits.shape[:-1], student_logits.device)
    return teacher_topk


if _ops._C is not None:

    @torch.library.register_fake(OP_NAME)
    def _distillation_loss_fake(student, teacher, indices, logprobs, labels, mask, num_items, divergence, beta,
                                renormalize, temperature, soft_weight, hard_weight, ignore_index, label_smoothing,
                                reduction, mass_tolerance, validate, student_grad, teacher_grad, logprobs_grad):
        torch._check(student.dim() >= 1, lambda: "student_logits must have at least one dimension")
        acc = torch.float64 if student.dtype == torch.float64 else torch.float32
        leading = student.shape[:-1] if reduction == "none" else ()
        loss = student.new_empty(leading, dtype=acc)
        parts = student.new_empty((2, *leading), dtype=acc)
        grad_student = student.new_empty(student.shape if student_grad else (0,))
        grad_teacher = (teacher.new_empty(teacher.shape if teacher_grad else (0,)) if teacher is not None
                        else student.new_empty((0,)))
        grad_logprobs = (logprobs.new_empty(logprobs.shape if logprobs_grad else (0,)) if logprobs is not None
                         else student.new_empty((0,)))
        return loss, grad_student, grad_teacher, grad_logprobs, parts

    # distillation_loss(student 0, teacher 1, indices 2, logprobs 3, ..., student_grad 18, teacher_grad 19,
    #                   logprobs_grad 20) -> (loss, grad_student, grad_teacher, grad_logprobs, parts)
    register_fused_loss_autograd(OP_NAME, grad_inputs=(0, 1, 3), grad_flags=(18, 19, 20), extra_outputs=1)
