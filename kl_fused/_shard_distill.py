"""The distillation step's row math on a vocabulary shard (kl_fused.distributed's
distillation_loss_vocab_parallel and linear_distillation_loss_vocab_parallel): the per-row loss of the
full rows and the gradient of this rank's shard, from O(rows) collectives.

Rank r holds columns [v_r, v_r + w_r) of every row (all of the rows here count). With the raw row
maxima M_s, M_t (shift first, then scale, as the single-process kernels) and d_b = (s - M_s) / T,
d_a = (t - M_t) / T, each quantity a full row needs is a sum over the vocabulary, so each rank sums its
own columns and the ranks add those partial sums:

    stage 1, all-reduce MAX    the raw row maxima M_s (the soft and the hard term's shift) and M_t
    stage 2, all-reduce SUM    Z_b = sum e^d_b, Z_a = sum e^d_a, and per divergence / term:
                               KL    W = sum e^x (x - y)    (x = d_a forward, d_b reverse)
                               hard  s_y - M_s (from the rank that owns label y, 0 elsewhere),
                                     Z_s = sum e^(s - M_s) (= Z_b at T = 1), sum_v (s - M_s)
                               top-k d_b at the K support slots (from the owning ranks), and the
                                     complement's mass sum_{v not in S} e^d_b (bucket tail)
    stage 3, all-reduce SUM    JSD only: sum p (log p - log m) and sum q (log q - log m), which need
                               log m per element, hence the full rows' log Z from stage 2
    finish (every rank)        KL = W / Z_x - log Z_x + log Z_y (the shifts cancel); JSD = beta KL(p||m)
                               + (1 - beta) KL(q||m); top-k as kl_fused.sparse_kl_div; CE = (1 - eps)
                               (log Z_s - (s_y - M_s)) + eps (log Z_s - sum_v (s - M_s) / V)

A dense forward or reverse KL (JSD's endpoints too) runs on the compiled shard kernels of
kl_div_logits_vocab_parallel where the device has them (kl_row_states for the partial state,
kl_grad_from_stats for the gradient, the merge of kl_fused._shard_math): the same stages, the KL's
statistics in their own two collectives; the hard term then keeps its own maximum and Z_s.

Bytes per row per chunk (accumulation type of e bytes: 4, or 8 for float64): stage 1 at most 2e,
stage 2 at most (6 + K)e, stage 3 and 4 (JSD) 2e each -- never O(V). See collective_values_per_row.

Gradients: autograd through these torch ops gives each rank exactly its shard's gradient. The
derivative of an all-reduced SUM with respect to this rank's summand is the upstream gradient itself,
and the maxima are shifts with no gradient: no collective. JSD's stage-3 partial sums on every rank
depend on the full rows' lse, so the lse's gradient is the sum over the ranks of those partial sums'
gradients: one all-reduce SUM of 2 values per row in backward (stage 4, JSD only). Temporaries: a few (rows x w_r) buffers of the accumulation type, which the callers bound by
chunking the rows.
"""

import torch
import torch.distributed as dist

from kl_fused import _shard_math

NEG_INF = float("-inf")


class VocabShard:
    """This rank's place in a vocabulary split: the group, its columns [offset, offset + width) of
    `vocab`, and the device its collectives run on."""

    def __init__(self, group, offset, width, vocab, comm_device):
        self.group, self.offset, self.width, self.vocab, self.comm = group, offset, width, vocab, comm_device

    def max(self, x):
        """All-reduce MAX of x (no gradient: maxima are shifts). NaN is sent as -inf (gloo's MAX does
        not promise to keep it); the row's NaN reaches every rank through the sums instead."""
        y = torch.where(x.isnan(), NEG_INF, x.detach()).to(self.comm, copy=True)
        dist.all_reduce(y, op=dist.ReduceOp.MAX, group=self.group)
        return y.to(x.device)

    def sum(self, x):
        """All-reduce SUM of x, differentiable: the gradient of this rank's summand is the upstream one."""
        return _SumOverRanks.apply(x, self)

    def shared(self, x):
        """x, a value every rank holds alike (a full row's lse), as an input of this rank's partial sums:
        its gradient is the sum over the ranks of theirs, by one all-reduce in backward (Megatron's copy
        to the tensor-parallel region)."""
        return _SharedAcrossRanks.apply(x, self)

    def owned(self, ids):
        """(ids in this rank's columns, their local column, clamped into range where not owned)."""
        local = ids.long() - self.offset
        mine = (local >= 0) & (local < self.width)
        return mine, local.clamp(0, self.width - 1)


