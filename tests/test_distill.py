"""kl_fused.distillation_loss on logits, fused on the CPU (and CUDA where present): values and every
gradient against the float64 reference, F.cross_entropy and scipy; every divergence and teacher form
(dense, top-k bucket and renormalized, none), reduction, label smoothing, temperature, mask + labels,
dtype; NaN in rows that do not count; the exact identities (no labels: the soft functions themselves);
num_items_in_batch; errors; autograd, compile and opcheck."""

import pytest
import torch
import torch.nn.functional as F

import kl_fused
from conftest import DTYPES, TOLERANCES, assert_close, assert_grad_close, fused_op_must_run
from distill_helpers import IGNORE, make_labels, make_step, oracle_rows, poison_uncounted, reference64

DISTILL_OP = torch.ops.kl_fused.distillation_loss.default
FORMS = ["dense", "topk", "none"]


def must_run():
    return fused_op_must_run(DISTILL_OP)


def run(student, teacher, topk, labels, *, teacher_grad=True, **options):
    """The fused loss and the gradients of its sum (student, teacher or top-k log-probs) in fresh leaves."""
    s = student.detach().clone().requires_grad_()
    t = teacher.detach().clone().requires_grad_(teacher_grad) if teacher is not None else None
    tk = (topk[0], topk[1].detach().clone().requires_grad_(teacher_grad)) if topk is not None else None
    with must_run():
        loss = kl_fused.distillation_loss(s, t, teacher_topk=tk, labels=labels, **options)
    value = loss.loss if isinstance(loss, kl_fused.LossParts) else loss
    value.sum().backward()
    return loss, s.grad, (t.grad if t is not None else (tk[1].grad if tk is not None else None))


def check(student, teacher, topk, labels, dtype, *, teacher_grad=True, **options):
    loss, grad_s, grad_t = run(student, teacher, topk, labels, teacher_grad=teacher_grad, **options)
    ref, (s64, t64) = reference64(student, teacher, topk, labels, teacher_grad=teacher_grad, **options)
    tol = TOLERANCES[dtype]
    assert_close(loss, ref, tol["loss_rtol"], tol["loss_atol"], "loss vs float64 reference")
    ref.sum().backward()
    counted = labels != IGNORE
    if options.get("mask") is not None:
        counted &= options["mask"]
    assert_grad_close(grad_s[counted], s64.grad[counted], dtype, "student grad")
    assert (grad_s[~counted] == 0).all(), "rows that do not count get zero gradient"
    if teacher_grad and t64 is not None:
        other = grad_t[counted]
        assert_grad_close(other, t64.grad[counted], grad_t.dtype, "teacher grad")
        assert (grad_t[~counted] == 0).all()
    return loss


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_every_divergence_teacher_form_temperature_and_smoothing(device, form, divergence, temperature,
                                                                 label_smoothing):
    if form != "dense" and divergence != "forward_kl":
        pytest.skip("top-k and no teacher: forward KL only")
    student, teacher, topk, labels = make_step((3, 5), 1100, torch.float32, seed=1, teacher=form, device=device)
    mask = torch.rand((3, 5), generator=torch.Generator().manual_seed(2)) > 0.2
    mask = mask.to(device)
    student, teacher, topk, labels = poison_uncounted(student, teacher, topk, labels, mask)
    check(student, teacher, topk, labels, torch.float32, divergence=divergence, beta=0.3, temperature=temperature,
          soft_weight=0.7, hard_weight=0.5, label_smoothing=label_smoothing, mask=mask)


@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize("temperature", [1.0, 1.5])
def test_topk_tails_with_the_hard_term(device, tail, temperature):
    student, _, topk, labels = make_step((7,), 333, torch.float32, seed=3, teacher="topk", slots=12, device=device)
    # Some labels inside the support, some outside.
    labels[:3] = topk[0][:3, 0].long()
    check(student, None, topk, labels, torch.float32, tail=tail, temperature=temperature, hard_weight=0.4,
          label_smoothing=0.05, reduction="sum")


