"""The pure-PyTorch reference of kl_fused.sparse_kl_div: same signature and contract, differentiable.

The oracle the fused kernels are tested against (in float64), and the path taken on devices without a
compiled kernel. It materialises (rows x V) buffers (the log-softmax, the support's scatter), which is
what the fused kernels avoid.
"""

import torch

from kl_fused._sparse_args import check_sparse_args, support_mass_tolerance

NEG_INF = float("-inf")


def support_status(indices, logprobs, vocab, counted_rows, tail, tolerance):
    """(rows,) bool each for: an index out of range on a used slot, a duplicate in the support, and
    (bucket) a support mass above 1 + tolerance -- the problems the kernels report per row."""
    used = (logprobs != NEG_INF) & counted_rows.unsqueeze(-1)
    out_of_range = (used & ((indices < 0) | (indices >= vocab))).any(-1)
    # Unused slots get distinct negative ids, so that only used ones can collide.
    slots = torch.arange(indices.shape[-1], device=indices.device)
    ids = torch.where(used, indices.long(), -1 - slots).sort(-1).values
    duplicate = (ids[..., 1:] == ids[..., :-1]).any(-1) & ~out_of_range
    mass = torch.where(used, logprobs.double(), NEG_INF).exp().sum(-1)
    mass_above_one = (mass > 1.0 + tolerance) if tail == "bucket" else torch.zeros_like(out_of_range)
    return out_of_range, duplicate, mass_above_one & ~out_of_range & ~duplicate


def _raise_on_bad_support(out_of_range, duplicate, mass_above_one, tolerance, vocab):
    if out_of_range.any():
        raise ValueError(
            f"teacher_indices must lie in [0, V) = [0, {vocab}) on every used slot (one whose teacher_logprobs is "
            f"not -inf), but row {int(out_of_range.nonzero()[0, 0])} has one outside"
        )
    if duplicate.any():
        raise ValueError(
            f"teacher_indices holds the same token id twice among the used slots of row "
            f"{int(duplicate.nonzero()[0, 0])}; each token may appear once in a row's support"
        )
    if mass_above_one.any():
        raise ValueError(
            f"the teacher's support mass sum(exp(teacher_logprobs)) in row {int(mass_above_one.nonzero()[0, 0])} is above 1 "
            f"by more than the rounding tolerance {tolerance:g} of its dtype"
        )


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
    """KL against a teacher known by its top-k log-probabilities; see kl_fused.sparse_kl_div."""
    check_sparse_args(student_logits, teacher_indices, teacher_logprobs, temperature, tail, reduction, mask, validate)
    tolerance = support_mass_tolerance(teacher_logprobs.dtype, teacher_indices.shape[-1])
    return sparse_kl_div_at_tolerance(student_logits, teacher_indices, teacher_logprobs, temperature, tail, reduction,
                                      mask, validate, tolerance)


def sparse_kl_div_at_tolerance(student_logits, teacher_indices, teacher_logprobs, temperature, tail, reduction, mask,
                               validate, tolerance):
    """sparse_kl_div with the support-mass tolerance given (the tests' float64 oracle keeps the tolerance
    of the dtype the log-probs came in)."""
    acc = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    vocab, slots = student_logits.shape[-1], teacher_indices.shape[-1]
    leading = student_logits.shape[:-1]
    s = student_logits.reshape(-1, vocab).to(acc)
    idx = teacher_indices.reshape(-1, slots)
    lp_in = teacher_logprobs.reshape(-1, slots)
    lp = lp_in.to(acc)
    counted = mask.reshape(-1) if mask is not None else torch.ones(s.shape[0], dtype=torch.bool, device=s.device)
    bad = support_status(idx, lp_in, vocab, counted, tail, tolerance)
    if validate and not student_logits.is_meta:  # meta tensors hold no values to check: shapes only
        _raise_on_bad_support(*bad, tolerance, vocab)
    invalid = bad[0] | bad[1] | bad[2]

    # Rows that do not count, and rows whose support is invalid, are kept out of the math (and its
    # gradient): they may hold NaN or garbage, and their indices may be out of range.
    live = counted & ~invalid
    s = torch.where(live.unsqueeze(-1), s, 0.0)
    used = (lp != NEG_INF) & live.unsqueeze(-1)
    safe_idx = torch.where(used, idx.long(), 0)
    safe_lp = torch.where(used, lp, 0.0)
    p = torch.where(used, safe_lp.exp(), 0.0)
    b = s / temperature
    b_support = b.gather(-1, safe_idx)

    if tail == "renormalize":
        lse_q = torch.where(used, b_support, NEG_INF).logsumexp(-1, keepdim=True)
        lse_p = torch.where(used, safe_lp, NEG_INF).logsumexp(-1, keepdim=True)
        has_support = used.any(-1, keepdim=True)
        log_qt = torch.where(used, b_support - torch.where(has_support, lse_q, 0.0), 0.0)
        log_pt = torch.where(used, safe_lp - torch.where(has_support, lse_p, 0.0), 0.0)
        pt = torch.where(used, log_pt.exp(), 0.0)
        row_loss = torch.where(pt != 0, pt * (log_pt - log_qt), 0.0).sum(-1)
    else:
        log_z = b.logsumexp(-1, keepdim=True)
        log_q_support = torch.where(used, b_support - log_z, 0.0)
        row_loss = torch.where(p != 0, p * (safe_lp - log_q_support), 0.0).sum(-1)
        # The complement's mass, summed over the complement (1 - sum_S q would cancel).
        # scatter_add: an unused slot's placeholder index 0 must not clear a used slot's token 0.
        in_support = torch.zeros_like(b, dtype=torch.int32).scatter_add(-1, safe_idx, used.to(torch.int32)) > 0
        rest_count = vocab - used.sum(-1)
        rest_b = torch.where(in_support | (rest_count == 0).unsqueeze(-1), NEG_INF, b)
        has_rest = (rest_count > 0) & (rest_b > NEG_INF).any(-1)
        log_qr = torch.where(has_rest, torch.where(has_rest.unsqueeze(-1), rest_b, 0.0).logsumexp(-1) - log_z[:, 0],
                             NEG_INF)
        mass = p.sum(-1)
        p_r = torch.where(rest_count > 0, (1.0 - mass).clamp_min(0.0), 0.0)
        bucket = torch.where(p_r != 0, p_r * (torch.where(p_r != 0, p_r, 1.0).log() - log_qr), 0.0)
        row_loss = row_loss + bucket

    row_loss = torch.where(invalid, float("nan"), torch.where(counted, row_loss, 0.0))
    if reduction == "none":
        return row_loss.reshape(leading)
    total = row_loss.sum()
    if reduction == "sum":
        return total
    count = counted.sum().clamp_min(1).to(acc)
    if reduction == "mean":
        count = count * vocab
    return total / count