class _SumOverRanks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, shard):
        y = x.detach().to(shard.comm, copy=True)
        dist.all_reduce(y, op=dist.ReduceOp.SUM, group=shard.group)
        return y.to(x.device)

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _SharedAcrossRanks(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, shard):
        ctx.shard = shard
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        total = grad.to(ctx.shard.comm, copy=True)
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=ctx.shard.group)
        return total.to(grad.device), None


def collective_values_per_row(divergence, dense, topk_slots, hard, temperature, label_smoothing):
    """Values of the accumulation type one rank sends per row per chunk in stages 1 to 3."""
    # A dense forward or reverse KL runs on the shard kernels: 2 maxima and 3 sums of its own.
    by_kernels = dense and divergence != "jsd"
    kernel_values = 5 if by_kernels else 0
    soft_in_torch = topk_slots > 0 or (dense and not by_kernels)
    dense_in_torch = dense and not by_kernels
    maxima = int(soft_in_torch or hard) + int(dense_in_torch)  # raw maxima: the student's serves both terms
    sums = int(soft_in_torch) + int(dense_in_torch)
    if hard:
        sums += 1 + int(not (soft_in_torch and temperature == 1.0)) + int(label_smoothing > 0)
    if topk_slots:
        sums += topk_slots + 1
    jsd_terms = 4 if dense_in_torch else 0  # stage 3, and the lse gradients
    return kernel_values + maxima + sums + jsd_terms


def _shift(m):
    return torch.where(m == NEG_INF, 0.0, m)


def _safe_product(weight, diff, keep):
    """weight * diff where keep, else 0, with no NaN in value or gradient from diff = +-inf there."""
    return weight * torch.where(keep, diff, 0.0)


def _kl_style(beta, divergence):
    """'forward', 'reverse' or 'jsd': JSD's endpoints are the KL divergences (TRL's convention)."""
    if divergence == "jsd":
        return "forward" if beta == 0 else ("reverse" if beta == 1 else "jsd")
    return "reverse" if divergence == "reverse_kl" else "forward"


def shard_row_losses(shard, student, teacher, indices, logprobs, labels, divergence, beta, renormalize, temperature,
                     label_smoothing):
    """(soft, hard) per row of the full rows, in the accumulation type; None for a term not given.
    Differentiable with respect to student, teacher and logprobs (this rank's share of the gradient).

    Shift, then scale, as the single-process kernels: every exponent is (x - M_x) / T with M_x the raw
    row maximum, never x / T - max(x / T) (which, at |x| / T near 1e10, rounds away the differences). So
    the student's raw maximum serves the soft and the hard term alike, and every value summed below is
    relative to it: d_b = (s - M_s) / T, the label's s_y - M_s, lse_b - M_s / T = log Z_b."""
    acc = torch.float64 if student.dtype == torch.float64 else torch.float32
    dense, sparse = teacher is not None, indices is not None
    soft_wanted, hard_wanted = dense or sparse, labels is not None
    style = _kl_style(beta, divergence)
    s = student.to(acc)
    t = teacher.to(acc) if dense else None

    # Stage 1: the raw maxima.
    maxima = [x.detach().amax(-1) for x in (s, t) if x is not None]
    shifts = _shift(shard.max(torch.stack(maxima, -1))).unbind(-1)
    s_shifted = s - shifts[0][:, None]
    d_b = s_shifted / temperature if soft_wanted else None
    d_a = (t - shifts[1][:, None]) / temperature if dense else None
    share_hard = soft_wanted and temperature == 1.0

    # Stage 2: this shard's partial sums, then the full rows' by one all-reduce.
    local = {}
    if soft_wanted:
        e_b = torch.exp(d_b)
        local["z_b"] = e_b.sum(-1)
    if dense:
        e_a = torch.exp(d_a)
        local["z_a"] = e_a.sum(-1)
        if style != "jsd":
            x, y, e_x = (d_a, d_b, e_a) if style == "forward" else (d_b, d_a, e_b)
            local["w"] = _safe_product(e_x, x - y, e_x > 0).sum(-1)
    if hard_wanted:
        if not share_hard:
            local["z_s"] = torch.exp(s_shifted).sum(-1)
        mine, column = shard.owned(labels)
        local["s_y"] = torch.where(mine, s_shifted.gather(-1, column[:, None]).squeeze(-1), 0.0)
        if label_smoothing > 0:
            local["sum_s"] = s_shifted.sum(-1)
    if sparse:
        used = logprobs != NEG_INF
        mine, column = shard.owned(indices)
        mine = mine & used
        local["b_support"] = torch.where(mine, d_b.gather(-1, column), 0.0)
        if not renormalize:
            in_support = torch.zeros_like(d_b, dtype=torch.int32).scatter_add(-1, column, mine.to(torch.int32)) > 0
            local["rest"] = torch.where(in_support, 0.0, e_b).sum(-1)
    full = _split(shard.sum(torch.cat([v.reshape(v.shape[0], -1) for v in local.values()], -1)), local)

    # Below, log Z_x is the full row's lse relative to its shift: the shifts cancel in every divergence.
    soft = hard = None
    if soft_wanted:
        log_z_b = full["z_b"].log()
    if dense:
        log_z_a = full["z_a"].log()
        if style == "forward":
            soft = full["w"] / full["z_a"] - log_z_a + log_z_b
        elif style == "reverse":
            soft = full["w"] / full["z_b"] - log_z_b + log_z_a
        else:  # Stage 3: JSD's two KLs against the mixture need the full rows' lse first.
            log_z = shard.shared(torch.stack([log_z_a, log_z_b], -1))
            log_p, log_q = d_a - log_z[:, :1], d_b - log_z[:, 1:]
            p, q = log_p.exp(), log_q.exp()
            m = beta * p + (1 - beta) * q
            log_m = torch.log(torch.where(m > 0, m, 1.0))
            terms = torch.stack([_safe_product(p, log_p - log_m, p > 0).sum(-1),
                                 _safe_product(q, log_q - log_m, q > 0).sum(-1)], -1)
            kl_pm, kl_qm = shard.sum(terms).unbind(-1)
            soft = beta * kl_pm + (1 - beta) * kl_qm
        # KL >= 0: rounding below 0 is clamped in the value only (the gradient is the unclamped one's).
        soft = soft + (soft.clamp_min(0.0) - soft).detach()
    if sparse:
        soft = _sparse_rows(full, logprobs.to(acc), used, log_z_b, shard.vocab, renormalize)
    if hard_wanted:
        log_z_s = log_z_b if share_hard else full["z_s"].log()
        hard = (1 - label_smoothing) * (log_z_s - full["s_y"])
        if label_smoothing > 0:
            hard = hard + label_smoothing * (log_z_s - full["sum_s"] / shard.vocab)
    return soft, hard


