"""Per-row math of a vocabulary split across ranks, without the collectives (kl_fused.distributed
runs those). Each rank holds a shard of every row; with a = t / T and b = s / T:

    partial state of a shard   m_a, m_b (the maxima of its raw logits t and s, -inf for a side that
                               is all -inf) and, relative to the shifts m (0 where m is -inf):
                               Z_a = sum e^(a'), Z_b = sum e^(b'), W = sum e^(x') (x' - y') with
                               a' = (t - m_a) / T, b' = (s - m_b) / T, x the side the expectation is
                               over (a for forward KL, b for reverse)
    all-reduce MAX             M_a, M_b of the full rows
    rescaled sums              each shard's Z_a, Z_b, W moved to the shifts M (the design's merge)
    all-reduce SUM             Z_a, Z_b, W of the full rows
    finish                     KL = W / Z_x - log Z_x + log Z_y; stats (M_a, M_b, log Z_a, log Z_b, KL)
    gradient of a shard        from the stats alone, no further communication

The maxima are those of the raw logits, and every shift is subtracted before dividing by T: a maximum
of a = t / T, rounded, would be off by up to half an ulp of max |t| / T, which from |t| / T ~ 1e9 in
float32 overflows e^(a - m) (and the merge's e^(m - M)).

The shard's partial state and gradient come from the compiled kernels (kl_row_states,
kl_grad_from_stats) where the device has them, else from the plain-PyTorch versions below, which
are also the tests' independent oracle for those kernels.
"""

import torch

from kl_fused._ops import shard_kernels_reason


def has_fused_shard_kernels(device) -> bool:
    """True where compiled kernels compute a shard's partial state and gradient on `device` (for CUDA:
    a device of this machine whose architecture the build has a kernel image for)."""
    return shard_kernels_reason(device) is None


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _shift(m):
    """The shift of a side whose maximum is m: m, or 0 where the side is all -inf."""
    return torch.where(m == float("-inf"), 0.0, m)


def shard_states_torch(student, teacher, mask, temperature, reverse):
    """(rows, 5) partial states of (rows, V_k) shards, as kl_row_states computes them."""
    acc = acc_dtype(student.dtype)
    t, s = teacher.to(acc), student.to(acc)
    m_a, m_b = t.amax(dim=-1), s.amax(dim=-1)
    a_, b_ = (t - _shift(m_a)[:, None]) / temperature, (s - _shift(m_b)[:, None]) / temperature
    e_a, e_b = a_.exp(), b_.exp()
    x_, y_, e_x = (b_, a_, e_b) if reverse else (a_, b_, e_a)
    w = torch.where(e_x > 0, e_x * (x_ - y_), 0.0).sum(dim=-1)
    states = torch.stack([m_a, m_b, e_a.sum(dim=-1), e_b.sum(dim=-1), w], dim=-1)
    inf = float("inf")
    undefined = t.isnan().any(-1) | s.isnan().any(-1) | (m_a == inf) | (m_b == inf)
    states = torch.where(undefined[:, None], states.new_tensor([-inf, -inf, float("nan"), float("nan"), float("nan")]), states)
    if mask is not None:
        states = torch.where(mask[:, None], states, states.new_tensor([-inf, -inf, 0.0, 0.0, 0.0]))
    return states


def shard_states(student, teacher, mask, temperature, reverse):
    """(rows, 5) partial states of (rows, V_k) shards: m_a, m_b, Z_a, Z_b, W."""
    if has_fused_shard_kernels(student.device):
        return torch.ops.kl_fused.kl_row_states(student, teacher, mask, float(temperature), reverse)
    return shard_states_torch(student, teacher, mask, temperature, reverse)


