"""The chunk loop every fused linear loss shares (linear_kl_div, linear_jsd): logits built from hidden
states and an output layer a chunk of rows at a time, so that no (rows x V) tensor ever exists.

Per chunk of C counted rows (masked rows are dropped before the matmul, so they are never read and
cost nothing):

    z_s = post(h_s W_s^T + b_s)            post: logit scale, then softcap c tanh(z / c)
    z_t = post(h_t W_t^T + b_t)            (or the given teacher logits' rows)
    loss_c, dz_s, dz_t = row op(z_s, z_t)  the fused kernel of the device, gradients in the same pass
    dh_s[c] = (dz_s post') W_s,   dW_s += (dz_s post')^T h_s,   db_s += sum of rows of (dz_s post')
    and likewise for the teacher's tensors when they require grad.

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

Host synchronisation: one per call, to count the rows the mask keeps (their number sets the chunk
shapes); none without a mask.
"""

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from kl_fused._fused_loss import register_fused_loss_autograd

OP_NAME = "kl_fused::chunked_linear_loss"

# The differentiable tensors of the op, in argument (and gradient output) order.
GRAD_INPUTS = ("student_hidden", "student_weight", "student_bias", "teacher_logits", "teacher_hidden",
               "teacher_weight", "teacher_bias")


def _row_loss(loss, loss_param):
    """The fused row op of a loss: (z_s, z_t, temperature, student_grad, teacher_grad) -> (per-row
    losses, dz_s, dz_t), the gradients of the chunk's sum of row losses."""
    if loss == "kl":
        reverse = loss_param != 0.0
        return lambda s, t, temperature, gs, gt: torch.ops.kl_fused.kl_div_logits(
            s, t, None, temperature, reverse, "none", gs, gt)
    if loss == "jsd":
        return lambda s, t, temperature, gs, gt: torch.ops.kl_fused.jsd_logits(
            s, t, None, loss_param, temperature, "none", gs, gt)
    raise ValueError(f"unknown row loss {loss!r}")


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
    mask: Optional[Tensor],
    row_weights: Optional[Tensor],
    loss: str,
    loss_param: float,
    temperature: float,
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
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The loss over the rows of (..., H) hidden states (see linear_kl_div for the contract), and the
    gradients the flags ask for at upstream gradient 1 (times row_weights per row when given).
    Arguments are checked by the public functions. softcap 0 means none."""
    with torch.autocast(student_hidden.device.type, enabled=False):
        return _run_chunks(**locals())


def _run_chunks(student_hidden, student_weight, student_bias, teacher_logits, teacher_hidden, teacher_weight,
                teacher_bias, mask, row_weights, loss, loss_param, temperature, student_scale, student_softcap,
                teacher_scale, teacher_softcap, compute_dtype, reduction, chunk_rows, grad_student_hidden,
                grad_student_weight, grad_student_bias, grad_teacher_logits, grad_teacher_hidden,
                grad_teacher_weight, grad_teacher_bias):
    device = student_hidden.device
    leading = student_hidden.shape[:-1]
    rows = leading.numel()
    vocab = student_weight.shape[0]
    acc_dtype = torch.float64 if compute_dtype == torch.float64 else torch.float32
    row_op = _row_loss(loss, loss_param)
    student_post = _LogitsPost(student_scale, student_softcap)
    teacher_post = _LogitsPost(teacher_scale, teacher_softcap)
    from_teacher_hidden = teacher_logits is None
    need_student = grad_student_hidden or grad_student_weight or grad_student_bias
    need_teacher = grad_teacher_logits or grad_teacher_hidden or grad_teacher_weight or grad_teacher_bias

    # Rows that count, in order; the mask's count is the one host synchronisation.
    flat_mask = mask.reshape(-1) if mask is not None else None
    kept = flat_mask.nonzero().squeeze(1) if flat_mask is not None else None
    counted = kept.numel() if kept is not None else rows

    # Weights and biases in the matmul's dtype, once per call (autocast's cast of the layer).
    w_s = student_weight.to(compute_dtype)
    b_s = student_bias.to(compute_dtype) if student_bias is not None else None
    if from_teacher_hidden:
        w_t = teacher_weight.to(compute_dtype)
        b_t = teacher_bias.to(compute_dtype) if teacher_bias is not None else None
    h_s_rows = _Rows(student_hidden)
    t_rows = _Rows(teacher_hidden if from_teacher_hidden else teacher_logits)

    # The reduction's denominator: applied to each chunk's C x H (or teacher C x V) rows as they are
    # written, and once to the accumulated weight and bias gradients at the end.
    denominator = {"none": 1, "sum": 1, "batchmean": max(counted, 1), "mean": max(counted, 1) * vocab}[reduction]

    def rows_gradient(like, needed):
        """A gradient whose rows are written once each (hidden states, teacher logits)."""
        return torch.zeros(like.shape, dtype=like.dtype, device=device).view(-1, like.shape[-1]) if needed else None

    row_loss = torch.zeros(rows, dtype=acc_dtype, device=device) if reduction == "none" else None
    total = torch.zeros((), dtype=acc_dtype, device=device)
    grad_h_s = rows_gradient(student_hidden, grad_student_hidden)
    grad_w_s = None  # the weights' accumulators: allocated by the first chunk's product
    grad_b_s = _accumulator(student_bias, grad_student_bias)
    grad_t_logits = rows_gradient(teacher_logits, grad_teacher_logits)
    grad_h_t = rows_gradient(teacher_hidden, grad_teacher_hidden)
    grad_w_t = None
    grad_b_t = _accumulator(teacher_bias, grad_teacher_bias)

    def finish_rows(values):
        """A chunk's rows of a gradient, divided by the denominator in acc_dtype, rounded once later."""
        return values.to(acc_dtype).div_(denominator) if denominator != 1 else values

    for start in range(0, counted, chunk_rows):
        end = min(start + chunk_rows, counted)
        chunk = kept[start:end] if kept is not None else slice(start, end)
        h_s = h_s_rows.take(chunk).to(compute_dtype)
        z_s, s_saved = student_post.forward(torch.nn.functional.linear(h_s, w_s, b_s))
        if from_teacher_hidden:
            h_t = t_rows.take(chunk).to(compute_dtype)
            z_t, t_saved = teacher_post.forward(torch.nn.functional.linear(h_t, w_t, b_t))
        else:
            h_t, t_saved = None, None
            z_t = t_rows.take(chunk).to(compute_dtype)
        chunk_row_losses, dz_s, dz_t = row_op(z_s, z_t, temperature, need_student, need_teacher)
        del z_s, z_t
        total += chunk_row_losses.sum()
        if row_loss is not None:
            _put_rows(row_loss, chunk, chunk_row_losses)
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

    if grad_w_s is None:  # no counted rows
        grad_w_s = _accumulator(student_weight, grad_student_weight)
    if grad_w_t is None:
        grad_w_t = _accumulator(teacher_weight, grad_teacher_weight)
    result_loss = row_loss.view(leading) if reduction == "none" else total / denominator
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
    )
    grads = []
    for grad, like, accumulated in outputs:
        if grad is None:
            grads.append(student_hidden.new_empty((0,)))
        elif not accumulated:
            grads.append(grad.view(like.shape))
        else:
            grads.append((grad.div_(denominator) if denominator != 1 else grad).to(like.dtype))
    return (result_loss,) + tuple(grads)


