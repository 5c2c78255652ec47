"""What each spawned rank runs in test_distributed_distill.py. Every rank builds the same full inputs from a
seed, keeps its own vocabulary shard (of logits, or rows of the output layer), and compares
distillation_loss_vocab_parallel / linear_distillation_loss_vocab_parallel with the single-process
kl_fused.distillation_loss / linear_distillation_loss on the full tensors: the loss, the parts, and every
gradient of this rank (its shards' and the hidden states'), under upstream gradients other than 1.
Many cases run per process-group launch (spawning is the slow part)."""

import itertools

import pytest
import torch
import torch.distributed as dist

import kl_fused
from conftest import TOLERANCES, fused_op_must_run, make_logits
from distill_helpers import IGNORE, make_labels, poison_uncounted
from kl_fused.distributed import (distillation_loss_vocab_parallel, kl_div_logits_vocab_parallel,
                                  linear_distillation_loss_vocab_parallel)
from sparse_helpers import make_sparse
from vocab_parallel_workers import _bounds

# Unequal widths, a narrow rank in each; widths above the CPU kernels' 1024-element chunk would only
# slow the single-process side here (the shard math has no chunk of its own).
WIDTHS = {2: [300, 37], 3: [1, 203, 150], 4: [120, 2, 201, 51]}


def _close(actual, expected, tol, what, kind="loss"):
    expected = torch.as_tensor(expected).detach().double()
    actual = torch.as_tensor(actual).detach().double()
    finite = expected[expected.isfinite()]
    scale = finite.abs().max().item() if finite.numel() else 0.0
    rtol, atol = tol[f"{kind}_rtol"], tol[f"{kind}_atol"] + (tol[f"{kind}_rtol"] * 0.05 * scale if kind == "grad" else 0)
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol, equal_nan=True, msg=lambda m: f"{what}: {m}")


def _labels_on_every_rank(leading, widths, seed):
    """Labels with about a quarter ignored, and rows whose labels sit in each rank's range (the first and
    the last column of it), so that every rank owns some."""
    labels = make_labels(leading, sum(widths), seed)
    flat = labels.view(-1)
    for r in range(len(widths)):
        start, end = _bounds(widths, r)
        flat[(2 * r) % flat.numel()] = start
        flat[(2 * r + 1) % flat.numel()] = end - 1
    return labels


def _topk_on_every_rank(leading, widths, dtype, seed, slots=6):
    """(student, (indices, logprobs)) with supports spread over the ranks and two unused slots."""
    student, idx, lp = make_sparse(leading, sum(widths), slots, dtype, seed, unused=2)
    return student, (idx, lp)


def _upstream(loss, seed):
    if loss.dim() == 0:
        return torch.tensor(1.7, dtype=loss.dtype)
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(loss.shape, generator=gen, dtype=torch.float64).to(loss.dtype) + 0.5


