"""kl_fused.sparse_kl_div and kl_fused.topk_teacher: distillation from a teacher known only by its
top-k log-probabilities (an offline cache, or an inference server's logprobs)."""

import torch

from kl_fused import _sparse_ops  # also registers the op's fake kernel and autograd
from kl_fused._fused_loss import fused_loss
from kl_fused._ops import fused_path
from kl_fused._sparse_args import check_sparse_args, check_topk_args, support_mass_tolerance
from kl_fused._sparse_reference import sparse_kl_div as _reference


def sparse_kl_div(
    student_logits,
    teacher_indices,
    teacher_logprobs,
    *,
    temperature=1.0,
    tail="bucket",
    reduction="batchmean",
    mask=None,
    validate=True,
):
    r"""KL(teacher || student) where the teacher is known by K (token id, log-probability) slots per row.

    Per row, with q = softmax(student_logits / temperature) over the whole vocabulary, the support S =
    the slots whose log-prob is not -inf (a -inf slot is unused and its index never read, so rows may
    carry fewer than K entries), and p_k = exp(teacher_logprobs[k]):

    - ``tail="bucket"``: the exact KL of the two distributions coarsened to the support plus one
      outcome "everything else": sum_S p_k log(p_k / q_{i_k}) + p_r log(p_r / q_r), with
      p_r = 1 - sum_S p and q_r the student's mass off the support, summed over the complement (exact
      however confident the student). A lower bound of the full KL that keeps the teacher's mass
      outside the top-k. TRL's ``loss_add_tail=True``.
    - ``tail="renormalize"``: KL between p and q_S, each renormalized over the support: the classic
      top-k KD, TRL's ``loss_add_tail=False``. Only the support's logits are read (and only its
      scores' differences matter, so teacher_logprobs may be any scores there).

    Args:
        student_logits: ``(..., V)`` float32, bfloat16, float16 or float64. Non-contiguous leading dims
            (a shifted view ``logits[:, :-1]``) are read in place.
        teacher_indices: ``(..., K)`` int64 or int32 token ids, K >= 1.
        teacher_logprobs: ``(..., K)`` float log-probabilities of those ids (any float dtype; the
            gradient comes back in it). Used as given: temperature divides the student only.
        temperature: finite ``T > 0`` dividing the student's logits. No ``T**2`` factor is applied.
        tail: ``"bucket"`` or ``"renormalize"``, as above.
        reduction: ``"none"`` (one KL per row, of the leading shape), ``"sum"``, ``"batchmean"``
            (sum / counted rows) or ``"mean"`` (sum / (counted rows * V)), as in kl_div_logits.
        mask: optional bool tensor of the leading shape; rows where it is False contribute nothing, get
            zero gradients and are never read (they may hold NaN or any indices).
        validate: check every counted row's support and raise ValueError for an index outside [0, V)
            on a used slot, a token id used twice, or (bucket) a support mass sum_S p above
            1 + u (1 + ln K), u the unit roundoff of teacher_logprobs' dtype (2^-8 bfloat16, 2^-11
            float16, 2^-16 float32/float64): within it p_r = 0, as 16-bit rounding of a top-heavy
            teacher can give. The kernels find these problems as they go; raising needs the result on
            the host, which on CUDA is one synchronisation per call. ``validate=False`` skips it
            (for CUDA graphs, or a cache checked once): such rows then get a NaN loss and NaN
            gradients instead, and nothing is read out of bounds.

    Returns:
        The loss: float32 for 16-bit logits, else the logits' dtype. Gradients flow to the student
        and, when it requires grad, to teacher_logprobs; the forward pass computes them.
    """
    check_sparse_args(student_logits, teacher_indices, teacher_logprobs, temperature, tail, reduction, mask, validate)
    if not fused_path("sparse_kl_div", student_logits.device):
        return _reference(student_logits, teacher_indices, teacher_logprobs, temperature=temperature, tail=tail,
                          reduction=reduction, mask=mask, validate=validate)
    grad_enabled = torch.is_grad_enabled()
    return fused_loss(
        _sparse_ops.OP_NAME,
        student_logits,
        teacher_indices,
        teacher_logprobs,
        mask,
        float(temperature),
        tail == "renormalize",
        reduction,
        support_mass_tolerance(teacher_logprobs.dtype, teacher_indices.shape[-1]),
        validate,
        grad_enabled and student_logits.requires_grad,
        grad_enabled and teacher_logprobs.requires_grad,
    )


@torch.no_grad()
def topk_teacher(teacher_logits, k, *, temperature=1.0):
    """The teacher's k most likely tokens per row and their log-probabilities at `temperature`, for an
    offline cache that sparse_kl_div trains from.

    Args:
        teacher_logits: ``(..., V)`` float logits.
        k: 1 <= k <= V.
        temperature: finite T > 0; the log-probabilities are log_softmax(teacher_logits / T).

    Returns:
        ``(indices, logprobs)``, each ``(..., k)``, most likely first: int32 token ids and float32
        log-probabilities (float64 for float64 logits). Cast logprobs to bfloat16 to store 6 bytes per
        slot; sparse_kl_div accepts it as it is. With k = V, ``sparse_kl_div(s, indices, logprobs,
        temperature=T)`` equals ``kl_div_logits(s, teacher_logits, temperature=T)``.
    """
    check_topk_args(teacher_logits, k, temperature)
    acc = torch.float64 if teacher_logits.dtype == torch.float64 else torch.float32
    # Order first, on the raw logits (dividing by T > 0 keeps it); log-probs only for the k kept.
    values, indices = teacher_logits.topk(k, dim=-1, sorted=True)
    log_z = (teacher_logits.to(acc) / temperature).logsumexp(-1, keepdim=True)
    logprobs = values.to(acc) / temperature - log_z
    return indices.to(torch.int32), logprobs
