"""The fused linear losses: a distillation loss from hidden states and the output layer, whose
logits never exist in full (the chunk loop is _chunked_linear.py, shared by every linear loss)."""

import math

import torch

from kl_fused import _chunked_linear, reference
from kl_fused._distill_args import check_labels, check_num_items, check_options, check_teacher_form, check_teacher_topk
from kl_fused._fused_loss import fused_loss
from kl_fused._ops import fused_path
from kl_fused._sparse_args import check_topk_slots, support_mass_tolerance
from kl_fused._teacher_topk import check_teacher_vocab
from kl_fused._validate import SUPPORTED_DTYPES, check_beta, check_direction, check_mask, check_reduction, check_temperature
from kl_fused.distill import LossParts

# Bytes of one (chunk_rows x V) logits buffer that the default chunk size aims at, and the fewest rows
# a chunk gets. CPU: a chunk's few buffers stay within ~100 MB, and from 256 rows on the chunk's matmuls
# (the weight gradient's has K = chunk rows) run as fast as unchunked ones (measured at 1024 x 256 x
# 128256 fp32 here: 64 rows was 1.35x slower than materialised logits, 128 to 512 rows on par). CUDA:
# thousands of rows per matmul, where chunking costs nothing (Liger's 32-row chunks at 1024 x 128256 are
# what make it 4x slower than unchunked), at about 2 GB of buffers for bf16 V = 128256.
CHUNK_BYTES = {"cpu": 32 << 20, "cuda": 512 << 20}
MIN_CHUNK_ROWS = {"cpu": 256, "cuda": 1024}
# A chunk also gets at least H rows (the hidden size, rounded up to 64) while one logits buffer stays
# within MAX_CHUNK_BYTES. CPU: the forward matmul (chunk x H) @ (H x V) with fewer rows than H runs
# slower per row (measured here, fp32, H = 1024, V = 32000, ms per 4096 rows: 1868 at 256-row chunks,
# 1578 at 1024, 1525 unchunked), which put 4096 x 1024 x 32000 at 1.2x the materialised path with 256-row
# chunks, 0.97x with 1024. CUDA: the cap equals the budget, so its chunk size does not depend on H.
MAX_CHUNK_BYTES = {"cpu": 128 << 20, "cuda": 512 << 20}