def _logits_case(rank, widths, dtype, teacher_form, seed, group=None, teacher_grad=False, poison=True, offset=0.0,
                 **options):
    """One call of distillation_loss_vocab_parallel against distillation_loss on the full logits (moved by
    offset, the teacher's by -offset / 2: large logits whose differences are small)."""
    vocab = sum(widths)
    start, end = _bounds(widths, rank)
    leading = (3, 5)
    labels = _labels_on_every_rank(leading, widths, seed) if options.get("hard_weight", 0) > 0 or \
        options.pop("with_labels", False) else None
    teacher, topk = None, None
    if teacher_form == "topk":
        student, topk = _topk_on_every_rank(leading, widths, dtype, seed)
    else:
        student, teacher = make_logits((*leading, vocab), dtype, "cpu", seed)
        teacher = teacher - offset / 2 if teacher_form == "dense" else None
    student = student + offset
    mask = options.get("mask")
    if poison and labels is not None:
        student, teacher, topk, labels = poison_uncounted(student, teacher, topk, labels, mask)
    what = f"rank {rank} of {len(widths)} {dtype} {teacher_form} {options}"

    full_s = student.clone().requires_grad_()
    full_t = teacher.clone().requires_grad_(teacher_grad) if teacher is not None else None
    full_topk = (topk[0], topk[1].clone().requires_grad_(teacher_grad)) if topk is not None else None
    expected = kl_fused.distillation_loss(full_s, full_t, teacher_topk=full_topk, labels=labels, **options)
    shard_s = student[..., start:end].clone().requires_grad_()
    shard_t = teacher[..., start:end].clone().requires_grad_(teacher_grad) if teacher is not None else None
    shard_topk = (topk[0], topk[1].clone().requires_grad_(teacher_grad)) if topk is not None else None
    inputs_before = [x.detach().clone() for x in (shard_s, shard_t) if x is not None]
    got = distillation_loss_vocab_parallel(shard_s, shard_t, group=group, teacher_topk=shard_topk, labels=labels,
                                           **options)
    tol = TOLERANCES[dtype]
    if options.get("return_parts"):
        for name, g, e in zip(("loss", "soft", "hard"), got, expected):
            _close(g, e, tol, f"{what} {name}")
        got, expected = got.loss, expected.loss
    _close(got, expected, tol, f"{what} loss")
    upstream = _upstream(expected, seed)
    (expected * upstream).sum().backward()
    (got * upstream).sum().backward()
    _close(shard_s.grad, full_s.grad[..., start:end], tol, f"{what} student grad", "grad")
    if teacher_grad and full_t is not None:
        _close(shard_t.grad, full_t.grad[..., start:end], tol, f"{what} teacher grad", "grad")
    if teacher_grad and full_topk is not None:
        _close(shard_topk[1].grad, full_topk[1].grad, tol, f"{what} logprobs grad", "grad")
    for before, after in zip(inputs_before, (shard_s, shard_t)):
        assert torch.equal(before.nan_to_num(), after.detach().nan_to_num()), f"{what}: an input was modified"
    return got


def _rows_mask(seed):
    mask = torch.rand(3, 5, generator=torch.Generator().manual_seed(seed)) > 0.35
    mask[0, 0] = True
    return mask


def logits_cases(rank, world_size):
    """Every divergence and teacher form, both temperatures, the hard term with and without smoothing,
    masks, every reduction, num_items_in_batch and return_parts: float64 (to 1e-9) and float32."""
    widths = WIDTHS[world_size]
    reductions = itertools.cycle(["none", "sum", "batchmean", "mean"])
    seed = 1000 * world_size
    dense = [dict(divergence="forward_kl"), dict(divergence="reverse_kl"), dict(divergence="jsd", beta=0.3),
             dict(divergence="jsd", beta=1.0)]
    hard = [dict(), dict(hard_weight=0.6, soft_weight=0.8), dict(hard_weight=1.0, label_smoothing=0.1)]
    for soft, temperature, extra in itertools.product(dense, [1.0, 2.0], hard):
        seed += 1
        mask = _rows_mask(seed) if seed % 2 else None
        _logits_case(rank, widths, torch.float64, "dense", seed, teacher_grad=seed % 3 == 0, temperature=temperature,
                     reduction=next(reductions), mask=mask, **soft, **extra)
    for tail, temperature, extra in itertools.product(["bucket", "renormalize"], [1.0, 1.5], hard[:2]):
        seed += 1
        _logits_case(rank, widths, torch.float64, "topk", seed, teacher_grad=True, tail=tail,
                     temperature=temperature, reduction=next(reductions), **extra)
    for extra in hard[1:]:  # no teacher: the fused cross-entropy
        seed += 1
        _logits_case(rank, widths, torch.float64, "none", seed, reduction=next(reductions), **extra)
    _logits_case(rank, widths, torch.float64, "dense", seed + 1, num_items_in_batch=9, hard_weight=0.5)
    _logits_case(rank, widths, torch.float64, "topk", seed + 2, return_parts=True, hard_weight=0.5, temperature=2.0)
    # A dense KL's statistics and gradient come from the compiled shard kernels.
    with fused_op_must_run(torch.ops.kl_fused.kl_row_states.default, torch.ops.kl_fused.kl_grad_from_stats.default):
        _logits_case(rank, widths, torch.float32, "dense", seed + 4, teacher_grad=True, divergence="reverse_kl",
                     hard_weight=0.5, temperature=2.0)
    for divergence, form in (("forward_kl", "dense"), ("jsd", "dense"), ("forward_kl", "topk")):
        _logits_case(rank, widths, torch.float32, form, seed + 3, teacher_grad=True, divergence=divergence,
                     hard_weight=0.4, temperature=1.5, mask=_rows_mask(seed))
    # Logits near 3e5 (float32's spacing there is 1/32) at T = 1.5: shifting by the raw maximum before
    # scaling keeps their differences exact, as the single-process kernels do; s / T - max(s / T) would not.
    for divergence, form in (("jsd", "dense"), ("forward_kl", "topk"), ("forward_kl", "none")):
        _logits_case(rank, widths, torch.float32, form, seed + 5, teacher_grad=form != "none", divergence=divergence,
                     hard_weight=0.4, temperature=1.5, label_smoothing=0.1, offset=3e5)


