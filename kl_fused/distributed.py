"""Vocab-parallel KL over torch.distributed: one loss when the vocabulary is split across ranks.

Under tensor parallelism the output layer is split along the vocabulary, and rank r holds
``logits[..., v_start(r):v_end(r)]`` of the same rows. No rank has a whole row, so no full-row
loss applies. :func:`kl_div_logits_vocab_parallel` computes the KL of the full rows anyway, from
the shards, with the fused kernels split at the seam of the online-softmax merge (the math is in
``kl_fused/_shard_math.py``).

The distillation step on shards: :func:`distillation_loss_vocab_parallel` (from logits shards) and
:func:`linear_distillation_loss_vocab_parallel` (from the hidden states and this rank's rows of the output
layer, Megatron's column-parallel ``lm_head``) take the arguments of ``kl_fused.distillation_loss`` and
``kl_fused.linear_distillation_loss`` (``student_weight_shard``, ``teacher_logits_shard``,
``teacher_weight_shard``, the bias shards) plus ``group`` and, for the linear form, ``hidden_grad``:
``"all_reduce"`` (the hidden states' complete gradient, all-reduced in backward) or ``"local"`` (this rank's
partial sum, for a layer whose backward reduces it). Labels and top-k ids are global token ids. Every rank
returns the loss of the full vocabulary and gets its shards' gradients; the collectives move O(rows) values
per chunk (kl_fused/_shard_distill.py says which).

Data-parallel training on top (each data-parallel rank has different rows): a masked
``batchmean`` must divide by the number of counted rows of the whole global batch, not of the
local one. Take ``reduction="sum"`` and divide by the global count::

    import torch.distributed as dist
    import kl_fused
    from kl_fused.distributed import kl_div_logits_vocab_parallel

    loss_sum = kl_div_logits_vocab_parallel(student_shard, teacher_shard, mask=mask,
                                            reduction="sum", group=tp_group)
    counted = mask.sum().to(loss_sum.dtype)            # this data-parallel rank's tokens
    dist.all_reduce(counted, group=dp_group)           # tokens of the global batch
    loss = loss_sum / counted.clamp_min(1)
    loss.backward()   # the data-parallel gradient all-reduce (DDP, FSDP) then sums the ranks'
                      # gradients, which is the gradient of the global per-token mean

(Without tensor parallelism, use ``kl_fused.kl_div_logits(..., reduction="sum")`` the same way.)
"""

import math
import struct

import torch
import torch.distributed as dist

from kl_fused import _shard_math
from kl_fused._rank_agreement import (agree, call_device, collective_device as _collective_device, content_hash,
                                     record_bytes, refuse_create_graph, refuse_meta)
from kl_fused._ops import SHARD_DEVICE_TYPES, shard_kernels_reason
from kl_fused._validate import REDUCTIONS, SUPPORTED_DTYPES, check_kl_args
from kl_fused._warn_once import warn_once

from kl_fused._vocab_parallel_distill import (  # noqa: F401  (re-exported: the distillation step on shards)
    collective_bytes_per_chunk, distillation_loss_vocab_parallel, linear_distillation_loss_vocab_parallel)

_DTYPE_CODES = {dtype: code for code, dtype in enumerate(SUPPORTED_DTYPES)}
_META_FIELDS = ("rows", "width", "dtype", "direction", "reduction", "temperature", "mask", "counted", "mask_rows",
                "leading")


