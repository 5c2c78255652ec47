"""kl_fused.kl_div_logits: the public function."""

import torch

from kl_fused import reference
from kl_fused._fused_loss import fused_loss
from kl_fused._ops import OP_NAME, fused_path
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
    r"""KL divergence between the softmaxes of teacher and student logits, fused in one pass.

    Args:
        student_logits, teacher_logits: tensors of the same shape ``(..., V)``, same dtype
            (float32, bfloat16, float16, or float64) and device. Softmax runs over the last dim of
            ``logits / temperature``. Any leading shape; non-contiguous leading dims (a shifted
            view ``logits[:, :-1]``) are read in place.
        temperature: finite ``T > 0``. No ``T**2`` factor is applied (multiply by it yourself
            for Hinton-style distillation).
        reduction: ``"none"`` gives one KL per row, of the leading shape (``F.kl_div``'s
            ``"none"`` is per element instead); ``"sum"``; ``"batchmean"`` divides the sum by the
            number of counted rows (tokens), not by ``size(0)`` as ``F.kl_div`` does for 3-D input;
            ``"mean"`` divides by counted rows times V. With no counted rows the loss is 0.
        direction: ``"forward"`` is KL(teacher || student), ``"reverse"`` KL(student || teacher).
        mask: optional bool tensor of the leading shape; rows where it is False contribute nothing,
            get zero gradient, and are never read (padding may hold NaN).

    Returns:
        The loss: float32 for 16-bit inputs, else the input dtype. Gradients flow to the student and,
        when it requires grad, to the teacher; they are computed by the forward pass itself.
    """
    check_kl_args(student_logits, teacher_logits, temperature, reduction, direction, mask)
    if not fused_path("kl_div_logits", student_logits.device):
        return reference.kl_div_logits(
            student_logits,
            teacher_logits,
            temperature=temperature,
            reduction=reduction,
            direction=direction,
            mask=mask,
        )
    grad_enabled = torch.is_grad_enabled()
    return fused_loss(
        OP_NAME,
        student_logits,
        teacher_logits,
        mask,
        float(temperature),
        direction == "reverse",
        reduction,
        grad_enabled and student_logits.requires_grad,
        grad_enabled and teacher_logits.requires_grad,
    )
