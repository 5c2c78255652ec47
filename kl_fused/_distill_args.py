"""Argument checks of the distillation step (kl_fused.distillation_loss, linear_distillation_loss and
their modules), shared by the fused API and the reference: one message per problem.

What needs the values -- a label outside [0, V) on a counted row, a bad top-k support -- is found by
the kernels as they go and reported with one host synchronisation when ``validate=True``."""

import math

import torch

from kl_fused._sparse_args import INDEX_DTYPES, TAILS
from kl_fused._validate import check_beta, check_reduction, check_temperature

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")


def _check_number(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a Python number, got {type(value).__name__}")


def check_weight(name, value):
    _check_number(name, value)
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be finite and >= 0, got {value}")


def check_options(divergence, beta, tail, temperature, soft_weight, hard_weight, ignore_index, label_smoothing,
                  reduction, validate):
    """The options that do not depend on the tensors."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    check_beta(beta)
    if tail not in TAILS:
        raise ValueError(f"tail must be one of {TAILS}, got {tail!r}")
    check_temperature(temperature)
    check_weight("soft_weight", soft_weight)
    check_weight("hard_weight", hard_weight)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be a Python int, got {type(ignore_index).__name__}")
    _check_number("label_smoothing", label_smoothing)
    if not 0 <= label_smoothing <= 1:  # NaN fails too
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    check_reduction(reduction)
    if not isinstance(validate, bool):
        raise TypeError(f"validate must be a bool, got {type(validate).__name__}")


def check_teacher_topk(teacher_topk):
    """(indices, logprobs) of a sparse teacher, or None."""
    if teacher_topk is None:
        return None
    if not isinstance(teacher_topk, (tuple, list)) or len(teacher_topk) != 2:
        raise TypeError("teacher_topk must be a pair (indices, logprobs) of tensors, as kl_fused.topk_teacher returns")
    return tuple(teacher_topk)


def check_teacher_form(has_dense, teacher_topk, divergence, labels, hard_weight):
    """The teacher given at most one way, the divergence the form supports, and something to compute."""
    if has_dense and teacher_topk is not None:
        raise ValueError("give the teacher either as teacher_logits (or its hidden states) or as teacher_topk, not both")
    if teacher_topk is not None and divergence != "forward_kl":
        raise ValueError(f"teacher_topk supports divergence='forward_kl' only, got {divergence!r}")
    if hard_weight > 0 and labels is None:
        raise ValueError(f"hard_weight = {hard_weight} > 0 needs labels for the cross-entropy term")
    if not has_dense and teacher_topk is None and (labels is None or hard_weight == 0):
        raise ValueError("nothing to compute: without a teacher the loss is the cross-entropy term, which needs "
                         "labels and hard_weight > 0")


def check_labels(labels, leading, device):
    if labels is None:
        return
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"labels must be a torch.Tensor or None, got {type(labels).__name__}")
    if labels.dtype not in INDEX_DTYPES:
        raise TypeError(f"labels must be int64 or int32 class indices, got {labels.dtype}")
    if tuple(labels.shape) != tuple(leading):
        raise ValueError(f"labels must have the leading shape {tuple(leading)} of the logits (row i's label is row "
                         f"i's target; shifting is the caller's), got {tuple(labels.shape)}")
    if labels.device != device:
        raise ValueError(f"labels must be on the logits' device {device}, got {labels.device}")


def check_num_items(num_items_in_batch, reduction, device):
    """None, an int >= 0, or a 0-dim tensor (on the logits' device, or the CPU). Returns what the op
    takes: None, or a 0-dim tensor on `device` (no host synchronisation: a device tensor stays there)."""
    if num_items_in_batch is None:
        return None
    if reduction != "batchmean":
        raise ValueError(f"num_items_in_batch replaces the count of batchmean; it needs reduction='batchmean', "
                         f"got {reduction!r}")
    if isinstance(num_items_in_batch, torch.Tensor):
        if num_items_in_batch.dim() != 0:
            raise ValueError(f"num_items_in_batch must be a 0-dim tensor or an int, got shape "
                             f"{tuple(num_items_in_batch.shape)}")
        if num_items_in_batch.dtype == torch.bool or num_items_in_batch.is_complex():
            raise TypeError(f"num_items_in_batch must hold a count, got dtype {num_items_in_batch.dtype}")
        if num_items_in_batch.device == device:
            return num_items_in_batch
        if num_items_in_batch.device.type != "cpu":
            raise ValueError(f"num_items_in_batch must be on the logits' device {device} or the CPU, got "
                             f"{num_items_in_batch.device}")
        num_items_in_batch = num_items_in_batch.item()  # a CPU tensor: no device synchronisation
        if isinstance(num_items_in_batch, float):
            if not (math.isfinite(num_items_in_batch) and num_items_in_batch == int(num_items_in_batch)):
                raise ValueError(f"num_items_in_batch must be a whole count, got {num_items_in_batch}")
            num_items_in_batch = int(num_items_in_batch)
    if isinstance(num_items_in_batch, bool) or not isinstance(num_items_in_batch, int):
        raise TypeError(f"num_items_in_batch must be an int, a 0-dim tensor or None, got "
                        f"{type(num_items_in_batch).__name__}")
    if num_items_in_batch < 0:
        raise ValueError(f"num_items_in_batch must be >= 0, got {num_items_in_batch}")
    return torch.full((), num_items_in_batch, dtype=torch.long, device=device)
