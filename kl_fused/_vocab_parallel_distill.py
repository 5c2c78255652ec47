"""The distillation step with the vocabulary split across ranks (tensor parallelism): the public
distillation_loss_vocab_parallel and linear_distillation_loss_vocab_parallel of kl_fused.distributed.

Both are kl_fused.distillation_loss / linear_distillation_loss on shards: the call is checked on every
rank at once (_rank_agreement.py), the rows that count are taken in chunks, and each chunk's rows run
through the shard row math of _shard_distill.py (O(rows) collectives); the linear form runs in the chunk
loop every fused linear loss shares (_chunked_linear.py), with that row math plugged in.
"""

import hashlib
import math

import torch
import torch.distributed as dist

from kl_fused import _chunked_linear
from kl_fused._distill_args import check_num_items
from kl_fused._fused_loss import scale_by_upstream
from kl_fused._rank_agreement import (agree, call_device, collective_device, content_hash, record_bytes,
                                     refuse_create_graph, refuse_meta)
from kl_fused._shard_distill import VocabShard, collective_values_per_row, shard_distillation_rows
from kl_fused._sparse_args import support_mass_tolerance
from kl_fused._sparse_reference import _raise_on_bad_support, support_status
from kl_fused._teacher_topk import check_teacher_vocab
from kl_fused._validate import SUPPORTED_DTYPES
from kl_fused.distill import LossParts, _check_args
from kl_fused.linear import check_linear_distillation_args, default_chunk_rows

HIDDEN_GRADS = ("all_reduce", "local")
_FIELDS = ("rows", "leading", "width", "hidden", "dtype", "options", "mask", "labels", "topk_indices", "topk_logprobs",
           "num_items", "chunk_rows")
_CHECKS = (
    ("rows", "the number of rows", str),
    ("leading", "the leading shape", str),
    ("hidden", "the hidden size", str),
    ("dtype", "the dtype", lambda v: str(SUPPORTED_DTYPES[v]) if 0 <= v < len(SUPPORTED_DTYPES) else str(v)),
    ("options", "the options (teacher form, divergence, beta, tail, temperature, weights, ignore_index, "
                "label_smoothing, reduction, validate, return_parts, hidden_grad, logit scales and softcaps)",
     lambda v: f"hash {v & 0xFFFFFFFF:08x}"),
    ("mask", "the mask (its values, not only its count)", lambda v: f"hash {v & 0xFFFFFFFF:08x}"),
    ("labels", "the labels", lambda v: f"hash {v & 0xFFFFFFFF:08x}"),
    ("topk_indices", "teacher_topk's indices", lambda v: f"hash {v & 0xFFFFFFFF:08x}"),
    ("topk_logprobs", "teacher_topk's log-probs", lambda v: f"hash {v & 0xFFFFFFFF:08x}"),
    ("num_items", "num_items_in_batch", str),
)


def _require_dist(name):
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{name} needs torch.distributed: call torch.distributed.init_process_group first")


def collective_bytes_per_chunk(rows, dtype, divergence="forward_kl", dense=True, topk_slots=0, hard=False,
                               temperature=1.0, label_smoothing=0.0):
    """Payload bytes one rank sends per chunk of `rows` counted rows (see _shard_distill.py)."""
    value_bytes = 8 if dtype == torch.float64 else 4
    return value_bytes * rows * collective_values_per_row(divergence, dense, topk_slots, hard, temperature,
                                                          label_smoothing)


def agreement_bytes():
    """Payload bytes of the one agreement record a rank sends per call."""
    return record_bytes(_FIELDS)