def _linear_case(rank, widths, dtype, teacher_form, seed, group=None, hidden_grad="all_reduce", bias=False,
                 grads=("hidden", "weight"), **options):
    """One call of linear_distillation_loss_vocab_parallel against linear_distillation_loss on the full
    output layer: the loss and every gradient of this rank."""
    vocab, hidden = sum(widths), 16
    start, end = _bounds(widths, rank)
    leading = (2, 7)
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (scale * torch.randn(shape, generator=gen, dtype=torch.float64)).to(dtype)

    tensors = dict(student_hidden=rand(*leading, hidden), student_weight=rand(vocab, hidden, scale=0.5))
    if bias:
        tensors["student_bias"] = rand(vocab, scale=0.3)
    topk = None
    if teacher_form == "logits":
        tensors["teacher_logits"] = rand(*leading, vocab, scale=2.0)
    elif teacher_form == "hidden":
        tensors.update(teacher_hidden=rand(*leading, 12), teacher_weight=rand(vocab, 12, scale=0.6))
        if bias:
            tensors["teacher_bias"] = rand(vocab, scale=0.3)
    elif teacher_form == "topk":
        _, topk = _topk_on_every_rank(leading, widths, dtype, seed)
    labels = _labels_on_every_rank(leading, widths, seed) if options.get("hard_weight", 0) > 0 else None
    requires = {"student_hidden": "hidden" in grads, "student_weight": "weight" in grads,
                "student_bias": "weight" in grads, "teacher_logits": "teacher" in grads,
                "teacher_hidden": "teacher" in grads, "teacher_weight": "teacher" in grads,
                "teacher_bias": "teacher" in grads}
    full = {k: v.clone().requires_grad_(requires[k]) for k, v in tensors.items()}
    full_topk = (topk[0], topk[1].clone().requires_grad_("teacher" in grads)) if topk is not None else None
    expected = kl_fused.linear_distillation_loss(
        full["student_hidden"], full["student_weight"], full.get("teacher_logits"),
        teacher_hidden=full.get("teacher_hidden"), teacher_weight=full.get("teacher_weight"),
        student_bias=full.get("student_bias"), teacher_bias=full.get("teacher_bias"), teacher_topk=full_topk,
        labels=labels, **options)
    sharded = {"student_weight", "student_bias", "teacher_weight", "teacher_bias"}
    mine = {}
    for k, v in tensors.items():
        part = v[start:end] if k in sharded else (v[..., start:end] if k == "teacher_logits" else v)
        mine[k] = part.clone().requires_grad_(requires[k])
    mine_topk = (topk[0], topk[1].clone().requires_grad_("teacher" in grads)) if topk is not None else None
    got = linear_distillation_loss_vocab_parallel(
        mine["student_hidden"], mine["student_weight"], mine.get("teacher_logits"), group=group,
        teacher_hidden=mine.get("teacher_hidden"), teacher_weight_shard=mine.get("teacher_weight"),
        student_bias_shard=mine.get("student_bias"), teacher_bias_shard=mine.get("teacher_bias"),
        teacher_topk=mine_topk, labels=labels, hidden_grad=hidden_grad, **options)
    what = f"linear rank {rank} of {len(widths)} {dtype} {teacher_form} {hidden_grad} {options}"
    tol = TOLERANCES[dtype]
    _close(got, expected, tol, f"{what} loss")
    upstream = _upstream(expected, seed)
    (expected * upstream).sum().backward()
    (got * upstream).sum().backward()
    checked = 0
    for k, v in mine.items():
        if not v.requires_grad:
            continue
        want = full[k].grad
        want = want[start:end] if k in sharded else (want[..., start:end] if k == "teacher_logits" else want)
        have = v.grad
        if k in ("student_hidden", "teacher_hidden") and hidden_grad == "local":
            have = have.clone()  # this rank's partial sum: the ranks' sum is the full gradient
            dist.all_reduce(have, group=group)
        _close(have, want, tol, f"{what} {k} grad", "grad")
        checked += 1
    if mine_topk is not None and mine_topk[1].requires_grad:
        _close(mine_topk[1].grad, full_topk[1].grad, tol, f"{what} logprobs grad", "grad")
        checked += 1
    assert checked >= 1, what