@pytest.mark.parametrize("temperature", [2.0, 3.0, 4.0, 8.0])
@pytest.mark.parametrize("form", ["dense", "jsd", "bucket", "renormalize", "none"])
def test_integer_temperatures(device, form, temperature):
    """At an integer T the CPU kernels take the hard term's exp(s - c) as the T-th power of the soft
    term's exp((s - c) / T) (csrc/cpu/hard_term_lanes.h): logits spread over ~150 within a row, so that
    powers fall below the exponential's floor (subnormal, or 0), and labels inside and outside the top-k
    support."""
    teacher_form = "dense" if form in ("dense", "jsd") else ("none" if form == "none" else "topk")
    student, teacher, topk, labels = make_step((5, 3), 3000, torch.float32, seed=11, teacher=teacher_form,
                                               slots=16, device=device)
    student = student * 5  # a std of ~15: rows span ~150
    if topk is not None:
        labels[:2] = topk[0][:2, :, 1].long()
    student, teacher, topk, labels = poison_uncounted(student, teacher, topk, labels)
    tail = "renormalize" if form == "renormalize" else "bucket"
    divergence = "jsd" if form == "jsd" else "forward_kl"
    check(student, teacher, topk, labels, torch.float32, divergence=divergence, tail=tail, temperature=temperature,
          soft_weight=0.8, hard_weight=0.6, label_smoothing=0.1, reduction="sum")


@pytest.mark.parametrize("label_in_support", [True, False])
def test_integer_temperature_support_far_above_the_rest(device, label_in_support):
    """A top-k support 150 above the rest of the row: at T = 2 the complement's chunk sums fall below
    e^-60 and are redone with the support left out of their shift, so the hard term's powers and the
    support's own terms (joined in double) are relative to different shifts."""
    student, _, topk, labels = make_step((6,), 2500, torch.float32, seed=12, teacher="topk", slots=8, device=device)
    idx, lp = topk
    lift = torch.where(lp.isfinite(), 150.0, 0.0).to(student.dtype)
    student = student.scatter_add(-1, idx.clamp(0, 2499), lift)
    if label_in_support:
        labels = idx[:, 0].long()
    else:  # the first token of each row outside its support
        labels = torch.tensor([next(v for v in range(2500) if v not in set(row.tolist())) for row in idx.cpu()],
                              device=device)
    for tail in ("bucket", "renormalize"):
        check(student, None, topk, labels, torch.float32, tail=tail, temperature=2.0, hard_weight=0.7,
              label_smoothing=0.05, reduction="sum")


@pytest.mark.parametrize("temperature", [1.0, 1.5, 2.0])
@pytest.mark.parametrize("form", ["dense", "topk"])
def test_hard_term_after_a_chunk_of_minus_inf(device, form, temperature):
    """A row whose first 1024 logits (a whole chunk of the CPU kernels) are -inf and the rest near -200:
    the hard term's sums must not take the empty chunk's stand-in shift 0 as the row's, which rescaled
    the rest's Z_1 by e^-200 to 0 (the top-k kernel at T != 1 did: CE -inf at T = 1.5, 2.96 for 17.39
    at T = 2)."""
    student, teacher, topk, labels = make_step((3,), 3000, torch.float32, seed=13, teacher=form, slots=8,
                                               device=device)
    student = (student - 200).clone()
    student[:, :1024] = float("-inf")
    if teacher is not None:  # the teacher puts no mass there either, or forward KL is +inf
        teacher = teacher.clone()
        teacher[:, :1024] = float("-inf")
    labels = torch.tensor([1500, 2000, 2999], device=device)
    if topk is not None:  # the support where the logits are finite
        idx, lp = topk
        topk = (torch.where(lp.isfinite(), idx % 1976 + 1024, idx), lp)
    check(student, teacher, topk, labels, torch.float32, temperature=temperature, hard_weight=1.0, reduction="sum")


@pytest.mark.parametrize("reduction", ["none", "sum", "batchmean", "mean"])
@pytest.mark.parametrize("form", FORMS)
def test_reductions(device, reduction, form):
    student, teacher, topk, labels = make_step((4, 3), 257, torch.float32, seed=4, teacher=form, device=device)
    student, teacher, topk, labels = poison_uncounted(student, teacher, topk, labels)
    check(student, teacher, topk, labels, torch.float32, hard_weight=1.0, soft_weight=0.5, reduction=reduction)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("form", FORMS)
def test_dtypes(device, dtype, form):
    student, teacher, topk, labels = make_step((9,), 2100, dtype, seed=5, teacher=form, device=device)
    check(student, teacher, topk, labels, dtype, hard_weight=0.5, temperature=1.3, label_smoothing=0.1)


