"""The chunk loop every fused linear loss shares (linear_kl_div, linear_jsd, linear_distillation_loss):
logits built from hidden states and an output layer a chunk of rows at a time, so that no (rows x V)
tensor ever exists.

Per chunk of C counted rows (rows masked out, or whose label is ignore_index, are dropped before the
matmul, so they are never read and cost nothing):

    z_s = post(h_s W_s^T + b_s)            post: logit scale, then softcap c tanh(z / c)
    z_t = post(h_t W_t^T + b_t)            (or the given teacher logits' rows, or top-k slots, or none)
    loss_c, dz_s, dz_t = row op(z_s, z_t)  the distillation step's fused kernel of the device
                                           (distill.py): the soft divergence and the hard cross-entropy
                                           on the chunk's labels, both weights folded into the gradients
    dh_s[c] = (dz_s post') W_s,   dW_s += (dz_s post')^T h_s,   db_s += sum of rows of (dz_s post')
    and likewise for the teacher's tensors (or top-k log-probs) when they require grad.

Weight and bias gradients of 16-bit layers accumulate in fp32 across chunks and are rounded once at
the end; each chunk's product is added in fp32 too (on CUDA by addmm with out_dtype, elsewhere in
fp32 arithmetic), never rounded to 16 bits first. Memory beyond the inputs and the returned
gradients: a few C x V buffers and the fp32 accumulators, whatever the number of rows.

The whole loop is one custom op, kl_fused::chunked_linear_loss (opaque to torch.compile, which
therefore never graph-breaks inside the loss), with the autograd every fused loss shares
(_fused_loss.py): the forward returns the gradients at upstream gradient 1 already multiplied by the
reduction's factor, backward scales them by the (scalar) upstream gradient. A per-row upstream
gradient (reduction "none") cannot be applied to a weight's gradient after the fact, so there the
forward computes the loss only and backward runs the loop again with the rows weighted.

Host synchronisation: one per call to count the rows that count (their number sets the chunk
shapes) when there is a mask or labels, none otherwise; with validate, one more on CUDA at the end
of the loop to raise on a bad label or top-k slot (not one per chunk). num_items_in_batch on the
device is read there.
"""

import re
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from kl_fused._fused_loss import register_fused_loss_autograd

OP_NAME = "kl_fused::chunked_linear_loss"

# The differentiable tensors of the op, in argument (and gradient output) order.
GRAD_INPUTS = ("student_hidden", "student_weight", "student_bias", "teacher_logits", "teacher_hidden",
               "teacher_weight", "teacher_bias", "teacher_logprobs")


class _LogitsPost:
    """z = c tanh(scale l / c) (softcap c > 0) or z = scale l, on a chunk's logits, and the chain
    rule back through it. Computed in fp32 for 16-bit logits, rounded once."""

    def __init__(self, scale, softcap):
        self.scale, self.softcap = scale, softcap
        self.identity = scale == 1.0 and softcap == 0.0

    def forward(self, logits):
        """(z, what backward needs)."""
        if self.identity:
            return logits, None
        if self.softcap == 0.0:
            return logits.mul_(self.scale), None
        work = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
        tanh = torch.tanh(work.mul_(self.scale / self.softcap))
        return (tanh * self.softcap).to(logits.dtype), tanh

    def backward(self, grad_z, tanh):
        """dl from dz (in place where possible)."""
        if self.identity:
            return grad_z
        if tanh is None:
            return grad_z.mul_(self.scale)
        # d/dl c tanh(s l / c) = s (1 - tanh^2)
        return (grad_z.to(tanh.dtype) * (1.0 - tanh * tanh)).mul_(self.scale).to(grad_z.dtype)


def _accumulate_product(acc, like, a, b):
    """acc + a @ b, summed in fp32 for a 16-bit layer (`like`), else in its dtype: the product is never
    rounded to 16 bits first. acc None (the first chunk) allocates it here, once the chunk's logits
    are freed, so that a step's peak never holds both (with one chunk, no more than materialising)."""
    if acc is None:
        acc = _accumulator(like, True)
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif acc.device.type == "cuda":
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))
    return acc


def _accumulator(like, needed):
    """A zeroed gradient accumulator for `like`: fp32 for 16-bit tensors, else like's dtype."""
    if not needed or like is None:
        return None
    dtype = torch.float32 if like.dtype in (torch.float16, torch.bfloat16) else like.dtype
    return torch.zeros(like.shape, dtype=dtype, device=like.device)