def _kl_by_shard_kernels(shard, student, teacher, reverse, temperature, soft_weight, student_grad, teacher_grad):
    """The dense KL's row values and soft_weight times its shard gradients, from the compiled shard kernels
    (kl_row_states, kl_grad_from_stats) and the merge of kl_fused._shard_math: one all-reduce MAX of 2 and
    one SUM of 3 values per row, as kl_div_logits_vocab_parallel."""
    states = _shard_math.shard_states(student, teacher, None, temperature, reverse)
    maxima = shard.max(states[:, :2])
    sums = shard.sum(_shard_math.rescaled_sums(states, maxima, reverse, temperature))
    kl, stats = _shard_math.finish_rows(maxima, sums, None, reverse)
    grads = (None, None)
    if (student_grad or teacher_grad) and soft_weight != 0:
        factor = torch.full((student.shape[0],), soft_weight / temperature, dtype=stats.dtype, device=stats.device)
        grads = _shard_math.shard_grads(student, teacher, None, stats, factor, temperature, reverse, student_grad,
                                        teacher_grad)
        grads = tuple(g if flag else None for g, flag in zip(grads, (student_grad, teacher_grad)))
    return kl, grads


def _split(flat, named):
    """The all-reduced columns back under their names and shapes."""
    out, start = {}, 0
    for name, value in named.items():
        width = value[0].numel() if value.dim() > 1 else 1
        part = flat[:, start:start + width]
        out[name] = part if value.dim() > 1 else part[:, 0]
        start += width
    return out


def _sparse_rows(full, lp, used, log_z_b, vocab, renormalize):
    """kl_fused.sparse_kl_div's row loss (bucket or renormalised tail) from the full rows' sums, the student's
    support logits and tail mass relative to its shift (log_z_b: the full row's lse relative to it)."""
    safe_lp = torch.where(used, lp, 0.0)
    b_support = full["b_support"]
    if renormalize:
        has_support = used.any(-1, keepdim=True)
        lse_q = torch.where(used, b_support, NEG_INF).logsumexp(-1, keepdim=True)
        lse_p = torch.where(used, safe_lp, NEG_INF).logsumexp(-1, keepdim=True)
        log_qt = torch.where(used, b_support - torch.where(has_support, lse_q, 0.0), 0.0)
        log_pt = torch.where(used, safe_lp - torch.where(has_support, lse_p, 0.0), 0.0)
        pt = torch.where(used, log_pt.exp(), 0.0)
        return _safe_product(pt, log_pt - log_qt, pt != 0).sum(-1)
    p = torch.where(used, safe_lp.exp(), 0.0)
    log_q_support = torch.where(used, b_support - log_z_b[:, None], 0.0)
    rows = _safe_product(p, safe_lp - log_q_support, p != 0).sum(-1)
    # The complement's mass was summed over the complement (1 - sum_S q would cancel).
    rest_count = vocab - used.sum(-1)
    has_rest = (rest_count > 0) & (full["rest"] > 0)
    log_qr = torch.where(has_rest, torch.where(has_rest, full["rest"], 1.0).log() - log_z_b, NEG_INF)
    p_r = torch.where(rest_count > 0, (1.0 - p.sum(-1)).clamp_min(0.0), 0.0)
    bucket = _safe_product(p_r, torch.where(p_r != 0, p_r, 1.0).log() - log_qr, p_r != 0)
    return rows + bucket