def default_chunk_rows(vocab, device, dtype=torch.float32, hidden=0):
    """Rows per chunk for `vocab` logits of `dtype` on `device` from hidden size `hidden`: about
    CHUNK_BYTES[device] per logits buffer, at least MIN_CHUNK_ROWS[device], at least `hidden` rows while a
    buffer stays within MAX_CHUNK_BYTES[device], a multiple of 64."""
    device_type = torch.device(device).type
    budget = CHUNK_BYTES.get(device_type, CHUNK_BYTES["cpu"])
    cap = MAX_CHUNK_BYTES.get(device_type, MAX_CHUNK_BYTES["cpu"])
    minimum = MIN_CHUNK_ROWS.get(device_type, MIN_CHUNK_ROWS["cpu"])
    row_bytes = max(vocab, 1) * torch.empty((), dtype=dtype).element_size()
    rows = max(minimum, budget // row_bytes // 64 * 64)
    hidden_rows = -(-max(hidden, 0) // 64) * 64
    return max(rows, min(hidden_rows, cap // row_bytes // 64 * 64))


def linear_kl_div(
    student_hidden,
    student_weight,
    teacher_logits=None,
    *,
    teacher_hidden=None,
    teacher_weight=None,
    student_bias=None,
    teacher_bias=None,
    temperature=1.0,
    reduction="batchmean",
    direction="forward",
    mask=None,
    chunk_rows=None,
    student_logit_scale=1.0,
    teacher_logit_scale=1.0,
    student_softcap=None,
    teacher_softcap=None,
):
    r"""KL divergence between teacher and student softmaxes, from the student's hidden states and output
    layer, without materialising the student's (rows x V) logits (nor the teacher's, when the teacher
    too is given as hidden states and a layer).

    The value equals ``kl_div_logits(post(student_hidden @ student_weight.T + student_bias), teacher,
    ...)`` with the same ``temperature``, ``reduction``, ``direction`` and ``mask`` semantics (per counted
    row; ``mean`` divides by counted rows x V), where ``post`` multiplies by the logit scale and then
    applies the softcap ``c * tanh(z / c)`` (Cohere/Granite scales, Gemma's final-logit softcapping),
    before the temperature.

    Args:
        student_hidden: ``(..., H)`` hidden states (any strides).
        student_weight: ``(V, H)``, the ``nn.Linear`` layout of an ``lm_head``.
        teacher_logits: ``(..., V)`` precomputed teacher logits; or give ``teacher_hidden`` ``(..., H_t)``
            and ``teacher_weight`` ``(V, H_t)`` (and optionally ``teacher_bias``) instead. Exactly one of
            the two forms.
        student_bias, teacher_bias: ``(V,)`` or None.
        temperature, reduction, direction, mask: as in :func:`kl_fused.kl_div_logits`. Masked rows are
            never read (they may hold NaN) and cost no matmul.
        chunk_rows: rows per chunk; None chooses from V, H, the dtype and the device (:func:`default_chunk_rows`).
        student_logit_scale, teacher_logit_scale: finite multipliers > 0 of the logits (default 1).
        student_softcap, teacher_softcap: None or c > 0.

    Gradients flow to every input tensor that requires grad (hidden states, weights, biases, teacher
    logits), under any upstream gradient. Weight and bias gradients of 16-bit layers accumulate in
    fp32 across chunks and are rounded once. Memory beyond the inputs and the returned gradients is
    O(chunk_rows x V). Under autocast the matmuls run in autocast's dtype, as ``nn.Linear`` would;
    without it, each layer's hidden states, weight and bias must share one dtype.

    With a mask, the call synchronises with the host once (the number of counted rows sets the chunk
    shapes). With ``reduction="none"`` the forward computes the losses only and backward runs the chunk
    loop again with the upstream weights (a weight's gradient cannot be re-weighted per row afterwards).
    """
    check_direction(direction)
    return _linear_loss(
        "linear_kl_div", "reverse_kl" if direction == "reverse" else "forward_kl", 0.5, reference.linear_kl_div,
        dict(direction=direction), student_hidden, student_weight, teacher_logits, teacher_hidden, teacher_weight,
        student_bias, teacher_bias, temperature, reduction, mask, chunk_rows, student_logit_scale,
        teacher_logit_scale, student_softcap, teacher_softcap)


def linear_jsd(
    student_hidden,
    student_weight,
    teacher_logits=None,
    *,
    teacher_hidden=None,
    teacher_weight=None,
    student_bias=None,
    teacher_bias=None,
    beta=0.5,
    temperature=1.0,
    reduction="batchmean",
    mask=None,
    chunk_rows=None,
    student_logit_scale=1.0,
    teacher_logit_scale=1.0,
    student_softcap=None,
    teacher_softcap=None,
):
    r"""The generalized Jensen-Shannon divergence of :func:`kl_fused.jsd_logits` (GKD's beta: 0 is
    KL(teacher || student), 1 is KL(student || teacher)), from hidden states and output layers, without
    materialising the logits. Everything else (teacher forms, masks, reductions, gradients, chunking,
    logit scales and softcaps, autocast, memory) is as in :func:`linear_kl_div`, whose chunk loop this
    shares; the row kernel is jsd_logits' instead of kl_div_logits'.
    """
    check_beta(beta)
    return _linear_loss(
        "linear_jsd", "jsd", float(beta), reference.linear_jsd, dict(beta=beta), student_hidden, student_weight,
        teacher_logits, teacher_hidden, teacher_weight, student_bias, teacher_bias, temperature, reduction, mask,
        chunk_rows, student_logit_scale, teacher_logit_scale, student_softcap, teacher_softcap)


def _linear_loss(public_name, divergence, beta, reference_fn, reference_options, student_hidden, student_weight,
                 teacher_logits, teacher_hidden, teacher_weight, student_bias, teacher_bias, temperature, reduction, mask,
                 chunk_rows, student_logit_scale, teacher_logit_scale, student_softcap, teacher_softcap):
    """linear_kl_div and linear_jsd: validates their arguments, then runs the shared chunk loop on devices
    whose row kernels exist (else the materialising reference, with one warning)."""
    compute_dtype = check_linear_args(
        student_hidden, student_weight, teacher_logits, teacher_hidden, teacher_weight, student_bias, teacher_bias,
        temperature, reduction, mask, chunk_rows, student_logit_scale, teacher_logit_scale, student_softcap,
        teacher_softcap)
    if not fused_path(public_name, student_hidden.device):
        return reference_fn(
            student_hidden, student_weight, teacher_logits, teacher_hidden=teacher_hidden,
            teacher_weight=teacher_weight, student_bias=student_bias, teacher_bias=teacher_bias,
            temperature=temperature, reduction=reduction, mask=mask, student_logit_scale=student_logit_scale,
            teacher_logit_scale=teacher_logit_scale, student_softcap=student_softcap,
            teacher_softcap=teacher_softcap, **reference_options)
    return _chunked(compute_dtype, student_hidden, student_weight, student_bias, teacher_logits, teacher_hidden,
                    teacher_weight, teacher_bias, None, None, mask, None, divergence, beta, "bucket", temperature, 1.0,
                    0.0, -100, 0.0, reduction, True, chunk_rows, student_logit_scale, student_softcap,
                    teacher_logit_scale, teacher_softcap)[0]


def linear_distillation_loss(
    student_hidden,
    student_weight,
    teacher_logits=None,
    *,
    teacher_hidden=None,
    teacher_weight=None,
    teacher_topk=None,
    student_bias=None,
    teacher_bias=None,
    chunk_rows=None,
    student_logit_scale=1.0,
    teacher_logit_scale=1.0,
    student_softcap=None,
    teacher_softcap=None,
    labels=None,
    divergence="forward_kl",
    beta=0.5,
    tail="bucket",
    temperature=1.0,
    soft_weight=1.0,
    hard_weight=0.0,
    ignore_index=-100,
    label_smoothing=0.0,
    reduction="batchmean",
    mask=None,
    num_items_in_batch=None,
    return_parts=False,
    validate=True,
):
    r"""The distillation step of :func:`kl_fused.distillation_loss` from the student's hidden states and
    output layer, without materialising its (rows x V) logits: ``soft_weight * D + hard_weight * CE`` per
    counted row, the cross-entropy in the soft term's kernel, in the chunk loop of :func:`linear_kl_div`.

    The teacher is one of: ``teacher_logits`` ``(..., V)``; ``teacher_hidden`` ``(..., H_t)`` with
    ``teacher_weight`` ``(V, H_t)`` (and ``teacher_bias``), whose logits are built a chunk at a time too;
    ``teacher_topk = (indices, logprobs)``, each ``(..., K)`` (offline distillation from a top-k cache:
    no logits at all); or none, with labels and ``hard_weight > 0``:
    ``linear_distillation_loss(h, W, labels=y, hard_weight=1)`` is a fused linear cross-entropy, equal to
    ``F.cross_entropy(h @ W.T, y, ignore_index=-100)``.

    The logits are ``post(hidden @ weight.T + bias)``, post the logit scale then the softcap (as in
    :func:`linear_kl_div`); the teacher's scale and softcap apply to logits built from teacher_hidden
    only (giving them with teacher_logits or teacher_topk is an error). The hard term is at temperature 1
    after the student's scale and softcap. Every other keyword is :func:`kl_fused.distillation_loss`'s.
    Rows that do not count (mask False, or labelled ignore_index) are never read and cost no matmul.

    Gradients flow to every input tensor that requires grad: hidden states, weights, biases, teacher
    logits or top-k log-probs, under any upstream gradient. Weight and bias gradients of 16-bit layers
    accumulate in fp32. With a mask or labels, the call synchronises with the host once (the number of
    counted rows sets the chunk shapes), and with ``validate`` once more on CUDA, after the last chunk
    (not once per chunk: the chunks run unvalidated and a bad row, whose loss is then NaN, is rerun
    validated to raise); with ``reduction="none"`` the forward computes the losses only and backward
    runs the chunk loop again with the upstream weights.
    """
    check_options(divergence, beta, tail, temperature, soft_weight, hard_weight, ignore_index, label_smoothing,
                  reduction, validate)
    given_topk, teacher_topk = teacher_topk, check_teacher_topk(teacher_topk)
    dense = any(x is not None for x in (teacher_logits, teacher_hidden, teacher_weight, teacher_bias))
    check_teacher_form(dense, teacher_topk, divergence, labels, hard_weight)
    compute_dtype = check_linear_args(
        student_hidden, student_weight, teacher_logits, teacher_hidden, teacher_weight, student_bias, teacher_bias,
        temperature, reduction, mask, chunk_rows, student_logit_scale, teacher_logit_scale, student_softcap,
        teacher_softcap, teacher_required=False)
    leading = tuple(student_hidden.shape[:-1])
    if teacher_topk is not None:
        check_topk_slots(*teacher_topk, leading, student_hidden.device, "student_hidden")
        check_teacher_vocab(given_topk, student_weight.shape[0])  # a TeacherTopK of another vocabulary
    check_labels(labels, leading, student_hidden.device)
    num_items = check_num_items(num_items_in_batch, reduction, student_hidden.device)
    if not fused_path("linear_distillation_loss", student_hidden.device):
        return reference.linear_distillation_loss(
            student_hidden, student_weight, teacher_logits, teacher_hidden=teacher_hidden, teacher_weight=teacher_weight,
            teacher_topk=teacher_topk, student_bias=student_bias, teacher_bias=teacher_bias,
            student_logit_scale=student_logit_scale, teacher_logit_scale=teacher_logit_scale,
            student_softcap=student_softcap, teacher_softcap=teacher_softcap, labels=labels, divergence=divergence,
            beta=beta, tail=tail, temperature=temperature, soft_weight=soft_weight, hard_weight=hard_weight,
            ignore_index=ignore_index, label_smoothing=label_smoothing, reduction=reduction, mask=mask,
            num_items_in_batch=num_items, return_parts=return_parts, validate=validate)
    indices, logprobs = teacher_topk if teacher_topk is not None else (None, None)
    result = _chunked(compute_dtype, student_hidden, student_weight, student_bias, teacher_logits, teacher_hidden,
                      teacher_weight, teacher_bias, indices, logprobs, mask, labels, divergence, beta, tail, temperature,
                      soft_weight, hard_weight, ignore_index, label_smoothing, reduction, validate, chunk_rows,
                      student_logit_scale, student_softcap, teacher_logit_scale, teacher_softcap, num_items)
    return LossParts(result[0], result[-1][0], result[-1][1]) if return_parts else result[0]


def _chunked(compute_dtype, student_hidden, student_weight, student_bias, teacher_logits, teacher_hidden, teacher_weight,
             teacher_bias, teacher_indices, teacher_logprobs, mask, labels, divergence, beta, tail, temperature,
             soft_weight, hard_weight, ignore_index, label_smoothing, reduction, validate, chunk_rows,
             student_logit_scale, student_softcap, teacher_logit_scale, teacher_softcap, num_items=None):
    """The shared chunk loop (_chunked_linear.py) on checked arguments: (loss, parts)."""
    device = student_hidden.device
    tensors = (student_hidden, student_weight, student_bias, teacher_logits, teacher_hidden, teacher_weight, teacher_bias,
               teacher_logprobs)
    # reduction "none": the forward cannot know the per-row upstream weights, so it computes the loss
    # only and backward runs the loop again with them (_chunked_linear.py).
    wants = [torch.is_grad_enabled() and reduction != "none" and t is not None and t.requires_grad for t in tensors]
    if chunk_rows is None:
        hidden = max(w.shape[1] for w in (student_weight, teacher_weight) if w is not None)
        chunk_rows = default_chunk_rows(student_weight.shape[0], device, compute_dtype, hidden)
    tolerance = (support_mass_tolerance(teacher_logprobs.dtype, teacher_logprobs.shape[-1])
                 if teacher_logprobs is not None else 0.0)
    return fused_loss(
        _chunked_linear.OP_NAME, *tensors, teacher_indices, labels, mask, num_items, None, divergence, float(beta), tail == "renormalize",
        float(temperature), float(soft_weight), float(hard_weight), int(ignore_index), float(label_smoothing),
        tolerance, validate, float(student_logit_scale), float(student_softcap or 0.0), float(teacher_logit_scale),
        float(teacher_softcap or 0.0), compute_dtype, reduction, int(chunk_rows), *wants, outputs=2)


def _check_tensor(name, x, dims=None):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point() or x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{name} must be a float32, float64, float16 or bfloat16 tensor, got {x.dtype}")
    if dims is not None and x.dim() != dims:
        raise ValueError(f"{name} must have {dims} dimension{'s' if dims > 1 else ''}, got shape {tuple(x.shape)}")


def _check_positive(name, value, allow_none=False):
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a Python number{' or None' if allow_none else ''}, got {type(value).__name__}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be finite and > 0, got {value}")


def _check_layer(side, hidden, weight, bias, autocast):
    """One layer's hidden states, weight and bias: shapes and dtypes."""
    _check_tensor(f"{side}_hidden", hidden)
    if hidden.dim() < 1:
        raise ValueError(f"{side}_hidden must have shape (..., H), got a 0-dim tensor")
    _check_tensor(f"{side}_weight", weight, dims=2)
    if weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"{side}_weight must have shape (V, H) with H = {side}_hidden.shape[-1] = {hidden.shape[-1]}, "
            f"got {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError(f"{side}_weight must have a non-empty vocabulary (first) dimension, got {tuple(weight.shape)}")
    named = [(f"{side}_hidden", hidden), (f"{side}_weight", weight)]
    if bias is not None:
        _check_tensor(f"{side}_bias", bias, dims=1)
        if bias.shape[0] != weight.shape[0]:
            raise ValueError(f"{side}_bias must have shape (V,) = ({weight.shape[0]},), got {tuple(bias.shape)}")
        named.append((f"{side}_bias", bias))
    if not autocast and len({x.dtype for _, x in named}) > 1:
        listed = ", ".join(f"{name} {x.dtype}" for name, x in named)
        raise TypeError(f"{listed}: a layer's tensors must share one dtype (or run under torch.autocast)")


def check_linear_args(student_hidden, student_weight, teacher_logits, teacher_hidden, teacher_weight, student_bias,
                      teacher_bias, temperature, reduction, mask, chunk_rows, student_logit_scale, teacher_logit_scale,
                      student_softcap, teacher_softcap, teacher_required=True):
    """Raises TypeError/ValueError naming the first problem; returns the dtype the matmuls run in. A dense
    teacher (logits, or hidden states and a weight) is required unless `teacher_required` is False (the
    caller checks its other forms)."""
    device_type = student_hidden.device.type if isinstance(student_hidden, torch.Tensor) else "cpu"
    # Autocast exists for some device types only (not "meta"): elsewhere it is off.
    autocast = torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type)
    _check_layer("student", student_hidden, student_weight, student_bias, autocast)
    compute_dtype = torch.get_autocast_dtype(device_type) if autocast else student_hidden.dtype
    leading = tuple(student_hidden.shape[:-1])
    vocab = student_weight.shape[0]
    given_hidden = teacher_hidden is not None or teacher_weight is not None or teacher_bias is not None
    if teacher_logits is not None and given_hidden:
        raise ValueError("give the teacher either as teacher_logits or as teacher_hidden and teacher_weight, not both")
    if (teacher_required or given_hidden) and teacher_logits is None and (teacher_hidden is None or teacher_weight is None):
        raise ValueError(
            "the teacher is missing: give teacher_logits, or both teacher_hidden and teacher_weight "
            f"(got teacher_hidden={'a tensor' if teacher_hidden is not None else None}, "
            f"teacher_weight={'a tensor' if teacher_weight is not None else None})")
    tensors = [("student_hidden", student_hidden), ("student_weight", student_weight), ("student_bias", student_bias)]
    if teacher_logits is not None:
        _check_tensor("teacher_logits", teacher_logits)
        if tuple(teacher_logits.shape) != leading + (vocab,):
            raise ValueError(
                f"teacher_logits must have shape {leading + (vocab,)} (the hidden states' leading shape and V), "
                f"got {tuple(teacher_logits.shape)}")
        if teacher_logits.dtype != compute_dtype:
            raise TypeError(
                f"teacher_logits must have the dtype of the student's logits, {compute_dtype}, got {teacher_logits.dtype}")
        tensors.append(("teacher_logits", teacher_logits))
    elif teacher_hidden is not None:
        _check_layer("teacher", teacher_hidden, teacher_weight, teacher_bias, autocast)
        if tuple(teacher_hidden.shape[:-1]) != leading:
            raise ValueError(
                f"teacher_hidden must have the student's leading shape {leading}, got {tuple(teacher_hidden.shape[:-1])}")
        if teacher_weight.shape[0] != vocab:
            raise ValueError(
                f"student and teacher vocabularies differ: student_weight has V = {vocab}, teacher_weight "
                f"{teacher_weight.shape[0]}")
        if not autocast and teacher_hidden.dtype != compute_dtype:
            raise TypeError(
                f"student and teacher layers must share one dtype (or run under torch.autocast), got "
                f"{compute_dtype} and {teacher_hidden.dtype}")
        tensors += [("teacher_hidden", teacher_hidden), ("teacher_weight", teacher_weight), ("teacher_bias", teacher_bias)]
    devices = {x.device for _, x in tensors if x is not None}
    if len(devices) > 1:
        listed = ", ".join(f"{name} on {x.device}" for name, x in tensors if x is not None)
        raise ValueError(f"all tensors must be on one device, got {listed}")
    check_temperature(temperature, compute_dtype)
    check_reduction(reduction)
    check_mask(mask, leading, student_hidden.device, "the hidden states")
    check_linear_options(chunk_rows, student_logit_scale, teacher_logit_scale, student_softcap, teacher_softcap)
    if teacher_hidden is None and (teacher_logit_scale != 1.0 or teacher_softcap is not None):
        raise ValueError(
            f"teacher_logit_scale ({teacher_logit_scale}) and teacher_softcap ({teacher_softcap}) apply to logits built "
            "from teacher_hidden and teacher_weight; teacher_logits (or a top-k teacher) are used as given: apply "
            "them to those yourself")
    return compute_dtype


def check_linear_options(chunk_rows, student_logit_scale, teacher_logit_scale, student_softcap, teacher_softcap):
    """The options of the linear losses beyond those of the logits losses (also LinearKLDivLoss's checks)."""
    if chunk_rows is not None:
        if isinstance(chunk_rows, bool) or not isinstance(chunk_rows, int):
            raise TypeError(f"chunk_rows must be an int or None, got {type(chunk_rows).__name__}")
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be at least 1, got {chunk_rows}")
    _check_positive("student_logit_scale", student_logit_scale)
    _check_positive("teacher_logit_scale", teacher_logit_scale)
    _check_positive("student_softcap", student_softcap, allow_none=True)
    _check_positive("teacher_softcap", teacher_softcap, allow_none=True)