class _Rows:
    """Row access to a (..., X) tensor of any strides, by flat row indices, without copying it whole."""

    def __init__(self, x):
        self.x = x
        self.leading = x.shape[:-1]
        try:
            self.flat = x.view(-1, x.shape[-1])
        except RuntimeError:  # not viewable as (rows, X): gather rows through their multi-index
            self.flat = None

    def take(self, rows):
        """The rows `rows` (a slice or an index tensor) as a (len, X) tensor; a view where possible."""
        if self.flat is not None:
            return self.flat[rows] if isinstance(rows, slice) else self.flat.index_select(0, rows)
        index = torch.arange(rows.start, rows.stop, device=self.x.device) if isinstance(rows, slice) else rows
        return self.x[torch.unravel_index(index, self.leading)]


def _put_rows(dest, rows, values):
    """dest[rows] = values for a (N, X) dest and a slice or an index tensor of rows."""
    if isinstance(rows, slice):
        dest[rows].copy_(values)
    else:
        dest.index_copy_(0, rows, values.to(dest.dtype))


@torch.library.custom_op(OP_NAME, mutates_args=())
def chunked_linear_loss(
    student_hidden: Tensor,
    student_weight: Tensor,
    student_bias: Optional[Tensor],
    teacher_logits: Optional[Tensor],
    teacher_hidden: Optional[Tensor],
    teacher_weight: Optional[Tensor],
    teacher_bias: Optional[Tensor],
    teacher_logprobs: Optional[Tensor],
    teacher_indices: Optional[Tensor],
    labels: Optional[Tensor],
    mask: Optional[Tensor],
    num_items: Optional[Tensor],
    row_weights: Optional[Tensor],
    divergence: str,
    beta: float,
    renormalize: bool,
    temperature: float,
    soft_weight: float,
    hard_weight: float,
    ignore_index: int,
    label_smoothing: float,
    mass_tolerance: float,
    validate: bool,
    student_scale: float,
    student_softcap: float,
    teacher_scale: float,
    teacher_softcap: float,
    compute_dtype: torch.dtype,
    reduction: str,
    chunk_rows: int,
    grad_student_hidden: bool,
    grad_student_weight: bool,
    grad_student_bias: bool,
    grad_teacher_logits: bool,
    grad_teacher_hidden: bool,
    grad_teacher_weight: bool,
    grad_teacher_bias: bool,
    grad_teacher_logprobs: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The loss over the rows of (..., H) hidden states (see linear_distillation_loss for the contract),
    the gradients the flags ask for at upstream gradient 1 (times row_weights per row when given), and
    the unweighted soft and hard parts reduced alike. Arguments are checked by the public functions.
    softcap 0 means none."""
    with torch.autocast(student_hidden.device.type, enabled=False):
        return _run_chunks(**locals())


def _divide(x, denominator):
    """x / denominator in place, for a Python number or a count on the device (>= 1 as the kernels read it)."""
    if isinstance(denominator, torch.Tensor):
        return x.div_(denominator.clamp_min(1).to(x.dtype))
    return x.div_(denominator) if denominator != 1 else x


def _run_chunks(student_hidden, student_weight, student_bias, teacher_logits, teacher_hidden, teacher_weight,
                teacher_bias, teacher_logprobs, teacher_indices, labels, mask, num_items, row_weights, divergence, beta,
                renormalize, temperature, soft_weight, hard_weight, ignore_index, label_smoothing, mass_tolerance,
                validate, student_scale, student_softcap, teacher_scale, teacher_softcap, compute_dtype, reduction,
                chunk_rows, grad_student_hidden, grad_student_weight, grad_student_bias, grad_teacher_logits,
                grad_teacher_hidden, grad_teacher_weight, grad_teacher_bias, grad_teacher_logprobs):
    device = student_hidden.device
    leading = student_hidden.shape[:-1]
    rows = leading.numel()
    vocab = student_weight.shape[0]
    acc_dtype = torch.float64 if compute_dtype == torch.float64 else torch.float32
    student_post = _LogitsPost(student_scale, student_softcap)
    teacher_post = _LogitsPost(teacher_scale, teacher_softcap)
    from_teacher_hidden = teacher_hidden is not None
    need_student = grad_student_hidden or grad_student_weight or grad_student_bias
    need_teacher = grad_teacher_logits or grad_teacher_hidden or grad_teacher_weight or grad_teacher_bias

    # Rows that count, in order: the mask's, less those labelled ignore_index; their count is the one
    # host synchronisation.
    counted_mask = mask.reshape(-1) if mask is not None else None
    flat_labels = labels.reshape(-1) if labels is not None else None
    if flat_labels is not None:
        labelled = flat_labels != ignore_index
        counted_mask = labelled if counted_mask is None else counted_mask & labelled
    kept = counted_mask.nonzero().squeeze(1) if counted_mask is not None else None
    counted = kept.numel() if kept is not None else rows

    # Weights and biases in the matmul's dtype, once per call (autocast's cast of the layer).
    w_s = student_weight.to(compute_dtype)
    b_s = student_bias.to(compute_dtype) if student_bias is not None else None
    if from_teacher_hidden:
        w_t = teacher_weight.to(compute_dtype)
        b_t = teacher_bias.to(compute_dtype) if teacher_bias is not None else None
    h_s_rows = _Rows(student_hidden)
    t_rows = _Rows(teacher_hidden) if from_teacher_hidden else (_Rows(teacher_logits) if teacher_logits is not None
                                                                else None)
    topk_rows = (_Rows(teacher_indices), _Rows(teacher_logprobs)) if teacher_indices is not None else None

    # The reduction's denominator: applied to each chunk's C x H (or teacher C x V) rows as they are
    # written, and once to the accumulated weight and bias gradients at the end.
    if reduction == "batchmean" and num_items is not None:
        denominator = num_items
    else:
        denominator = {"none": 1, "sum": 1, "batchmean": max(counted, 1), "mean": max(counted, 1) * vocab}[reduction]

    def rows_gradient(like, needed):
        """A gradient whose rows are written once each (hidden states, teacher logits or log-probs)."""
        return torch.zeros(like.shape, dtype=like.dtype, device=device).view(-1, like.shape[-1]) if needed else None

    row_parts = torch.zeros((2, rows), dtype=acc_dtype, device=device) if reduction == "none" else None
    row_loss = torch.zeros(rows, dtype=acc_dtype, device=device) if reduction == "none" else None
    total = torch.zeros((), dtype=acc_dtype, device=device)
    total_parts = torch.zeros(2, dtype=acc_dtype, device=device)
    grad_h_s = rows_gradient(student_hidden, grad_student_hidden)
    grad_w_s = None  # the weights' accumulators: allocated by the first chunk's product
    grad_b_s = _accumulator(student_bias, grad_student_bias)
    grad_t_logits = rows_gradient(teacher_logits, grad_teacher_logits)
    grad_h_t = rows_gradient(teacher_hidden, grad_teacher_hidden)
    grad_lp = rows_gradient(teacher_logprobs, grad_teacher_logprobs)
    grad_w_t = None
    grad_b_t = _accumulator(teacher_bias, grad_teacher_bias)

    def finish_rows(values):
        """A chunk's rows of a gradient, divided by the denominator in acc_dtype, rounded once later."""
        return _divide(values.to(acc_dtype), denominator) if not isinstance(denominator, int) or denominator != 1 \
            else values

    def take(rows_of, chunk):
        return rows_of.take(chunk) if rows_of is not None else None

    def chunk_inputs(chunk):
        """A chunk's student (h_s, z_s, saved), teacher (h_t, z_t, saved), top-k slots and labels."""
        h_s = h_s_rows.take(chunk).to(compute_dtype)
        z_s, s_saved = student_post.forward(torch.nn.functional.linear(h_s, w_s, b_s))
        h_t, t_saved, z_t = None, None, None
        if from_teacher_hidden:
            h_t = t_rows.take(chunk).to(compute_dtype)
            z_t, t_saved = teacher_post.forward(torch.nn.functional.linear(h_t, w_t, b_t))
        elif t_rows is not None:
            z_t = t_rows.take(chunk).to(compute_dtype)
        idx_c, lp_c = (take(topk_rows[0], chunk), take(topk_rows[1], chunk)) if topk_rows is not None else (None, None)
        labels_c = (flat_labels[chunk] if isinstance(chunk, slice) else flat_labels.index_select(0, chunk)) \
            if flat_labels is not None else None
        return (h_s, z_s, s_saved), (h_t, z_t, t_saved), (idx_c, lp_c, labels_c)

    def row_op(z_s, z_t, slots, kernel_validates, student_grad, teacher_grad, logprobs_grad):
        # Every row of the chunk counts: no mask, the labels' ignore_index never occurs here.
        return distillation_rows(
            z_s, z_t, *slots, None, None, divergence, beta, renormalize, temperature, soft_weight, hard_weight,
            ignore_index, label_smoothing, "none", mass_tolerance, kernel_validates, student_grad, teacher_grad,
            logprobs_grad)

    # validate on a device where reading the kernels' row status costs a host synchronisation: the
    # chunks run unvalidated (a bad label or top-k slot then makes its row's loss or part NaN, nothing
    # is read out of bounds), a flag on the device collects rows that are not finite, and one
    # synchronisation at the end reads it; only then are those rows run again, validated, to raise.
    deferred = validate and defers_validation(device)
    not_finite = torch.zeros((), dtype=torch.bool, device=device) if deferred else None

    for start in range(0, counted, chunk_rows):
        end = min(start + chunk_rows, counted)
        chunk = kept[start:end] if kept is not None else slice(start, end)
        (h_s, z_s, s_saved), (h_t, z_t, t_saved), slots = chunk_inputs(chunk)
        chunk_row_losses, dz_s, dz_t, dlp, parts = row_op(z_s, z_t, slots, validate and not deferred, need_student,
                                                          need_teacher and z_t is not None, grad_teacher_logprobs)
        del z_s, z_t, slots
        if deferred:
            not_finite |= ~(chunk_row_losses.isfinite().all() & parts.isfinite().all())
        total += chunk_row_losses.sum()
        total_parts += parts.sum(1)
        if row_loss is not None:
            _put_rows(row_loss, chunk, chunk_row_losses)
            _put_rows(row_parts.t(), chunk, parts.t())
        # Per-row upstream weights (backward of reduction "none") mix into weight gradients, so they
        # are applied here, to the chunk's logit gradients.
        factors = None
        if row_weights is not None:
            factors = (row_weights[chunk] if isinstance(chunk, slice) else row_weights.index_select(0, chunk))
            factors = factors.to(acc_dtype)[:, None]
        if need_student:
            g = _weighted(student_post.backward(dz_s, s_saved), factors)
            if grad_student_hidden:
                _put_rows(grad_h_s, chunk, finish_rows(g @ w_s))
            if grad_student_weight:
                grad_w_s = _accumulate_product(grad_w_s, student_weight, g.t(), h_s)
            if grad_student_bias:
                grad_b_s += g.sum(0, dtype=grad_b_s.dtype)
        if grad_teacher_logprobs:
            _put_rows(grad_lp, chunk, finish_rows(_weighted(dlp, factors)))
        if need_teacher:
            g = _weighted(teacher_post.backward(dz_t, t_saved) if from_teacher_hidden else dz_t, factors)
            if grad_teacher_logits:
                _put_rows(grad_t_logits, chunk, finish_rows(g))
            if grad_teacher_hidden:
                _put_rows(grad_h_t, chunk, finish_rows(g @ w_t))
            if grad_teacher_weight:
                grad_w_t = _accumulate_product(grad_w_t, teacher_weight, g.t(), h_t)
            if grad_teacher_bias:
                grad_b_t += g.sum(0, dtype=grad_b_t.dtype)

    if deferred and host_flag(not_finite):
        _raise_on_bad_rows(kept, counted, chunk_rows, chunk_inputs, row_op, leading)

    if grad_w_s is None:  # no counted rows
        grad_w_s = _accumulator(student_weight, grad_student_weight)
    if grad_w_t is None:
        grad_w_t = _accumulator(teacher_weight, grad_teacher_weight)
    if reduction == "none":
        result_loss, result_parts = row_loss.view(leading), row_parts.view((2, *leading))
    else:
        result_loss = _divide(total, denominator)
        result_parts = _divide(total_parts, denominator)
    # Rows gradients are written once per row, already divided; accumulators are divided here and
    # rounded once to their tensor's dtype.
    outputs = (
        (grad_h_s, student_hidden, False),
        (grad_w_s, student_weight, True),
        (grad_b_s, student_bias, True),
        (grad_t_logits, teacher_logits, False),
        (grad_h_t, teacher_hidden, False),
        (grad_w_t, teacher_weight, True),
        (grad_b_t, teacher_bias, True),
        (grad_lp, teacher_logprobs, False),
    )
    grads = []
    for grad, like, accumulated in outputs:
        if grad is None:
            grads.append(student_hidden.new_empty((0,)))
        elif not accumulated:
            grads.append(grad.view(like.shape))
        else:
            grads.append(_divide(grad, denominator).to(like.dtype))
    return (result_loss,) + tuple(grads) + (result_parts,)


def distillation_rows(*args):
    """The distillation step's row op on a chunk (kl_fused::distillation_loss, reduction "none")."""
    return torch.ops.kl_fused.distillation_loss(*args)


def defers_validation(device):
    """Whether validate reads the kernels' row status once per call instead of once per chunk: where
    reading it is a host synchronisation (every device but the CPU)."""
    return device.type != "cpu"


def host_flag(flag):
    """A 0-dim bool tensor read on the host: the one synchronisation of a deferred validation."""
    return bool(flag)


def _raise_on_bad_rows(kept, counted, chunk_rows, chunk_inputs, row_op, leading):
    """The error path of a deferred validation: reruns the chunks unvalidated to find the counted rows
    whose loss or parts are not finite, reruns each of those alone, validated, and raises the kernel's
    ValueError with the row named in the leading shape. Rows not finite for another reason
    (non-finite inputs) raise nothing, as without deferral."""
    for start in range(0, counted, chunk_rows):
        end = min(start + chunk_rows, counted)
        chunk = kept[start:end] if kept is not None else slice(start, end)
        (_, z_s, _), (_, z_t, _), slots = chunk_inputs(chunk)
        losses, _, _, _, parts = row_op(z_s, z_t, slots, False, False, False, False)
        for offset in (~(losses.isfinite() & parts.isfinite().all(0))).nonzero().flatten().tolist():
            row = int(kept[start + offset]) if kept is not None else start + offset
            one = kept[start + offset:start + offset + 1] if kept is not None else slice(row, row + 1)
            (_, z_s, _), (_, z_t, _), slots = chunk_inputs(one)
            try:
                row_op(z_s, z_t, slots, True, False, False, False)
            except ValueError as error:
                where = tuple(int(i) for i in torch.unravel_index(torch.tensor(row), tuple(leading)))
                named = f"row {where[0] if len(where) == 1 else where} of the leading shape {tuple(leading)}"
                raise ValueError(re.sub(r"\brow 0\b", named, str(error), count=1)) from None


def _weighted(grad, factors):
    if factors is None:
        return grad
    return (grad.to(factors.dtype) * factors).to(grad.dtype)


def public_name(args):
    """The public function that called the op, for messages, from its non-tensor arguments: the
    distillation step's with a hard term or a top-k teacher (hard_weight, argument 18; the support's
    mass tolerance, argument 21), else linear_jsd or linear_kl_div by the divergence (argument 13)."""
    if args[18] != 0.0 or args[21] != 0.0:
        return "linear_distillation_loss"
    return "linear_jsd" if args[13] == "jsd" else "linear_kl_div"


@chunked_linear_loss.register_fake
def _chunked_linear_loss_fake(student_hidden, student_weight, student_bias, teacher_logits, teacher_hidden,
                              teacher_weight, teacher_bias, teacher_logprobs, teacher_indices, labels, mask, num_items,
                              row_weights, divergence, beta, renormalize, temperature, soft_weight, hard_weight,
                              ignore_index, label_smoothing, mass_tolerance, validate, student_scale, student_softcap,
                              teacher_scale, teacher_softcap, compute_dtype, reduction, chunk_rows, *flags):
    acc_dtype = torch.float64 if compute_dtype == torch.float64 else torch.float32
    loss_shape = student_hidden.shape[:-1] if reduction == "none" else ()
    result = student_hidden.new_empty(loss_shape, dtype=acc_dtype)
    parts = student_hidden.new_empty((2, *loss_shape), dtype=acc_dtype)
    tensors = (student_hidden, student_weight, student_bias, teacher_logits, teacher_hidden, teacher_weight, teacher_bias,
               teacher_logprobs)
    grads = tuple(
        (t.new_empty(t.shape) if flag else t.new_empty((0,))) if t is not None else student_hidden.new_empty((0,))
        for t, flag in zip(tensors, flags)
    )
    return (result,) + grads + (parts,)


# Tensor arguments 0..7 are the differentiable ones; their flags are arguments 30..37; argument 12
# carries per-row upstream weights into a backward of reduction "none". The parts are the last output.
register_fused_loss_autograd(OP_NAME, grad_inputs=tuple(range(8)), grad_flags=tuple(range(30, 38)), row_weights_arg=12,
                             public_name=public_name, extra_outputs=1)
