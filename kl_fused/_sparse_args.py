"""Argument checks of sparse_kl_div and topk_teacher (shared by the fused API and the reference), and
the one documented tolerance on a teacher support's mass.

Only what can be seen without reading the tensors is checked here (types, dtypes, shapes, devices,
options). What needs the values -- indices out of range, duplicates in a row's support, a support
mass above 1 -- is checked by the op itself (csrc/sparse_kl_common.h), where the kernel finds it
for free, and reported with one host synchronisation when ``validate=True``.
"""

import math

import torch

from kl_fused._validate import REDUCTIONS, SUPPORTED_DTYPES, check_mask, check_temperature

TAILS = ("bucket", "renormalize")
INDEX_DTYPES = (torch.int64, torch.int32)

# Unit roundoff of each dtype teacher log-probabilities may come in; float32 and float64 are given
# 2^-16 instead, for the log-sum-exp that produced them (a log-prob of a logit near 30 is exact only
# to ~2e-6 in float32).
_ROUNDOFF = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11, torch.float32: 2.0**-16, torch.float64: 2.0**-16}


def support_mass_tolerance(logprobs_dtype, slots):
    """How far sum(exp(teacher_logprobs)) over a row's support may exceed 1 and still count as rounding.

    Rounding each of K log-probabilities l_k to a relative error u moves p_k = exp(l_k) by at most
    p_k |l_k| u, so the support's mass by at most u * sum p_k |l_k| <= u * ln K (the entropy of K
    outcomes). The tolerance is u * (1 + ln K): about 0.02 for bfloat16 at K = 64, 1e-4 for float32.
    Above it the log-probabilities are not those of a distribution and sparse_kl_div raises."""
    return _ROUNDOFF[logprobs_dtype] * (1.0 + math.log(max(int(slots), 1)))


def _check_tensor(name, x):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")


def check_sparse_args(student_logits, teacher_indices, teacher_logprobs, temperature, tail, reduction, mask, validate):
    """Raise TypeError/ValueError naming the first problem with the arguments of sparse_kl_div."""
    for name, x in (("student_logits", student_logits), ("teacher_indices", teacher_indices),
                    ("teacher_logprobs", teacher_logprobs)):
        _check_tensor(name, x)
    for name, x in (("student_logits", student_logits), ("teacher_logprobs", teacher_logprobs)):
        if not x.is_floating_point() or x.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} must be float32, float64, float16 or bfloat16, got {x.dtype}")
    if student_logits.dim() == 0:
        raise ValueError("student_logits must have shape (..., V) with at least one dimension, got a 0-dim tensor")
    if student_logits.shape[-1] == 0:
        raise ValueError(f"the vocabulary (last) dimension must be non-empty, got shape {tuple(student_logits.shape)}")
    check_topk_slots(teacher_indices, teacher_logprobs, tuple(student_logits.shape[:-1]), student_logits.device,
                     "student_logits")
    check_temperature(temperature, student_logits.dtype)
    if tail not in TAILS:
        raise ValueError(f"tail must be one of {TAILS}, got {tail!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not isinstance(validate, bool):
        raise TypeError(f"validate must be a bool, got {type(validate).__name__}")
    check_mask(mask, tuple(student_logits.shape[:-1]), student_logits.device, "the logits")


def check_topk_slots(teacher_indices, teacher_logprobs, leading, device, of):
    """(..., K) token ids and log-probs of a sparse teacher for rows of the leading shape `leading` on
    `device` (`of` names the tensor whose rows they belong to)."""
    for name, x in (("teacher_indices", teacher_indices), ("teacher_logprobs", teacher_logprobs)):
        _check_tensor(name, x)
    if not teacher_logprobs.is_floating_point() or teacher_logprobs.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"teacher_logprobs must be float32, float64, float16 or bfloat16, got {teacher_logprobs.dtype}")
    if teacher_indices.dtype not in INDEX_DTYPES:
        raise TypeError(f"teacher_indices must be int64 or int32 token ids, got {teacher_indices.dtype}")
    for name, x in (("teacher_indices", teacher_indices), ("teacher_logprobs", teacher_logprobs)):
        if x.dim() != len(leading) + 1 or tuple(x.shape[:-1]) != tuple(leading):
            raise ValueError(f"{name} must have shape (..., K) with the leading shape {tuple(leading)} of {of}, "
                             f"got {tuple(x.shape)}")
    if teacher_indices.shape != teacher_logprobs.shape:
        raise ValueError(
            "teacher_indices and teacher_logprobs must have the same shape, got "
            f"{tuple(teacher_indices.shape)} and {tuple(teacher_logprobs.shape)}"
        )
    if teacher_indices.shape[-1] == 0:
        raise ValueError("the teacher support needs K >= 1 slots, got K = 0")
    for name, x in (("teacher_indices", teacher_indices), ("teacher_logprobs", teacher_logprobs)):
        if x.device != device:
            raise ValueError(f"{name} must be on the {of}' device {device}, got {x.device}")


def check_topk_args(teacher_logits, k, temperature):
    _check_tensor("teacher_logits", teacher_logits)
    if not teacher_logits.is_floating_point() or teacher_logits.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"teacher_logits must be float32, float64, float16 or bfloat16, got {teacher_logits.dtype}")
    if teacher_logits.dim() == 0 or teacher_logits.shape[-1] == 0:
        raise ValueError(f"teacher_logits must have shape (..., V) with V >= 1, got {tuple(teacher_logits.shape)}")
    if isinstance(k, bool) or not isinstance(k, int):
        raise TypeError(f"k must be a Python int, got {type(k).__name__}")
    vocab = teacher_logits.shape[-1]
    if not 1 <= k <= vocab:
        raise ValueError(f"k must be in [1, V] = [1, {vocab}], got {k}")
    if vocab > 2**31 - 1:
        raise ValueError(f"topk_teacher returns int32 indices, which cannot address V = {vocab}")
    check_temperature(temperature, teacher_logits.dtype)