def linear_cases(rank, world_size):
    """Every teacher form (logits shard, hidden states and a weight shard, top-k, none), every divergence,
    biases, logit scale and softcap, several chunks, masks, reductions and both hidden_grad modes."""
    widths = WIDTHS[world_size]
    seed = 5000 * world_size
    reductions = itertools.cycle(["batchmean", "none", "sum", "mean"])
    cases = [
        ("logits", dict(divergence="forward_kl", grads=("hidden", "weight", "teacher"))),
        ("hidden", dict(divergence="reverse_kl", bias=True, grads=("hidden", "weight", "teacher"))),
        ("hidden", dict(divergence="jsd", beta=0.4, temperature=2.0, hard_weight=0.5, label_smoothing=0.1)),
        ("hidden", dict(divergence="forward_kl", student_logit_scale=0.5, student_softcap=4.0, teacher_softcap=3.0,
                        hard_weight=0.7, hidden_grad="local")),
        ("topk", dict(tail="bucket", temperature=1.5, hard_weight=0.5, grads=("hidden", "weight", "teacher"))),
        ("topk", dict(tail="renormalize", bias=True, hidden_grad="local")),
        ("none", dict(hard_weight=1.0, bias=True)),
        ("none", dict(hard_weight=1.0, label_smoothing=0.2, hidden_grad="local", num_items_in_batch=11)),
        ("logits", dict(divergence="jsd", beta=0.7, mask="rows", grads=("weight",))),
    ]
    for chunk_rows, (form, options) in itertools.product([None, 4], cases):
        seed += 1
        options = dict(options)
        if options.pop("mask", None):
            options["mask"] = torch.rand(2, 7, generator=torch.Generator().manual_seed(seed)) > 0.3
        if "num_items_in_batch" not in options:
            options["reduction"] = next(reductions)
        _linear_case(rank, widths, torch.float64, form, seed, chunk_rows=chunk_rows, **options)
    _linear_case(rank, widths, torch.float32, "hidden", seed + 1, divergence="forward_kl", hard_weight=0.5,
                 temperature=2.0, bias=True, chunk_rows=5)


