"""Argument checks shared by the fused API and the reference: one message per problem."""

import math

import torch

REDUCTIONS = ("none", "sum", "batchmean", "mean")
DIRECTIONS = ("forward", "reverse")
SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def check_kl_args(student_logits, teacher_logits, temperature, reduction, direction, mask):
    """Raise TypeError/ValueError naming the first problem with the arguments of kl_div_logits."""
    for name, x in (("student_logits", student_logits), ("teacher_logits", teacher_logits)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got {x.dtype}")
        if x.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} must be float32, float64, float16 or bfloat16, got {x.dtype}")
    if student_logits.dtype != teacher_logits.dtype:
        raise TypeError(
            "student_logits and teacher_logits must have the same dtype, got "
            f"{student_logits.dtype} and {teacher_logits.dtype} (cast one of them)"
        )
    if student_logits.device != teacher_logits.device:
        raise ValueError(
            "student_logits and teacher_logits must be on the same device, got "
            f"{student_logits.device} and {teacher_logits.device}"
        )
    if student_logits.dim() == 0:
        raise ValueError("logits must have shape (..., V) with at least one dimension, got a 0-dim tensor")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            "student_logits and teacher_logits must have the same shape, got "
            f"{tuple(student_logits.shape)} and {tuple(teacher_logits.shape)}"
        )
    if student_logits.shape[-1] == 0:
        raise ValueError(f"the vocabulary (last) dimension must be non-empty, got shape {tuple(student_logits.shape)}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a Python number, got {type(temperature).__name__}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    check_mask(mask, student_logits)


def check_mask(mask, logits):
    """A row mask: None, or a bool tensor of the leading shape of (..., V) `logits`, on their device."""
    if mask is not None:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a bool torch.Tensor or None, got {type(mask).__name__}")
        if mask.dtype != torch.bool:
            raise TypeError(f"mask must be a bool tensor, got {mask.dtype}")
        leading = tuple(logits.shape[:-1])
        if tuple(mask.shape) != leading:
            raise ValueError(f"mask must have the leading shape {leading} of the logits, got {tuple(mask.shape)}")
        if mask.device != logits.device:
            raise ValueError(f"mask must be on the logits' device {logits.device}, got {mask.device}")