def _options_hash(options):
    digest = hashlib.blake2b(repr(options).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def _agree(name, group, error, device, rows_of, width, hidden, dtype, options, mask, labels, topk, num_items,
           chunk_rows):
    """One all-gather: raises on every rank or none. Returns (the full vocabulary, the agreed chunk rows)."""
    values = None
    if error is None:
        leading = tuple(rows_of.shape[:-1])
        values = dict(rows=math.prod(leading), leading=hash(leading), width=width, hidden=hidden,
                      dtype=SUPPORTED_DTYPES.index(dtype), options=_options_hash(options), mask=content_hash(mask),
                      labels=content_hash(labels.long() if labels is not None else None),
                      topk_indices=content_hash(topk[0].long() if topk is not None else None),
                      topk_logprobs=content_hash(topk[1] if topk is not None else None),
                      num_items=int(num_items.item()) if num_items is not None else -1, chunk_rows=chunk_rows)
    fields = agree(name, _FIELDS, values, error, device, group, _CHECKS)
    return sum(f["width"] for f in fields), min(f["chunk_rows"] for f in fields)


def _counted_rows(labels, ignore_index, mask):
    """(flat bool of the rows that count or None when all do, flat labels or None)."""
    counted = mask.reshape(-1) if mask is not None else None
    flat_labels = labels.reshape(-1) if labels is not None else None
    if flat_labels is not None:
        labelled = flat_labels != ignore_index
        counted = labelled if counted is None else counted & labelled
    return counted, flat_labels


def _check_values(flat_labels, topk, counted, vocab, tail, validate, ignore_index):
    """What needs the full vocabulary: labels in [0, V) and a valid top-k support on the rows that count,
    raised identically on every rank (their inputs agree) before any chunk's collective."""
    if not validate:
        return
    rows = counted if counted is not None else None
    if flat_labels is not None:
        keep = rows if rows is not None else torch.ones_like(flat_labels, dtype=torch.bool)
        bad = keep & ((flat_labels < 0) | (flat_labels >= vocab))
        if bad.any():
            row = int(bad.nonzero()[0, 0])
            raise ValueError(f"labels must lie in [0, V) = [0, {vocab}) or equal ignore_index = {ignore_index} on "
                             f"every counted row, but row {row} holds {int(flat_labels[row])}")
    if topk is not None:
        indices, logprobs = (x.reshape(-1, x.shape[-1]) for x in topk)
        keep = rows if rows is not None else torch.ones(indices.shape[0], dtype=torch.bool, device=indices.device)
        tolerance = support_mass_tolerance(logprobs.dtype, indices.shape[-1])
        _raise_on_bad_support(*support_status(indices, logprobs, vocab, keep, tail, tolerance), tolerance, vocab)


class _ShardRowOp:
    """The chunk's row op with the signature of the fused op kl_fused::distillation_loss (what the shared
    chunk loop calls), on this rank's shard: all rows count, reduction "none"."""

    def __init__(self, shard, tail, grads_in_acc=False):
        self.shard, self.tail, self.grads_in_acc = shard, tail, grads_in_acc

    def __call__(self, student, teacher, indices, logprobs, labels, _mask, _num_items, divergence, beta, renormalize,
                 temperature, soft_weight, hard_weight, _ignore_index, label_smoothing, _reduction, mass_tolerance,
                 _validate, student_grad, teacher_grad, logprobs_grad):
        vocab = self.shard.vocab
        bad = None
        if labels is not None:
            bad = (labels < 0) | (labels >= vocab)
        if indices is not None:
            ones = torch.ones(indices.shape[0], dtype=torch.bool, device=indices.device)
            invalid = support_status(indices, logprobs, vocab, ones, self.tail, mass_tolerance)
            invalid = invalid[0] | invalid[1] | invalid[2]
            bad = invalid if bad is None else bad | invalid
        if bad is not None:  # validate=False: such rows are NaN; their ids are kept in range here
            if labels is not None:
                labels = torch.where(bad, 0, labels)
            if indices is not None:
                indices = torch.where(bad[:, None], 0, indices)
        return shard_distillation_rows(self.shard, student, teacher, indices, logprobs, labels, divergence, beta,
                                       renormalize, temperature, soft_weight, hard_weight, label_smoothing,
                                       bad, student_grad,
                                       teacher_grad, logprobs_grad, self.grads_in_acc)


def _make_shard(group, width, vocab, device):
    """This rank's VocabShard: its offset is the sum of the lower ranks' widths (one all_gather of ints)."""
    world = dist.get_world_size(group)
    comm = collective_device(group, device)
    mine = torch.tensor([width], dtype=torch.int64, device=comm)
    widths = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(widths, mine, group=group)
    rank = dist.get_rank(group)
    offset = sum(int(w.item()) for w in widths[:rank])
    return VocabShard(group, offset, width, vocab, comm)


def distillation_loss_vocab_parallel(student_shard, teacher_shard=None, *, group=None, teacher_topk=None, labels=None,
                                     divergence="forward_kl", beta=0.5, tail="bucket", temperature=1.0, soft_weight=1.0,
                                     hard_weight=0.0, ignore_index=-100, label_smoothing=0.0, reduction="batchmean",
                                     mask=None, num_items_in_batch=None, return_parts=False, validate=True):
    """:func:`kl_fused.distillation_loss` of the full rows, from this rank's vocabulary shard.

    ``student_shard`` (and ``teacher_shard``) are this rank's ``(..., V_r)`` columns of every row; the full
    vocabulary is the shards in rank order (widths may differ, each >= 1). ``labels`` and
    ``teacher_topk`` hold global token ids, the same on every rank, as do ``mask`` and every option (a
    call where they differ raises a ValueError on every rank). Returns the loss of the full rows on every
    rank; backward gives this rank's shard gradients (and the top-k log-probs' complete gradient) with no
    collective, except JSD's one all-reduce of 2 values per row. Temporaries: a few fp32 buffers of
    chunk x V_r."""
    name = "distillation_loss_vocab_parallel"
    _require_dist(name)
    given_topk = teacher_topk
    num_items = None
    try:
        teacher_topk = _check_args(student_shard, teacher_shard, teacher_topk, labels, divergence, beta, tail,
                                   temperature, soft_weight, hard_weight, ignore_index, label_smoothing, reduction,
                                   mask, validate, check_vocab=False)
        num_items = check_num_items(num_items_in_batch, reduction, student_shard.device)
        refuse_meta(name, student_shard)
        error = None
    except (TypeError, ValueError) as bad:
        error = bad
    device = call_device(student_shard)
    options = ("logits", teacher_shard is not None, divergence, beta, tail, temperature, soft_weight, hard_weight,
               ignore_index, label_smoothing, reduction, validate, return_parts,
               teacher_shard is not None and teacher_shard.requires_grad)
    width = student_shard.shape[-1] if error is None else 0
    chunk_rows = (default_chunk_rows(width * dist.get_world_size(group), device, student_shard.dtype)
                  if error is None else 0)
    vocab, chunk_rows = _agree(name, group, error, device, student_shard, width, 0,
                               student_shard.dtype if error is None else torch.float32, options, mask, labels,
                               teacher_topk, num_items, chunk_rows)
    check_teacher_vocab(given_topk, vocab)  # a TeacherTopK of another vocabulary (the same on every rank)
    counted, flat_labels = _counted_rows(labels, ignore_index, mask)
    _check_values(flat_labels, teacher_topk, counted, vocab, tail, validate, ignore_index)
    shard = _make_shard(group, width, vocab, device)
    indices, logprobs = teacher_topk if teacher_topk is not None else (None, None)
    config = dict(shard=shard, indices=indices, labels=flat_labels, counted=counted, num_items=num_items,
                  divergence=divergence, beta=float(beta), tail=tail, temperature=float(temperature),
                  soft_weight=float(soft_weight), hard_weight=float(hard_weight), ignore_index=int(ignore_index),
                  label_smoothing=float(label_smoothing), reduction=reduction, chunk_rows=chunk_rows,
                  wants=[grad_needed(x) for x in (student_shard, teacher_shard, logprobs)])
    loss, parts = _DistillShards.apply(config, student_shard, teacher_shard, logprobs)
    return LossParts(loss, parts[0], parts[1]) if return_parts else loss


class _DistillShards(torch.autograd.Function):
    """Forward computes the loss and, where asked, the shard's gradients at upstream gradient 1; backward
    scales them (per row for reduction "none"): the logits' gradients need no collective there."""

    @staticmethod
    def forward(ctx, config, student, teacher, logprobs):
        c = config
        width = student.shape[-1]
        leading = student.shape[:-1]
        rows = leading.numel()
        s2 = student.reshape(rows, width)
        t2 = teacher.reshape(rows, width) if teacher is not None else None
        idx2 = c["indices"].reshape(rows, -1) if c["indices"] is not None else None
        lp2 = logprobs.reshape(rows, -1) if logprobs is not None else None
        kept = c["counted"].nonzero().squeeze(1) if c["counted"] is not None else None
        count = kept.numel() if kept is not None else rows
        acc = torch.float64 if student.dtype == torch.float64 else torch.float32
        wants = c["wants"]
        grads = [torch.zeros_like(x) if want else None for x, want in zip((student, teacher, logprobs), wants)]
        grads_2d = [g.view(-1, g.shape[-1]) if g is not None else None for g in grads]
        row_loss = torch.zeros(rows, dtype=acc, device=student.device)
        row_parts = torch.zeros(2, rows, dtype=acc, device=student.device)
        denominator = _denominator(c["reduction"], c["num_items"], count, c["shard"].vocab)
        op = _ShardRowOp(c["shard"], c["tail"], grads_in_acc=True)
        # The rows that count, in chunks (the same on every rank: their count and the chunk size agree).
        for start in range(0, count, c["chunk_rows"]):
            chunk = kept[start:start + c["chunk_rows"]] if kept is not None else torch.arange(
                start, min(start + c["chunk_rows"], count), device=student.device)

            def take(x):
                return x.index_select(0, chunk) if x is not None else None

            losses, *chunk_grads, parts = op(
                take(s2), take(t2), take(idx2), take(lp2), take(c["labels"]), None, None, c["divergence"], c["beta"],
                c["tail"] == "renormalize", c["temperature"], c["soft_weight"], c["hard_weight"], c["ignore_index"],
                c["label_smoothing"], "none", support_mass_tolerance(lp2.dtype, lp2.shape[-1]) if lp2 is not None
                else 0.0, False, *wants)
            row_loss.index_copy_(0, chunk, losses)
            row_parts.index_copy_(1, chunk, parts)
            for dest, g in zip(grads_2d, chunk_grads):
                if dest is not None:
                    dest.index_copy_(0, chunk, _chunked_linear._divide(g, denominator).to(dest.dtype))
        if c["reduction"] == "none":
            loss, parts = row_loss.view(leading), row_parts.view((2, *leading))
        else:
            loss = _chunked_linear._divide(row_loss.sum(), denominator)
            parts = _chunked_linear._divide(row_parts.sum(1), denominator)
        ctx.grads = grads
        ctx.mark_non_differentiable(parts)
        return loss, parts

    @staticmethod
    def backward(ctx, grad_loss, _grad_parts):
        refuse_create_graph("distillation_loss_vocab_parallel")
        grads, ctx.grads = ctx.grads, None
        if grads is None:
            raise RuntimeError("kl_fused.distributed.distillation_loss_vocab_parallel: backward through the same "
                               "graph twice is not supported; call the loss again")
        result = [None, None, None, None]
        for i, g in enumerate(grads):
            if g is not None and ctx.needs_input_grad[i + 1]:
                result[i + 1] = scale_by_upstream(g, grad_loss)
        return tuple(result)


def grad_needed(x):
    return isinstance(x, torch.Tensor) and torch.is_grad_enabled() and x.requires_grad


def _denominator(reduction, num_items, count, vocab):
    if reduction == "batchmean" and num_items is not None:
        return num_items
    return {"none": 1, "sum": 1, "batchmean": max(count, 1), "mean": max(count, 1) * vocab}[reduction]


def linear_distillation_loss_vocab_parallel(student_hidden, student_weight_shard, teacher_logits_shard=None, *,
                                            group=None, teacher_hidden=None, teacher_weight_shard=None,
                                            teacher_topk=None, labels=None, student_bias_shard=None,
                                            teacher_bias_shard=None, hidden_grad="all_reduce", chunk_rows=None,
                                            student_logit_scale=1.0, teacher_logit_scale=1.0, student_softcap=None,
                                            teacher_softcap=None, divergence="forward_kl", beta=0.5, tail="bucket",
                                            temperature=1.0, soft_weight=1.0, hard_weight=0.0, ignore_index=-100,
                                            label_smoothing=0.0, reduction="batchmean", mask=None,
                                            num_items_in_batch=None, return_parts=False, validate=True):
    """:func:`kl_fused.linear_distillation_loss` of the full vocabulary, from this rank's output-layer
    shard (Megatron's column-parallel ``lm_head``: ``student_weight_shard`` is ``weight[v_start:v_end]``).

    The hidden states, labels, mask, top-k slots and options are the same on every rank; the weight,
    bias and teacher-logits shards are this rank's rows/columns, in rank order. Gradients: each rank
    gets its shards' (weight, bias, teacher logits); the hidden states' is the sum over the ranks,
    all-reduced in backward (``hidden_grad="all_reduce"``) or left as this rank's partial sum
    (``"local"``, for a layer whose backward reduces it). The chunk loop is linear_distillation_loss's,
    its chunk sized for the full vocabulary, so a rank's chunk buffers are 1/N of the single process's.
    With ``reduction="none"`` backward runs the loop again with the per-row upstream gradient, and
    with it the collectives: every rank of the group must run backward."""
    name = "linear_distillation_loss_vocab_parallel"
    _require_dist(name)
    given_topk = teacher_topk
    compute_dtype = num_items = None
    try:
        if hidden_grad not in HIDDEN_GRADS:
            raise ValueError(f"hidden_grad must be one of {HIDDEN_GRADS}, got {hidden_grad!r}")
        teacher_topk, compute_dtype, num_items = check_linear_distillation_args(
            student_hidden, student_weight_shard, teacher_logits_shard, teacher_hidden, teacher_weight_shard,
            teacher_topk, student_bias_shard, teacher_bias_shard, chunk_rows, student_logit_scale,
            teacher_logit_scale, student_softcap, teacher_softcap, labels, divergence, beta, tail, temperature,
            soft_weight, hard_weight, ignore_index, label_smoothing, reduction, mask, num_items_in_batch, validate,
            check_vocab=False)
        refuse_meta(name, student_hidden)
        error = None
    except (TypeError, ValueError) as bad:
        error = bad
    device = call_device(student_hidden)
    logprobs = teacher_topk[1] if error is None and teacher_topk is not None else None
    tensors = (student_hidden, student_weight_shard, student_bias_shard, teacher_logits_shard, teacher_hidden,
               teacher_weight_shard, teacher_bias_shard, logprobs)
    form = "logits" if teacher_logits_shard is not None else ("hidden" if teacher_hidden is not None else "other")
    options = ("linear", form, divergence, beta, tail, temperature, soft_weight, hard_weight, ignore_index,
               label_smoothing, reduction, validate, return_parts, hidden_grad, student_logit_scale,
               teacher_logit_scale, student_softcap, teacher_softcap, student_bias_shard is not None,
               teacher_bias_shard is not None, tuple(grad_needed(t) for t in tensors))
    width = hidden = agreed_rows = 0
    if error is None:
        width, hidden = student_weight_shard.shape
        hiddens = [w.shape[1] for w in (student_weight_shard, teacher_weight_shard) if w is not None]
        # The single-process loop's chunk for the full vocabulary (about width x ranks): each rank's chunk
        # buffers are then 1/N of the single-process ones.
        agreed_rows = chunk_rows or default_chunk_rows(width * dist.get_world_size(group), device, compute_dtype,
                                                       max(hiddens))
    vocab, agreed_rows = _agree(name, group, error, device, student_hidden, width, hidden,
                                compute_dtype if error is None else torch.float32, options, mask, labels, teacher_topk,
                                num_items, agreed_rows)
    check_teacher_vocab(given_topk, vocab)
    counted, flat_labels = _counted_rows(labels, ignore_index, mask)
    _check_values(flat_labels, teacher_topk, counted, vocab, tail, validate, ignore_index)
    shard = _make_shard(group, width, vocab, device)
    config = dict(
        shard=shard, tail=tail, hidden_grad=hidden_grad, reduction=reduction,
        wants=[grad_needed(t) and reduction != "none" for t in tensors],
        loop=dict(teacher_indices=teacher_topk[0] if teacher_topk is not None else None, labels=labels, mask=mask,
                  num_items=num_items, divergence=divergence, beta=float(beta), renormalize=tail == "renormalize",
                  temperature=float(temperature), soft_weight=float(soft_weight), hard_weight=float(hard_weight),
                  ignore_index=int(ignore_index), label_smoothing=float(label_smoothing),
                  mass_tolerance=(support_mass_tolerance(teacher_topk[1].dtype, teacher_topk[1].shape[-1])
                                  if teacher_topk is not None else 0.0),
                  validate=False, student_scale=float(student_logit_scale),
                  student_softcap=float(student_softcap or 0.0), teacher_scale=float(teacher_logit_scale),
                  teacher_softcap=float(teacher_softcap or 0.0), compute_dtype=compute_dtype, reduction=reduction,
                  chunk_rows=int(agreed_rows), rows_op=_ShardRowOp(shard, tail), total_vocab=vocab))
    loss, parts = _LinearShards.apply(config, *tensors)
    return LossParts(loss, parts[0], parts[1]) if return_parts else loss


_TENSOR_NAMES = _chunked_linear.GRAD_INPUTS
_HIDDEN = (0, 4)  # student_hidden, teacher_hidden: their gradients are partial sums over the ranks


def _run_loop(config, tensors, flags, row_weights=None):
    """The shared chunk loop with this rank's shard row op: (loss, grads (8), parts)."""
    with torch.autocast(tensors[0].device.type, enabled=False):
        result = _chunked_linear._run_chunks(
            **dict(zip(_TENSOR_NAMES, tensors)), row_weights=row_weights, **config["loop"],
            **{f"grad_{n}": f for n, f in zip(_TENSOR_NAMES, flags)})
    return result[0], list(result[1:9]), result[9]


class _LinearShards(torch.autograd.Function):
    """As kl_fused's fused linear losses: forward computes the gradients at upstream gradient 1 (the loss
    only for reduction "none", whose backward runs the loop again with the per-row upstream weights);
    backward scales them and all-reduces the hidden states' partial sums (hidden_grad="all_reduce")."""

    @staticmethod
    def forward(ctx, config, *tensors):
        flags = config["wants"]
        loss, grads, parts = _run_loop(config, tensors, flags)
        ctx.config = config
        ctx.grads = [g if flag else None for g, flag in zip(grads, flags)]
        ctx.save_for_backward(*tensors)
        ctx.mark_non_differentiable(parts)
        return loss, parts

    @staticmethod
    def backward(ctx, grad_loss, _grad_parts):
        refuse_create_graph("linear_distillation_loss_vocab_parallel")
        needed = list(ctx.needs_input_grad[1:])
        grads, ctx.grads = ctx.grads, None
        tensors = ctx.saved_tensors
        per_row = grad_loss.dim() > 0
        if per_row or grads is None or any(n and g is None for n, g in zip(needed, grads)):
            _, grads, _ = _run_loop(ctx.config, tensors, needed, grad_loss.reshape(-1) if per_row else None)
        result = [None]
        shard = ctx.config["shard"]
        for i, (need, g) in enumerate(zip(needed, grads)):
            if not need:
                result.append(None)
                continue
            g = g if per_row else scale_by_upstream(g, grad_loss)
            if i in _HIDDEN and ctx.config["hidden_grad"] == "all_reduce":
                total = g.to(shard.comm, copy=True)
                dist.all_reduce(total, op=dist.ReduceOp.SUM, group=shard.group)
                g = total.to(g.device)
            result.append(g)
        return tuple(result)