def test_independent_oracle_f_cross_entropy_and_scipy(device):
    student, teacher = make_step((6,), 500, torch.float64, seed=6)[:2]
    labels = make_labels((6,), 500, seed=7, ignored=0.0, device=device)
    for divergence in ("forward_kl", "reverse_kl", "jsd"):
        for temperature, eps in ((1.0, 0.0), (2.0, 0.2)):
            options = dict(divergence=divergence, beta=0.4, temperature=temperature, soft_weight=0.6, hard_weight=0.9,
                           label_smoothing=eps)
            with must_run():
                rows = kl_fused.distillation_loss(student, teacher, labels=labels, reduction="none", **options)
            assert_close(rows, oracle_rows(student, teacher, labels, **options), 1e-10, 1e-12, divergence)


@pytest.mark.parametrize("eps", [0.0, 0.1, 1.0])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_without_a_teacher_it_is_f_cross_entropy(device, eps, dtype):
    student = (3 * torch.randn(5, 7, 1000, generator=torch.Generator().manual_seed(8))).to(device=device, dtype=dtype)
    labels = make_labels((5, 7), 1000, seed=9, device=device)
    s1 = student.clone().requires_grad_()
    with must_run():
        loss = kl_fused.distillation_loss(s1, labels=labels, hard_weight=1.0, label_smoothing=eps)
    loss.backward()
    s2 = student.float().clone().requires_grad_()
    expected = F.cross_entropy(s2.view(-1, 1000), labels.view(-1), ignore_index=IGNORE, label_smoothing=eps)
    expected.backward()
    tol = TOLERANCES[dtype]
    assert_close(loss, expected, tol["loss_rtol"] * 10, tol["loss_atol"], "loss vs F.cross_entropy")
    assert_grad_close(s1.grad, s2.grad, dtype, "grad vs F.cross_entropy")


@pytest.mark.parametrize("form", ["dense", "topk"])
@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_without_labels_it_is_exactly_the_soft_function(device, form, divergence):
    if form == "topk" and divergence != "forward_kl":
        pytest.skip("top-k: forward KL only")
    student, teacher, topk, _ = make_step((5,), 700, torch.bfloat16, seed=10, teacher=form, device=device)
    got, grad_s, grad_t = run(student, teacher, topk, None, divergence=divergence, beta=0.3, temperature=1.7)
    s = student.detach().clone().requires_grad_()
    if form == "dense":
        t = teacher.detach().clone().requires_grad_()
        if divergence == "jsd":
            expected = kl_fused.jsd_logits(s, t, beta=0.3, temperature=1.7)
        else:
            expected = kl_fused.kl_div_logits(s, t, temperature=1.7,
                                              direction="reverse" if divergence == "reverse_kl" else "forward")
        other = t
    else:
        lp = topk[1].detach().clone().requires_grad_()
        expected = kl_fused.sparse_kl_div(s, topk[0], lp, temperature=1.7)
        other = lp
    expected.backward()
    assert torch.equal(got, expected) and torch.equal(grad_s, s.grad) and torch.equal(grad_t, other.grad)


def test_return_parts_weights_and_logging(device):
    student, teacher, _, labels = make_step((6,), 300, torch.float32, seed=11, device=device)
    s = student.clone().requires_grad_()
    with must_run():
        parts = kl_fused.distillation_loss(s, teacher, labels=labels, soft_weight=0.3, hard_weight=0.8,
                                           temperature=2.0, return_parts=True)
    assert isinstance(parts, kl_fused.LossParts) and not parts.soft.requires_grad and not parts.hard.requires_grad
    assert_close(parts.loss, 0.3 * parts.soft + 0.8 * parts.hard, 1e-6, 1e-7, "loss = weighted parts")
    kl = kl_fused.kl_div_logits(student, teacher, temperature=2.0, mask=labels != IGNORE)
    ce = F.cross_entropy(student, labels, ignore_index=IGNORE)
    assert_close(parts.soft, kl, 1e-5, 1e-6, "soft part")
    assert_close(parts.hard, ce, 1e-5, 1e-6, "hard part")
    rows = kl_fused.distillation_loss(student, teacher, labels=labels, hard_weight=0.8, reduction="none",
                                      return_parts=True)
    assert rows.soft.shape == rows.hard.shape == rows.loss.shape == (6,)