def _weighted(grad, factors):
    if factors is None:
        return grad
    return (grad.to(factors.dtype) * factors).to(grad.dtype)


@chunked_linear_loss.register_fake
def _chunked_linear_loss_fake(student_hidden, student_weight, student_bias, teacher_logits, teacher_hidden,
                              teacher_weight, teacher_bias, mask, row_weights, loss, loss_param, temperature,
                              student_scale, student_softcap, teacher_scale, teacher_softcap, compute_dtype,
                              reduction, chunk_rows, *flags):
    acc_dtype = torch.float64 if compute_dtype == torch.float64 else torch.float32
    loss_shape = student_hidden.shape[:-1] if reduction == "none" else ()
    result = student_hidden.new_empty(loss_shape, dtype=acc_dtype)
    tensors = (student_hidden, student_weight, student_bias, teacher_logits, teacher_hidden, teacher_weight, teacher_bias)
    grads = tuple(
        (t.new_empty(t.shape) if flag else t.new_empty((0,))) if t is not None else student_hidden.new_empty((0,))
        for t, flag in zip(tensors, flags)
    )
    return (result,) + grads


# Tensor arguments 0..6 are the differentiable ones; their flags are arguments 19..25; argument 8
# carries per-row upstream weights into a backward of reduction "none".
register_fused_loss_autograd(OP_NAME, grad_inputs=tuple(range(7)), grad_flags=tuple(range(19, 26)), row_weights_arg=8,
                             public_name=lambda args: "linear_kl_div" if args[9] == "kl" else "linear_jsd")