def rescaled_sums(states, maxima, reverse, temperature):
    """(rows, 3) sums Z_a, Z_b, W of one shard moved to the full rows' shifts; maxima is (rows, 2)
    M_a, M_b (raw logits). A shard whose side is all -inf (Z = 0), or whose scale underflows to 0,
    contributes nothing there (its W term would be 0 * inf = NaN when the shift difference times Z
    overflows); a NaN state (undefined row) keeps a NaN Z, so that the merged row is NaN."""
    m_a, m_b, z_a, z_b, w = states.unbind(dim=-1)
    s_a, s_b = _shift(m_a), _shift(m_b)
    g_a, g_b = _shift(maxima[:, 0]), _shift(maxima[:, 1])
    scale_a = torch.where(z_a == 0, 0.0, torch.exp((s_a - g_a) / temperature))
    scale_b = torch.where(z_b == 0, 0.0, torch.exp((s_b - g_b) / temperature))
    # (b' - a') against the row's shifts = against the shard's - (g_b - s_b) / T + (g_a - s_a) / T
    if reverse:
        w_row = torch.where(scale_b == 0, 0.0, scale_b * (w + ((g_a - s_a) - (g_b - s_b)) / temperature * z_b))
    else:
        w_row = torch.where(scale_a == 0, 0.0, scale_a * (w + ((g_b - s_b) - (g_a - s_a)) / temperature * z_a))
    return torch.stack([z_a * scale_a, z_b * scale_b, w_row], dim=-1)


def finish_rows(maxima, sums, mask, reverse):
    """Per-row KL of the full rows (0 where the mask is False) and the (rows, 5) stats the shard
    gradient needs: M_a, M_b (raw logits), log Z_a, log Z_b, KL."""
    z_a, z_b, w = sums.unbind(dim=-1)
    log_za, log_zb = z_a.log(), z_b.log()
    kl = w / z_b - log_zb + log_za if reverse else w / z_a - log_za + log_zb
    # KL >= 0; rounding below 0 is clamped (clamp keeps NaN). No finite maximum: undefined, NaN.
    kl = kl.clamp_min(0.0)
    kl = torch.where((maxima[:, 0] == float("-inf")) | (maxima[:, 1] == float("-inf")), float("nan"), kl)
    if mask is not None:
        kl = torch.where(mask, kl, 0.0)
    stats = torch.stack([maxima[:, 0], maxima[:, 1], log_za, log_zb, kl], dim=-1)
    return kl, stats


def shard_grads_torch(student, teacher, mask, stats, row_factor, temperature, reverse, student_grad, teacher_grad):
    """kl_grad_from_stats in plain PyTorch."""
    acc = acc_dtype(student.dtype)
    m_a, m_b, log_za, log_zb, kl = (c[:, None] for c in stats.unbind(dim=-1))
    la = (teacher.to(acc) - m_a) / temperature - log_za
    lb = (student.to(acc) - m_b) / temperature - log_zb
    p, q = la.exp(), lb.exp()
    f = row_factor[:, None]
    if reverse:
        ds = torch.where(q > 0, q * (lb - la - kl), 0.0) * f
        dt = (p - q) * f
    else:
        ds = (q - p) * f
        dt = torch.where(p > 0, p * (la - lb - kl), 0.0) * f
    undefined = (kl.isnan() | ~(m_a.isfinite() & m_b.isfinite() & log_za.isfinite() & log_zb.isfinite()))
    ds, dt = (torch.where(undefined, float("nan"), g) for g in (ds, dt))
    if mask is not None:
        ds, dt = (torch.where(mask[:, None], g, 0.0) for g in (ds, dt))
    empty = student.new_empty((0,))
    return (ds.to(student.dtype) if student_grad else empty, dt.to(teacher.dtype) if teacher_grad else empty)


def shard_grads(student, teacher, mask, stats, row_factor, temperature, reverse, student_grad, teacher_grad):
    """Gradients of (rows, V_k) shards given the full rows' stats and d(loss)/d(row KL) / T."""
    args = (student, teacher, mask, stats, row_factor, float(temperature), reverse, student_grad, teacher_grad)
    if has_fused_shard_kernels(student.device):
        return torch.ops.kl_fused.kl_grad_from_stats(*args)
    return shard_grads_torch(*args)