@pytest.mark.parametrize("as_tensor", [False, True])
@pytest.mark.parametrize("form", FORMS)
def test_num_items_in_batch_replaces_the_count(device, as_tensor, form):
    student, teacher, topk, labels = make_step((8,), 400, torch.float32, seed=12, teacher=form, device=device)
    num = torch.tensor(37, device=device) if as_tensor else 37
    loss, grad_s, _ = run(student, teacher, topk, labels, hard_weight=1.0, num_items_in_batch=num)
    total, grad_sum, _ = run(student, teacher, topk, labels, hard_weight=1.0, reduction="sum")
    assert_close(loss, total / 37, 1e-6, 1e-7, "loss")
    assert_grad_close(grad_s, grad_sum / 37, torch.float32, "grad")
    with pytest.raises(ValueError, match="num_items_in_batch .* needs reduction='batchmean'"):
        kl_fused.distillation_loss(student, teacher, teacher_topk=topk, labels=labels, hard_weight=1.0,
                                   reduction="sum", num_items_in_batch=num)


def test_per_row_upstream_retained_graph_and_inputs_unmodified(device):
    student, teacher, _, labels = make_step((5,), 600, torch.float32, seed=13, device=device)
    copies = (student.clone(), teacher.clone(), labels.clone())
    s = student.clone().requires_grad_()
    t = teacher.clone().requires_grad_()
    with must_run():
        rows = kl_fused.distillation_loss(s, t, labels=labels, hard_weight=0.5, reduction="none")
    weights = torch.tensor([0.5, -1.0, 2.0, 0.0, 3.0], device=device)
    rows.backward(weights, retain_graph=True)
    first = (s.grad.clone(), t.grad.clone())
    s.grad = t.grad = None
    rows.backward(weights)  # a second backward through the retained graph
    s64, t64 = student.double().requires_grad_(), teacher.double().requires_grad_()
    ref = kl_fused.reference.distillation_loss(s64, t64, labels=labels, hard_weight=0.5, reduction="none")
    ref.backward(weights.double())
    for got in (first, (s.grad, t.grad)):
        assert_grad_close(got[0], s64.grad, torch.float32, "student grad")
        assert_grad_close(got[1], t64.grad, torch.float32, "teacher grad")
    assert all(torch.equal(a, b) for a, b in zip(copies, (student, teacher, labels)))


def test_torch_compile_fullgraph(device):
    student, teacher, _, labels = make_step((4, 3), 256, torch.float32, seed=14, device=device)

    def step(s, t, y):
        return kl_fused.distillation_loss(s, t, labels=y, hard_weight=0.5, temperature=2.0, num_items_in_batch=9)

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    s1, s2 = student.clone().requires_grad_(), student.clone().requires_grad_()
    eager = step(s1, teacher, labels)
    eager.backward()
    got = compiled(s2, teacher, labels)
    got.backward()
    assert_close(got, eager, 1e-6, 1e-7, "compiled loss")
    assert_grad_close(s2.grad, s1.grad, torch.float32, "compiled grad")


def test_opcheck(device):
    student, teacher, topk, labels = make_step((6,), 64, torch.float32, seed=15, teacher="topk", device=device)
    _, dense, _, _ = make_step((6,), 64, torch.float32, seed=15, device=device)
    mask = torch.tensor([1, 1, 0, 1, 1, 1], dtype=torch.bool, device=device)
    num = torch.tensor(4, device=device)
    s = student.clone().requires_grad_()
    for args in (
        (s, dense.clone().requires_grad_(), None, None, labels, mask, None, "jsd", 0.3, False, 1.5, 0.5, 0.5, IGNORE,
         0.1, "batchmean", 0.0, True, True, True, False),
        (s, None, topk[0], topk[1].clone().requires_grad_(), labels, None, num, "forward_kl", 0.5, False, 1.0, 1.0,
         1.0, IGNORE, 0.0, "batchmean", 1e-3, True, True, False, True),
        (s, None, None, None, labels, mask, None, "forward_kl", 0.5, False, 1.0, 1.0, 1.0, IGNORE, 0.0, "none",
         0.0, True, True, False, False),
    ):
        torch.library.opcheck(DISTILL_OP, args)


def test_gradcheck_float64(device):
    student, teacher, _, labels = make_step((3,), 11, torch.float64, seed=16, device=device)
    fn = lambda s, t: kl_fused.distillation_loss(s, t, labels=labels, hard_weight=0.7, label_smoothing=0.2,  # noqa
                                                 temperature=1.4, divergence="jsd", reduction="sum")
    assert torch.autograd.gradcheck(fn, (student.requires_grad_(), teacher.requires_grad_()))


