"""kl_fused.jsd_logits, the generalized Jensen-Shannon divergence of on-policy distillation (GKD),
and the torch.library glue of its op: the fake kernel and the shared autograd of _fused_loss.py.

torch.ops.kl_fused.jsd_logits(student, teacher, mask, beta, temperature, reduction, student_grad,
teacher_grad) -> (loss, grad_student, grad_teacher) computes the reduced loss and, when asked, its
gradients at upstream gradient 1 in the same pass (schema in csrc/op_schemas.h). Every beta in
[0, 1] is accepted; at 0 and 1 the op runs kl_div_logits' kernels (forward and reverse KL).
"""

import torch

from kl_fused import _ops, reference
from kl_fused._fused_loss import fused_loss, register_fused_loss_autograd
from kl_fused._validate import check_jsd_args

OP_NAME = "kl_fused::jsd_logits"


def jsd_logits(student_logits, teacher_logits, *, beta=0.5, temperature=1.0, reduction="batchmean", mask=None):
    r"""Generalized Jensen-Shannon divergence between the teacher's and the student's softmax, fused.

    Per row, with p = softmax(teacher / T), q = softmax(student / T) and m = beta p + (1 - beta) q:
    ``beta * KL(p || m) + (1 - beta) * KL(q || m)`` for 0 < beta < 1; ``beta = 0`` gives
    KL(p || q) (forward KL, the usual distillation loss) and ``beta = 1`` KL(q || p) (reverse KL)
    exactly, as TRL's GKDTrainer.generalized_jsd_loss defines them.

    Args:
        student_logits, teacher_logits: tensors of the same shape ``(..., V)``, same dtype
            (float32, bfloat16, float16, or float64) and device; any leading shape, strided leading
            dims read in place.
        beta: a number in [0, 1], the teacher's weight in the mixture m.
        temperature: finite ``T > 0``; no ``T**2`` factor is applied.
        reduction: ``"none"`` (one value per row, of the leading shape), ``"sum"``, ``"batchmean"``
            (sum / counted rows, i.e. per token) or ``"mean"`` (sum / (counted rows * V)).
        mask: optional bool tensor of the leading shape; rows where it is False contribute nothing,
            get zero gradient and are never read (padding may hold NaN). TRL's labels == -100 are
            mask == False.

    Returns:
        The loss: float32 for 16-bit inputs, else the input dtype. Gradients flow to the student and,
        when it requires grad, to the teacher; they are computed by the forward pass itself.
    """
    check_jsd_args(student_logits, teacher_logits, beta, temperature, reduction, mask)
    if not _ops.fused_path("jsd_logits", student_logits.device):
        return reference.jsd_logits(
            student_logits, teacher_logits, beta=beta, temperature=temperature, reduction=reduction, mask=mask
        )
    grad_enabled = torch.is_grad_enabled()
    return fused_loss(
        OP_NAME,
        student_logits,
        teacher_logits,
        mask,
        float(beta),
        float(temperature),
        reduction,
        grad_enabled and student_logits.requires_grad,
        grad_enabled and teacher_logits.requires_grad,
    )


if _ops._C is not None:

    @torch.library.register_fake(OP_NAME)
    def _jsd_logits_fake(student, teacher, mask, beta, temperature, reduction, student_grad, teacher_grad):
        # Same outputs as kl_div_logits: the loss in the accumulation type, gradients like the inputs.
        return _ops.row_loss_fake(student, teacher, reduction, student_grad, teacher_grad)

    # jsd_logits(student, teacher, mask, beta, temperature, reduction, student_grad, teacher_grad)
    register_fused_loss_autograd(OP_NAME, grad_inputs=(0, 1), grad_flags=(6, 7), public_name=lambda args: "jsd_logits")