def kl_div_logits_vocab_parallel(
    student_shard,
    teacher_shard,
    *,
    group=None,
    temperature=1.0,
    reduction="batchmean",
    direction="forward",
    mask=None,
    agreement="every_call",
):
    r"""KL divergence of full rows whose vocabulary is split across the ranks of ``group``.

    Same contract as :func:`kl_fused.kl_div_logits`, on shards: each rank passes its own
    ``(..., V_r)`` slice of the student and teacher logits (the same rows on every rank, widths
    may differ, each at least 1; the full vocabulary is their concatenation in rank order, although
    the order does not change the result). Every rank returns the loss of the full rows, identical
    on all ranks; backward gives each rank the gradient of its own shard. ``mask`` (the leading
    shape, the same on every rank) and ``"mean"`` (which divides by the full vocabulary
    ``sum(V_r)``) work as in ``kl_div_logits``.

    Communication per call, on the group (payload, accumulation type: float32 for 16-bit and
    float32 logits, float64 for float64):

    * one ``all_gather`` of a fixed 408-byte record per rank, which checks that the ranks agree
      on rows, dtype, options and mask, and that every rank's arguments are valid, so that a bad
      call raises on every rank instead of hanging one of them (a rank whose own arguments are
      invalid raises its TypeError/ValueError, the others a ValueError that names that rank and
      quotes its message; ranks that disagree all raise a ValueError listing the values);
    * one ``all_reduce(MAX)`` of the row maxima: 2 values per row;
    * one ``all_reduce(SUM)`` of the rescaled sums Z_a, Z_b, W: 3 values per row.

    That is 20 bytes per row (40 in float64), never O(rows x V). Backward needs no collective: the
    full rows' statistics are kept from forward (5 values per row), so it cannot deadlock, even
    when some rank's rows are all masked. On a GPU the agreement check costs two host
    synchronisations per call (the mask's count, and reading the gathered records).

    ``agreement="once"`` runs that check only on the first call of each distinct signature (group,
    shapes, dtype, options, whether a mask is given) and skips it, with its two synchronisations,
    on later calls: the hot path then never waits for the host and can be captured in a CUDA graph.
    It no longer compares the masks (their contents) on those calls, and every rank must make the
    same sequence of calls (a rank meeting a signature for the first time while the others do
    not would wait for them in the check's ``all_gather``).

    Works with any backend (gloo on CPU, NCCL on GPU: collectives run on the logits' device, or on
    the CPU for gloo) and the default group or a sub-group. The shard's statistics and gradient
    come from the fused kernels where the device has them (see
    ``kl_fused.distributed.is_fused_available``); elsewhere from plain PyTorch, with a warning.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "kl_div_logits_vocab_parallel needs torch.distributed: call torch.distributed.init_process_group first"
        )
    if agreement not in ("every_call", "once"):
        raise ValueError(f"agreement must be 'every_call' or 'once', got {agreement!r}")
    signature = _call_signature(student_shard, teacher_shard, temperature, reduction, direction, mask, group)
    total_vocab = _AGREED.get(signature) if agreement == "once" else None
    if total_vocab is None:
        total_vocab = _agree_on_the_call(student_shard, teacher_shard, temperature, reduction, direction, mask, group)
        if agreement == "once" and signature is not None:
            _AGREED[signature] = total_vocab
    if not _shard_math.has_fused_shard_kernels(student_shard.device):
        device_type = student_shard.device.type
        warn_once(
            ("vocab_parallel", device_type),
            f"kl_fused.distributed: no compiled shard kernels for device '{student_shard.device}' "
            f"({shard_kernels_reason(student_shard.device)}); the shard statistics and gradients run in plain "
            "PyTorch (correct, slower, O(rows x V_r) temporaries)",
        )
    return _VocabParallelKL.apply(
        student_shard, teacher_shard, mask, group, float(temperature), direction == "reverse", reduction, total_vocab
    )


# Signatures whose agreement check passed (agreement="once"): signature -> full vocabulary.
_AGREED = {}


def _call_signature(student, teacher, temperature, reduction, direction, mask, group):
    """What a call's agreement check depends on, read from host-side metadata only; None when the
    arguments are not tensors (the check then runs, and reports them)."""
    if not all(isinstance(x, torch.Tensor) for x in (student, teacher)) or not (mask is None or isinstance(mask, torch.Tensor)):
        return None
    mask_key = None if mask is None else (tuple(mask.shape), mask.dtype, mask.device)
    return (id(group), dist.get_world_size(group), tuple(student.shape), tuple(teacher.shape), student.dtype, teacher.dtype,
            student.device, teacher.device, float(temperature) if isinstance(temperature, (int, float)) else None,
            reduction, direction, mask_key)


def is_fused_available(device) -> bool:
    """True where this build has compiled shard kernels for `device`'s type (what was built; whether a
    CUDA device here can run them: kl_fused.will_run_fused and the warning of the first call)."""
    return torch.device(device).type in SHARD_DEVICE_TYPES


def collective_bytes_per_call(rows, dtype):
    """Payload bytes one rank contributes per call: the agreement record, then 5 values per row."""
    value_bytes = 8 if dtype == torch.float64 else 4
    return _record_bytes() + 5 * value_bytes * rows


def _record_bytes():
    return record_bytes(_META_FIELDS)


class _VocabParallelKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, mask, group, temperature, reverse, reduction, total_vocab):
        vocab = student.shape[-1]
        leading = student.shape[:-1]
        s2, t2 = student.reshape(-1, vocab), teacher.reshape(-1, vocab)
        m1 = mask.reshape(-1).contiguous() if mask is not None else None
        states = _shard_math.shard_states(s2, t2, m1, temperature, reverse)

        comm = _collective_device(group, states.device)
        maxima = states[:, :2].to(comm, copy=True)
        dist.all_reduce(maxima, op=dist.ReduceOp.MAX, group=group)
        maxima = maxima.to(states.device)
        sums = _shard_math.rescaled_sums(states, maxima, reverse, temperature).to(comm)
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=group)
        row_kl, stats = _shard_math.finish_rows(maxima, sums.to(states.device), m1, reverse)

        counted = m1.sum() if m1 is not None else None
        ctx.save_for_backward(student, teacher, mask, stats, counted)
        ctx.options = (temperature, reverse, reduction, total_vocab)
        return _reduce(row_kl, counted, reduction, leading, total_vocab)

    @staticmethod
    def backward(ctx, grad_loss):
        refuse_create_graph("kl_div_logits_vocab_parallel")
        student, teacher, mask, stats, counted = ctx.saved_tensors
        temperature, reverse, reduction, total_vocab = ctx.options
        need_student, need_teacher = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (need_student or need_teacher):
            return (None,) * 8
        vocab = student.shape[-1]
        rows = stats.shape[0]
        # d(loss)/d(row KL) / T, on the device: no host synchronisation.
        per_row = grad_loss.reshape(-1) if reduction == "none" else grad_loss.reshape(1)
        factor = per_row.to(stats.dtype) / temperature
        if reduction in ("batchmean", "mean"):
            count = counted.clamp_min(1).to(stats.dtype) if counted is not None else float(max(rows, 1))
            factor = factor / count
            if reduction == "mean":
                factor = factor / total_vocab
        factor = factor.expand(rows).contiguous()
        m1 = mask.reshape(-1).contiguous() if mask is not None else None
        grad_student, grad_teacher = _shard_math.shard_grads(
            student.reshape(-1, vocab), teacher.reshape(-1, vocab), m1, stats, factor,
            temperature, reverse, need_student, need_teacher,
        )
        return (
            grad_student.view(student.shape) if need_student else None,
            grad_teacher.view(teacher.shape) if need_teacher else None,
            None, None, None, None, None, None,
        )


def _reduce(row_kl, counted, reduction, leading, total_vocab):
    if reduction == "none":
        return row_kl.view(leading)
    total = row_kl.sum()
    if reduction == "sum":
        return total
    per_row = total_vocab if reduction == "mean" else 1
    if counted is not None:
        denominator = counted.clamp_min(1).to(torch.float64) * per_row
    else:
        # A Python number: no host-to-device copy on the hot path (capturable).
        return (total.to(torch.float64) / float(max(row_kl.numel(), 1) * per_row)).to(row_kl.dtype)
    return (total.to(torch.float64) / denominator.to(total.device)).to(row_kl.dtype)


def _agree_on_the_call(student, teacher, temperature, reduction, direction, mask, group):
    """All-gathers one record per rank and raises the same ValueError on every rank when a rank's
    arguments are invalid or the ranks disagree. Returns the full vocabulary size."""
    values = None
    try:
        check_kl_args(student, teacher, temperature, reduction, direction, mask)
        refuse_meta("kl_div_logits_vocab_parallel", student, "logits")
        error, values = None, None
    except (TypeError, ValueError) as bad:
        error = bad
    if error is None:
        leading = tuple(student.shape[:-1])
        values = dict(
            rows=math.prod(leading),
            width=student.shape[-1],
            dtype=_DTYPE_CODES[student.dtype],
            direction=int(direction == "reverse"),
            reduction=REDUCTIONS.index(reduction),
            temperature=_float_bits(temperature),
            mask=int(mask is not None),
            counted=int(mask.sum().item()) if mask is not None else -1,
            mask_rows=content_hash(mask),
            # tuple hashes of ints are the same in every process (no hash randomisation)
            leading=hash(leading),
        )
    device = call_device(student)
    # A valid rank's text is its leading shape (its field is only that shape's hash), for the message.
    text = str(tuple(student.shape[:-1])) if error is None else None
    fields = agree("kl_div_logits_vocab_parallel", _META_FIELDS, values, error, device, group, (
        ("rows", "the number of rows", str),
        ("leading", "the leading shape", None),
        ("dtype", "the logits' dtype", lambda v: str(SUPPORTED_DTYPES[v])),
        ("direction", "direction", lambda v: ("forward", "reverse")[v]),
        ("reduction", "reduction", lambda v: REDUCTIONS[v]),
        ("temperature", "temperature", lambda v: str(_bits_float(v))),
        ("mask", "whether a mask is given", str),
        ("counted", "the mask's counted rows", str),
        ("mask_rows", "the mask's rows (the same count of True rows, in different places)", _hash_words),
    ), text=text)
    return sum(f["width"] for f in fields)


def _float_bits(value):
    return struct.unpack("<q", struct.pack("<d", float(value)))[0]


def _bits_float(bits):
    return struct.unpack("<d", struct.pack("<q", bits))[0]


def _hash_words(value):
    return f"hash {value & 0xFFFFFFFF:08x}"
