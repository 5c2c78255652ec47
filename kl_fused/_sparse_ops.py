"""The torch.library glue of torch.ops.kl_fused.sparse_kl_div: its fake (shape) kernel and its autograd,
the shared one of _fused_loss.py (the op returns the loss and the gradients at upstream 1 that the
same launch computed)."""

import torch

from kl_fused._fused_loss import register_fused_loss_autograd
from kl_fused._ops import _C

OP_NAME = "kl_fused::sparse_kl_div"

if _C is not None:

    @torch.library.register_fake(OP_NAME)
    def _sparse_kl_div_fake(student, teacher_indices, teacher_logprobs, mask, temperature, renormalize, reduction,
                            mass_tolerance, validate, student_grad, logprobs_grad):
        torch._check(student.dim() >= 1, lambda: "student_logits must have at least one dimension")
        torch._check(teacher_indices.shape == teacher_logprobs.shape,
                     lambda: "teacher_indices and teacher_logprobs shapes differ")
        torch._check(teacher_indices.shape[:-1] == student.shape[:-1],
                     lambda: "teacher slots and student logits have different leading shapes")
        acc = torch.float64 if student.dtype == torch.float64 else torch.float32
        loss_shape = student.shape[:-1] if reduction == "none" else ()
        loss = student.new_empty(loss_shape, dtype=acc)
        grad_student = student.new_empty(student.shape if student_grad else (0,))
        grad_logprobs = teacher_logprobs.new_empty(teacher_logprobs.shape if logprobs_grad else (0,))
        return loss, grad_student, grad_logprobs

    # sparse_kl_div(student, teacher_indices, teacher_logprobs, mask, temperature, renormalize, reduction,
    #               mass_tolerance, validate, student_grad, logprobs_grad)
    register_fused_loss_autograd(OP_NAME, grad_inputs=(0, 2), grad_flags=(9, 10), public_name=lambda args: "sparse_kl_div")
