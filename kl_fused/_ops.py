"""The torch.library glue of the compiled ops: fake (shape) kernels, autograd, and which devices
have a compiled kernel.

torch.ops.kl_fused.kl_div_logits computes the loss and, when asked, the gradients of that loss
(at upstream gradient 1) in the same pass. Backward then only scales those saved gradients by the
upstream gradient, in place, with no host synchronisation (the kernel reads the factor on the
device and skips rows whose factor is 1). A second backward through a retained graph finds the
buffers already handed out and recomputes them from the saved logits.
"""

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch._subclasses.functional_tensor import FunctionalTensor

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

    def _scale(grad, upstream):
        """grad * upstream per row. In eager the buffer is ours alone, so it is scaled in place (and
        rows whose factor is 1 are skipped on the device). A traced graph (torch.compile, export,
        opcheck) is functional anyway: there the same arithmetic runs out of place, so that the
        graph never mutates a tensor its forward returned."""
        if isinstance(grad, (FakeTensor, FunctionalTensor)) or torch.compiler.is_compiling():
            acc = torch.float64 if grad.dtype == torch.float64 else torch.float32
            factors = upstream.to(acc).reshape(upstream.shape + (1,) * (grad.dim() - upstream.dim()))
            return (grad.to(acc) * factors).to(grad.dtype)
        torch.ops.kl_fused.grad_scale_(grad, upstream)
        return grad

    def _setup_context(ctx, inputs, output):
        student, teacher, mask, temperature, reverse, reduction, student_grad, teacher_grad = inputs
        _, grad_student, grad_teacher = output
        ctx.mark_non_differentiable(grad_student, grad_teacher)
        # Otherwise autograd hands backward two (rows x V) zero tensors for those outputs.
        ctx.set_materialize_grads(False)
        # Kept as attributes, not saved tensors: the first backward takes them over and scales
        # them in place, which a saved tensor's version counter would forbid.
        ctx.fresh_grads = (grad_student if student_grad else None, grad_teacher if teacher_grad else None)
        ctx.save_for_backward(student, teacher, mask)
        ctx.options = (temperature, reverse, reduction)

    def _backward(ctx, grad_loss, _grad_of_grad_student, _grad_of_grad_teacher):
        if torch.is_grad_enabled():  # backward runs with grad mode on only under create_graph=True
            raise RuntimeError(
                "kl_fused.kl_div_logits supports first-order gradients only (backward with create_graph=True "
                "asks for second-order ones); use kl_fused.reference.kl_div_logits for those"
            )
        need_student, need_teacher = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grads, ctx.fresh_grads = ctx.fresh_grads, None
        if grad_loss is None:  # the loss did not reach the backward's root
            return None, None, None, None, None, None, None, None
        if grads is None or (need_student and grads[0] is None) or (need_teacher and grads[1] is None):
            # A second backward through a retained graph, or a gradient forward did not compute.
            student, teacher, mask = ctx.saved_tensors
            temperature, reverse, reduction = ctx.options
            _, grad_student, grad_teacher = torch.ops.kl_fused.kl_div_logits(
                student, teacher, mask, temperature, reverse, reduction, need_student, need_teacher
            )
            grads = (grad_student, grad_teacher)
        grad_student = _scale(grads[0], grad_loss) if need_student else None
        grad_teacher = _scale(grads[1], grad_loss) if need_teacher else None
        return grad_student, grad_teacher, None, None, None, None, None, None

    torch.library.register_autograd(OP_NAME, _backward, setup_context=_setup_context)