def sub_group_and_errors(rank, world_size):
    """A sub-group of the world; then the calls that must raise on every rank of the group: masks of equal
    count in different rows (all three vocab-parallel functions), a rank's own invalid argument, a label
    outside the full vocabulary, create_graph=True; and the group still works afterwards."""
    group = dist.new_group([0, world_size - 1])
    if rank in (0, world_size - 1):
        widths = [210, 95]
        r = 0 if rank == 0 else 1
        _logits_case(r, widths, torch.float64, "dense", 71, group=group, divergence="jsd", hard_weight=0.5)
        _linear_case(r, widths, torch.float64, "hidden", 72, group=group, hard_weight=0.5)
    dist.barrier()

    widths = WIDTHS[world_size]
    start, end = _bounds(widths, rank)
    vocab = sum(widths)
    student, teacher = make_logits((4, vocab), torch.float64, "cpu", seed=88)
    s, t = student[:, start:end], teacher[:, start:end]
    weight = torch.randn(vocab, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    hidden = torch.randn(4, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    w = weight[start:end]
    # The same count of counted rows, in different rows on rank 0.
    mask = torch.tensor([True, True, False, False]) if rank == 0 else torch.tensor([False, False, True, True])
    with pytest.raises(ValueError, match=r"disagree on the mask's rows \(the same count"):
        kl_div_logits_vocab_parallel(s, t, mask=mask)
    with pytest.raises(ValueError, match=r"disagree on the mask \(its values"):
        distillation_loss_vocab_parallel(s, t, mask=mask)
    with pytest.raises(ValueError, match=r"disagree on the mask \(its values"):
        linear_distillation_loss_vocab_parallel(hidden, w, t, mask=mask)
    labels = torch.tensor([0, 1, 2, vocab if rank == 0 else 3])
    with pytest.raises(ValueError, match="disagree on the labels"):
        distillation_loss_vocab_parallel(s, t, labels=labels, hard_weight=1.0)
    labels = torch.tensor([0, vocab, IGNORE, vocab - 1])
    with pytest.raises(ValueError, match=rf"labels must lie in \[0, V\) = \[0, {vocab}\).*row 1 holds {vocab}"):
        distillation_loss_vocab_parallel(s, t, labels=labels, hard_weight=1.0)
    with pytest.raises(ValueError, match=rf"labels must lie in \[0, V\) = \[0, {vocab}\)"):
        linear_distillation_loss_vocab_parallel(hidden, w, labels=labels, hard_weight=1.0)
    last = world_size - 1
    expected = "hidden_grad must be one of" if rank == last else "rank .* rejected its arguments .*hidden_grad"
    with pytest.raises(ValueError, match=expected):
        linear_distillation_loss_vocab_parallel(hidden, w, t, hidden_grad="sum" if rank == last else "local")
    expected = "beta must be in" if rank == last else "rejected its arguments"
    with pytest.raises(ValueError, match=expected):
        distillation_loss_vocab_parallel(s, t, divergence="jsd", beta=2.0 if rank == last else 0.5)
    with pytest.raises(ValueError, match="disagree on the options"):
        distillation_loss_vocab_parallel(s, t, temperature=2.0 if rank == last else 1.0)

    # create_graph=True raises as the single-process ops do (no silent zero second-order terms).
    shard = s.clone().requires_grad_()
    h = hidden.clone().requires_grad_()
    for name, loss in (
        ("kl_div_logits_vocab_parallel", kl_div_logits_vocab_parallel(shard, t)),
        ("distillation_loss_vocab_parallel", distillation_loss_vocab_parallel(shard, t)),
        ("linear_distillation_loss_vocab_parallel", linear_distillation_loss_vocab_parallel(h, w, t)),
    ):
        with pytest.raises(RuntimeError, match=f"{name} supports first-order gradients only"):
            torch.autograd.grad(loss, [x for x in (shard, h) if x.requires_grad][-1:] if "linear" in name
                                else [shard], create_graph=True)
    # The group still works.
    _logits_case(rank, widths, torch.float64, "dense", 90, hard_weight=0.3)


def every_case(rank, world_size):
    """All of the above in one process-group launch (spawning a group is the slow part); the sub-group and
    the error cases on 3 ranks, where a sub-group is not the whole world."""
    logits_cases(rank, world_size)
    linear_cases(rank, world_size)
    if world_size == 3:
        sub_group_and_errors(rank, world_size)


SCENARIOS = {"logits_cases": logits_cases, "linear_cases": linear_cases, "sub_group_and_errors": sub_group_and_errors,
             "every_case": every_case}
