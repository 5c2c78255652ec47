"""The torch.library glue of the compiled ops: fake (shape) kernels, autograd, and which devices
have a compiled kernel.

torch.ops.kl_fused.kl_div_logits computes the loss and, when asked, the gradients of that loss
(at upstream gradient 1) in the same pass; its autograd is the shared one of _fused_loss.py.
"""

import torch

from kl_fused._fused_loss import register_fused_loss_autograd

try:
    from kl_fused import _C  # noqa: F401  (loading the library registers torch.ops.kl_fused)

    IMPORT_ERROR = None
except ImportError as error:  # an install without the compiled extension
    _C = None
    IMPORT_ERROR = error

OP_NAME = "kl_fused::kl_div_logits"
SHARD_OP_NAMES = ("kl_fused::kl_row_states", "kl_fused::kl_grad_from_stats")


def compiled_device_types(op_names):
    """The device types on which every op in op_names has a compiled kernel (read once, at import)."""
    if _C is None:
        return frozenset()
    keys = {"cpu": "CPU", "cuda": "CUDA"}
    return frozenset(
        device
        for device, key in keys.items()
        if all(torch._C._dispatch_has_kernel_for_dispatch_key(name, key) for name in op_names)
    )


FUSED_DEVICE_TYPES = compiled_device_types((OP_NAME,))
SHARD_DEVICE_TYPES = compiled_device_types(SHARD_OP_NAMES)


def is_fused_available(device) -> bool:
    """True where the compiled kernel serves tensors on `device` (a str or torch.device)."""
    return torch.device(device).type in FUSED_DEVICE_TYPES


def fused_unavailable_reason(device):
    """Why `device` runs the reference instead of a compiled kernel, or None where it does not."""
    device_type = torch.device(device).type
    if device_type in FUSED_DEVICE_TYPES:
        return None
    if _C is None:
        return f"the compiled extension kl_fused._C failed to import ({IMPORT_ERROR})"
    return f"kl_fused._C was built without {device_type} kernels"


if _C is not None:

    @torch.library.register_fake(OP_NAME)
    def _kl_div_logits_fake(student, teacher, mask, temperature, reverse, reduction, student_grad, teacher_grad):
        torch._check(student.shape == teacher.shape, lambda: "student and teacher shapes differ")
        torch._check(student.dim() >= 1, lambda: "logits must have at least one dimension")
        acc = torch.float64 if student.dtype == torch.float64 else torch.float32
        loss_shape = student.shape[:-1] if reduction == "none" else ()
        loss = student.new_empty(loss_shape, dtype=acc)
        grad_student = student.new_empty(student.shape if student_grad else (0,))
        grad_teacher = teacher.new_empty(teacher.shape if teacher_grad else (0,))
        return loss, grad_student, grad_teacher

    @torch.library.register_fake("kl_fused::grad_scale_")
    def _grad_scale_fake(grad, upstream):
        return None

    @torch.library.register_fake("kl_fused::kl_row_states")
    def _kl_row_states_fake(student, teacher, mask, temperature, reverse):
        torch._check(student.shape == teacher.shape, lambda: "student and teacher shapes differ")
        acc = torch.float64 if student.dtype == torch.float64 else torch.float32
        rows = student.numel() // student.shape[-1]
        return student.new_empty((rows, 5), dtype=acc)

    @torch.library.register_fake("kl_fused::kl_grad_from_stats")
    def _kl_grad_from_stats_fake(student, teacher, mask, stats, row_factor, temperature, reverse, student_grad, teacher_grad):
        torch._check(student.shape == teacher.shape, lambda: "student and teacher shapes differ")
        grad_student = student.new_empty(student.shape if student_grad else (0,))
        grad_teacher = teacher.new_empty(teacher.shape if teacher_grad else (0,))
        return grad_student, grad_teacher

    # kl_div_logits(student, teacher, mask, temperature, reverse, reduction, student_grad, teacher_grad)
    register_fused_loss_autograd(OP_NAME, grad_inputs=(0, 1), grad_flags=(6, 7))