def shard_distillation_rows(shard, student, teacher, indices, logprobs, labels, divergence, beta, renormalize,
                            temperature, soft_weight, hard_weight, label_smoothing, bad_rows, student_grad,
                            teacher_grad, logprobs_grad, grads_in_acc=False):
    """The vocab-parallel counterpart of the op kl_fused::distillation_loss at reduction "none" on rows
    that all count: (row losses, grad of the student shard, of the teacher shard, of the log-probs,
    parts (2, rows)), gradients at upstream gradient 1 per row, with both weights folded in; empty
    tensors for gradients not asked for (in the inputs' dtypes, or the accumulation type with grads_in_acc,
    for a caller that scales them before rounding once). bad_rows (or None): rows with a label or top-k support the
    caller found invalid (validate=False), whose losses are NaN, their gradients zero."""
    wanted = [(x, flag) for x, flag in ((student, student_grad), (teacher, teacher_grad), (logprobs, logprobs_grad))]
    style = _kl_style(beta, divergence)
    # A dense KL soft term runs on the compiled shard kernels where the device has them (one pass for the
    # partial state, one for the gradient); everything else in the torch ops of shard_row_losses.
    by_kernels = teacher is not None and style != "jsd" and _shard_math.has_fused_shard_kernels(student.device)
    kernel_grads = (None, None)
    with torch.enable_grad():
        acc = torch.float64 if student.dtype == torch.float64 else torch.float32
        # Leaves in the accumulation type, so that a gradient is rounded to its input's dtype once, at the end.
        leaves = [x.detach().to(acc).requires_grad_(flag) if x is not None else None for x, flag in wanted]
        if by_kernels:
            soft, kernel_grads = _kl_by_shard_kernels(shard, student, teacher, style == "reverse", temperature,
                                                      soft_weight, student_grad, teacher_grad)
            hard = None
            if labels is not None:
                hard = shard_row_losses(shard, leaves[0], None, None, None, labels, divergence, beta, renormalize,
                                        temperature, label_smoothing)[1]
        else:
            soft, hard = shard_row_losses(shard, leaves[0], leaves[1], indices, leaves[2], labels, divergence, beta,
                                          renormalize, temperature, label_smoothing)
        rows = None
        if soft is not None and soft_weight != 0:
            rows = soft_weight * soft
        if hard is not None and hard_weight != 0:
            rows = hard_weight * hard if rows is None else rows + hard_weight * hard
        if rows is None:
            rows = torch.zeros_like(soft if soft is not None else hard)
        if bad_rows is not None:
            rows = torch.where(bad_rows, float("nan"), rows)
        targets = [leaf for leaf in leaves if leaf is not None and leaf.requires_grad]
        grads = torch.autograd.grad(rows.sum(), targets, allow_unused=True) if targets and rows.requires_grad else ()
    grads = iter(grads)
    out = []
    for leaf, (x, flag), extra in zip(leaves, wanted, (*kernel_grads, None)):
        if leaf is not None and leaf.requires_grad:
            g = next(grads, None)
            if extra is not None:
                extra = torch.where(bad_rows[:, None], 0.0, extra) if bad_rows is not None else extra
                g = extra.to(acc) if g is None else g + extra
            dtype = acc if grads_in_acc else x.dtype
            out.append(torch.zeros_like(x, dtype=dtype) if g is None else g.to(dtype))
        else:
            out.append(student.new_empty((0,)))
    zeros = torch.zeros_like(rows.detach())
    parts = torch.stack([soft.detach() if soft is not None else zeros, hard.detach() if hard is not None else zeros])
    if bad_rows is not None:
        parts = torch.where(bad_rows, float("nan"), parts)
    return (rows.detach(), *out, parts)
