"""Argument checks shared by the fused API, the reference and the modules: one message per problem.

Every loss on a pair of logits checks the pair and its mask the same way (check_logits_pair), and
its options with the checks below; each loss adds only its own options (direction, beta)."""

import math

import torch

REDUCTIONS = ("none", "sum", "batchmean", "mean")
DIRECTIONS = ("forward", "reverse")
SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def check_logits_pair(student_logits, teacher_logits, mask):
    """Raise TypeError/ValueError naming the first problem with (..., V) logits and their mask."""
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
    check_mask(mask, tuple(student_logits.shape[:-1]), student_logits.device, "the logits")


def check_mask(mask, leading, device, of):
    """A row mask: None, or a bool tensor of the leading shape `leading` on `device` (`of` names the
    tensor whose rows it selects, for the message)."""
    if mask is None:
        return
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"mask must be a bool torch.Tensor or None, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must be a bool tensor, got {mask.dtype}")
    if tuple(mask.shape) != tuple(leading):
        raise ValueError(f"mask must have the leading shape {tuple(leading)} of {of}, got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"mask must be on the device of {of}, {device}, got {mask.device}")


def _check_number(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a Python number, got {type(value).__name__}")


def check_temperature(temperature, dtype=None):
    """A finite T > 0; for logits of `dtype` also one whose reciprocal is a normal number of the
    accumulation type (the kernels scale shifted logits by 1/T): 2.9e-39 <= T <= 8.5e37 for float32 and
    16-bit logits, 5.6e-309 <= T <= 4.5e307 for float64."""
    _check_number("temperature", temperature)
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")
    if dtype is not None:
        acc = torch.float64 if dtype == torch.float64 else torch.float32
        info = torch.finfo(acc)
        if not info.tiny <= 1.0 / temperature <= info.max:
            name = str(acc).replace("torch.", "")
            raise ValueError(
                f"temperature {temperature} is out of range for {str(dtype).replace('torch.', '')} logits: 1/T must "
                f"be a normal {name} number, so {1.0 / info.max:.3g} <= T <= {1.0 / info.tiny:.3g}")


def check_reduction(reduction):
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def check_direction(direction):
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")


def check_beta(beta):
    """beta of the generalized JSD: a number in [0, 1] (0 is KL(teacher || student), 1 the reverse)."""
    _check_number("beta", beta)
    if not 0 <= beta <= 1:  # NaN fails too
        raise ValueError(f"beta must be in [0, 1], got {beta}")


def check_kl_args(student_logits, teacher_logits, temperature, reduction, direction, mask):
    """Raise TypeError/ValueError naming the first problem with the arguments of kl_div_logits."""
    check_logits_pair(student_logits, teacher_logits, mask)
    check_temperature(temperature, student_logits.dtype)
    check_reduction(reduction)
    check_direction(direction)


def check_jsd_args(student_logits, teacher_logits, beta, temperature, reduction, mask):
    """Raise TypeError/ValueError naming the first problem with the arguments of jsd_logits."""
    check_logits_pair(student_logits, teacher_logits, mask)
    check_beta(beta)
    check_temperature(temperature, student_logits.dtype)
    check_reduction(reduction)