def test_label_out_of_range_raises_or_gives_nan_rows(device):
    student, teacher, topk, labels = make_step((6,), 50, torch.float32, seed=17, teacher="topk", device=device)
    labels = make_labels((6,), 50, seed=18, ignored=0.0, device=device)
    for bad in (50, -3):
        labels_bad = labels.clone()
        labels_bad[4] = bad
        for form in ("dense", "topk", "none"):
            kwargs = dict(teacher_topk=topk) if form == "topk" else {}
            t = make_step((6,), 50, torch.float32, seed=17, device=device)[1] if form == "dense" else None
            with pytest.raises(ValueError, match=rf"labels must lie in \[0, V\) = \[0, 50\).*row 4 holds {bad}"):
                kl_fused.distillation_loss(student, t, labels=labels_bad, hard_weight=1.0, **kwargs)
            s = student.clone().requires_grad_()
            rows = kl_fused.distillation_loss(s, t, labels=labels_bad, hard_weight=1.0, reduction="none",
                                              validate=False, **kwargs)
            rows.sum().backward()
            assert rows[4].isnan() and rows[[0, 1, 2, 3, 5]].isfinite().all()
            assert s.grad[4].isnan().all() and s.grad[[0, 1, 2, 3, 5]].isfinite().all()
    # A masked row's label is never read.
    labels_bad = labels.clone()
    labels_bad[2] = 10**6
    mask = torch.ones(6, dtype=torch.bool, device=device)
    mask[2] = False
    loss = kl_fused.distillation_loss(student, teacher_topk=topk, labels=labels_bad, hard_weight=1.0, mask=mask)
    assert loss.isfinite()


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(hard_weight=1.0), ValueError, "hard_weight = 1.0 > 0 needs labels"),
    (dict(teacher=False, labels=True), ValueError, "nothing to compute"),
    (dict(labels=True, hard_weight=-1.0), ValueError, "hard_weight must be finite and >= 0"),
    (dict(soft_weight=float("nan")), ValueError, "soft_weight must be finite and >= 0"),
    (dict(labels=True, label_smoothing=1.5), ValueError, r"label_smoothing must be in \[0, 1\]"),
    (dict(labels="float"), TypeError, "labels must be int64 or int32"),
    (dict(labels="shape"), ValueError, "labels must have the leading shape"),
    (dict(topk=True), ValueError, "either as teacher_logits .* or as teacher_topk, not both"),
    (dict(teacher=False, topk=True, divergence="jsd"), ValueError, "teacher_topk supports divergence='forward_kl' only"),
    (dict(divergence="kl"), ValueError, "divergence must be one of"),
    (dict(ignore_index=1.5), TypeError, "ignore_index must be a Python int"),
    (dict(num_items_in_batch=-1), ValueError, "num_items_in_batch must be >= 0"),
    (dict(num_items_in_batch=torch.ones(2)), ValueError, "0-dim tensor"),
    (dict(teacher_topk="x"), TypeError, "teacher_topk must be a pair"),
])
def test_errors_name_the_problem(device, kwargs, error, message):
    student, teacher, topk, labels = make_step((4,), 30, torch.float32, seed=19, teacher="topk", device=device)
    dense = make_step((4,), 30, torch.float32, seed=19, device=device)[1]
    kwargs = dict(kwargs)
    teacher_arg = dense if kwargs.pop("teacher", True) else None
    if kwargs.pop("topk", False):
        kwargs["teacher_topk"] = topk
    given = kwargs.pop("labels", None)
    if given is True:
        kwargs["labels"] = labels
    elif given == "float":
        kwargs["labels"] = labels.float()
    elif given == "shape":
        kwargs["labels"] = labels[:3]
    with pytest.raises(error, match=message):
        kl_fused.distillation_loss(student, teacher_arg, **kwargs)


def test_module(device):
    student, teacher, _, labels = make_step((5,), 90, torch.float64, seed=20, device=device)
    module = kl_fused.DistillationLoss(divergence="reverse_kl", temperature=2.0, soft_weight=4.0, hard_weight=0.5,
                                       label_smoothing=0.1)
    got = module(student, teacher, labels=labels)
    expected = kl_fused.reference.distillation_loss(student, teacher, labels=labels, divergence="reverse_kl",
                                                    temperature=2.0, soft_weight=4.0, hard_weight=0.5,
                                                    label_smoothing=0.1)
    assert_close(got, expected, 1e-12, 1e-14, "module")
    assert "hard_weight=0.5" in repr(module)
    with pytest.raises(ValueError, match="label_smoothing"):
        kl_fused.DistillationLoss(label_smoothing=2.0)
