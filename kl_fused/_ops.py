"""The torch.library glue of the compiled ops: fake (shape) kernels, autograd, which devices have a
compiled kernel, and whether a call will run it.

torch.ops.kl_fused.kl_div_logits computes the loss and, when asked, the gradients of that loss
(at upstream gradient 1) in the same pass; its autograd is the shared one of _fused_loss.py.
"""

import torch

from kl_fused import _cuda_archs
from kl_fused._fused_loss import register_fused_loss_autograd
from kl_fused._warn_once import warn_once

try:
    from kl_fused import _C  # noqa: F401  (loading the library registers torch.ops.kl_fused)

    IMPORT_ERROR = None
except ImportError as error:  # an install without the compiled extension
    _C = None
    IMPORT_ERROR = error

OP_NAME = "kl_fused::kl_div_logits"
SHARD_OP_NAMES = ("kl_fused::kl_row_states", "kl_fused::kl_grad_from_stats")

# Each public loss and the compiled ops it needs. A public function runs fused on a device only
# where every one of its ops has a kernel there; elsewhere it runs its pure-PyTorch reference and
# says so once (fused_path). A new op family adds one line here.
PUBLIC_OPS = {
    "kl_div_logits": (OP_NAME, "kl_fused::grad_scale_"),
    "linear_kl_div": (OP_NAME, "kl_fused::grad_scale_"),  # the chunk loop (plain PyTorch) runs this op
    "linear_jsd": ("kl_fused::jsd_logits", "kl_fused::grad_scale_"),  # ... and this one
    "jsd_logits": ("kl_fused::jsd_logits", "kl_fused::grad_scale_"),
    "sparse_kl_div": ("kl_fused::sparse_kl_div", "kl_fused::grad_scale_"),
    "distillation_loss": ("kl_fused::distillation_loss", "kl_fused::grad_scale_"),
    "linear_distillation_loss": ("kl_fused::distillation_loss", "kl_fused::grad_scale_"),  # in the chunk loop
}


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


_DEVICE_TYPES = {public: compiled_device_types(ops) for public, ops in PUBLIC_OPS.items()}
FUSED_DEVICE_TYPES = _DEVICE_TYPES["kl_div_logits"]
SHARD_DEVICE_TYPES = compiled_device_types(SHARD_OP_NAMES)
# The GPU code of the CUDA kernels ("sm_80", ..., "compute_120"; _cuda_archs.py), None where not recorded.
BUILT_CUDA_ARCHS = _cuda_archs.parse(getattr(_C, "cuda_archs", None))


def _device_types(op):
    if op not in _DEVICE_TYPES:
        raise ValueError(f"unknown kl_fused op {op!r}; choose from {sorted(_DEVICE_TYPES)}")
    return _DEVICE_TYPES[op]


def is_fused_available(device, op="kl_div_logits") -> bool:
    """True where this build of kl_fused._C has compiled kernels for `op` (a public function's name) on
    `device`'s type (a str or torch.device): what was built, not whether this machine can run it
    ("cuda" is True for a CUDA build on a machine without a GPU). Whether a call on a given tensor or
    device will run the kernel: :func:`will_run_fused`."""
    return torch.device(device).type in _device_types(op)


def _reason(device, op, device_types):
    """Why calls on `device` do not run the compiled kernels of `device_types`, or None where they do."""
    device = torch.device(device)
    if device.type == "meta":
        return "meta tensors hold no values: the ops' fake kernels give the outputs' shapes, and no kernel runs"
    if device.type not in device_types:
        if _C is None:
            return f"the compiled extension kl_fused._C failed to import ({IMPORT_ERROR})"
        return f"kl_fused._C was built without {device.type} kernels for {op}"
    if device.type == "cuda":
        return _cuda_archs.device_reason(device, BUILT_CUDA_ARCHS)
    return None


def fused_unavailable_reason(device, op="kl_div_logits"):
    """Why a call of `op` on `device` (a str, torch.device or tensor) does not run a compiled kernel
    (no kernel built for its type, no such CUDA device here, or no kernel image for its GPU's
    architecture), or None where it does."""
    device = device.device if isinstance(device, torch.Tensor) else device
    return _reason(device, op, _device_types(op))


def will_run_fused(tensor_or_device, op="kl_div_logits") -> bool:
    """True when calling `op` (a public function's name) on tensors on `tensor_or_device` (a tensor, a
    str such as "cuda:1", or a torch.device) runs kl_fused's compiled kernels: they were built for the
    device's type and, for CUDA, the device exists here and the build has a kernel image for its
    architecture. Elsewhere the call runs the pure-PyTorch reference (and warns once, naming
    :func:`fused_unavailable_reason`); meta tensors only propagate shapes."""
    return fused_unavailable_reason(tensor_or_device, op) is None


def shard_kernels_reason(device):
    """Why the vocab-parallel shard kernels do not run on `device`, or None where they do."""
    return _reason(device, "the vocab-parallel shard ops", SHARD_DEVICE_TYPES)


def fused_path(op, device):
    """True when `op` runs its compiled ops on `device`; otherwise warns once per (op, device
    type) that the pure-PyTorch reference runs instead, naming the reason, and returns False.
    Meta tensors take the ops too: their fake kernels give the outputs' shapes, and nothing runs."""
    device = torch.device(device)
    if device.type == "meta" and _C is not None:
        return True
    reason = _reason(device, op, _device_types(op))
    if reason is None:
        return True
    warn_once(
        (op, device.type),
        f"kl_fused: no fused kernel for {op} on device '{device}' ({reason}); "
        "using the pure-PyTorch reference, which is slower and uses more memory",
        stacklevel=4,
    )
    return False


def row_loss_fake(student, teacher, reduction, student_grad, teacher_grad):
    """The outputs of a row-loss op (kl_div_logits, jsd_logits) as a fake kernel gives them: the loss
    in the accumulation type (per row for "none"), each gradient like its input or empty."""
    torch._check(student.shape == teacher.shape, lambda: "student and teacher shapes differ")
    torch._check(student.dim() >= 1, lambda: "logits must have at least one dimension")
    acc = torch.float64 if student.dtype == torch.float64 else torch.float32
    loss_shape = student.shape[:-1] if reduction == "none" else ()
    loss = student.new_empty(loss_shape, dtype=acc)
    grad_student = student.new_empty(student.shape if student_grad else (0,))
    grad_teacher = teacher.new_empty(teacher.shape if teacher_grad else (0,))
    return loss, grad_student, grad_teacher


if _C is not None:

    @torch.library.register_fake(OP_NAME)
    def _kl_div_logits_fake(student, teacher, mask, temperature, reverse, reduction, student_grad, teacher_grad):
        return row_loss_fake(student, teacher, reduction, student_grad, teacher_grad)

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
    register_fused_loss_autograd(OP_NAME, grad_inputs=(0, 1), grad_flags=(6, 7), public_name=lambda args: "kl_div_logits")
