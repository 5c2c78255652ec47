"""sparse_kl_div's torch.library contract and errors: opcheck, torch.compile(fullgraph=True) parity, the
fallback path, and a clear ValueError/TypeError for each kind of bad input, from the API, the op and
the reference alike."""

import warnings

import pytest
import torch

import kl_fused
from conftest import assert_close, fused_op_must_run
from kl_fused import _warn_once
from sparse_helpers import NEG_INF, make_sparse, op_call

SPARSE_OP = torch.ops.kl_fused.sparse_kl_div.default
V, K = 40, 6
S, IDX, LP = make_sparse((3,), V, K, torch.float32, seed=40)


def test_opcheck_sparse_kl_div():
    student, idx, lp = make_sparse((2, 3), 37, 5, torch.float32, seed=41, unused=2)
    mask = torch.tensor([[True, False, True], [True, True, False]])
    for reduction in ("none", "sum", "batchmean", "mean"):
        for tail in ("bucket", "renormalize"):
            s = student.clone().requires_grad_()
            lp_grad = lp.clone().requires_grad_()
            args = op_call(s, idx, lp_grad, mask=mask if tail == "bucket" else None, temperature=1.7, tail=tail,
                           reduction=reduction)
            torch.library.opcheck(SPARSE_OP, args)
    s16 = student.to(torch.bfloat16).requires_grad_()
    torch.library.opcheck(SPARSE_OP, op_call(s16, idx.int(), lp.to(torch.bfloat16), student_grad=True,
                                             logprobs_grad=False))
    torch.library.opcheck(SPARSE_OP, op_call(student, idx, lp, student_grad=False, logprobs_grad=False, validate=False))


@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize("reduction", ["batchmean", "none"])
def test_compile_fullgraph_matches_eager(tail, reduction):
    torch._dynamo.reset()
    student, idx, lp = make_sparse((4, 6), 300, 12, torch.float32, seed=42, unused=3)
    mask = torch.rand(4, 6, generator=torch.Generator().manual_seed(2)) > 0.2

    def step(s, l):
        loss = kl_fused.sparse_kl_div(s, idx, l, temperature=2.0, tail=tail, reduction=reduction, mask=mask)
        return (loss * 1.5).sum()

    traced = []

    def backend(gm, example_inputs):  # inductor, after noting which ops the graph calls
        from torch._inductor.compile_fx import compile_fx

        traced.extend(str(node.target) for node in gm.graph.nodes)
        return compile_fx(gm, example_inputs)

    compiled = torch.compile(step, fullgraph=True, backend=backend)
    grads = []
    for fn in (step, compiled):
        s = student.clone().requires_grad_()
        l = lp.clone().requires_grad_()
        if fn is step:
            with fused_op_must_run(SPARSE_OP):
                out = fn(s, l)
        else:
            out = fn(s, l)  # (a dispatch mode would stop dynamo: the traced graph shows the op instead)
        out.backward()
        grads.append((out.detach(), s.grad, l.grad))
    assert "kl_fused.sparse_kl_div" in traced, traced
    for eager, compiled_value, what in zip(grads[0], grads[1], ("loss", "student grad", "log-prob grad")):
        assert_close(compiled_value, eager, 1e-6, 1e-8, what)


def test_fallback_runs_the_reference_and_says_so_once(monkeypatch):
    from kl_fused import _ops

    monkeypatch.setitem(_ops._DEVICE_TYPES, "sparse_kl_div", frozenset())
    _warn_once.forget(("sparse_kl_div", "cpu"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss = kl_fused.sparse_kl_div(S, IDX, LP)
        kl_fused.sparse_kl_div(S, IDX, LP)
    assert [str(w.message) for w in caught if "sparse_kl_div" in str(w.message)] == [
        "kl_fused: no fused kernel for sparse_kl_div on device 'cpu' (kl_fused._C was built without cpu kernels for "
        "sparse_kl_div); using the pure-PyTorch reference, which is slower and uses more memory"
    ]
    monkeypatch.undo()
    with fused_op_must_run(SPARSE_OP):
        fused = kl_fused.sparse_kl_div(S, IDX, LP)
    assert_close(loss, fused, 1e-5, 1e-7, "fallback vs fused")


def _bad(idx=None, lp=None):
    return (IDX.clone() if idx is None else idx), (LP.clone() if lp is None else lp)


def _out_of_range():
    idx, lp = _bad()
    idx[1, 3] = V
    return dict(teacher_indices=idx, teacher_logprobs=lp)


def _negative_index():
    idx, lp = _bad()
    idx[2, 0] = -1
    return dict(teacher_indices=idx, teacher_logprobs=lp)


def _duplicate():
    idx, lp = _bad()
    idx[0, 4] = idx[0, 1]
    return dict(teacher_indices=idx, teacher_logprobs=lp)


def _mass_above_one():
    idx, lp = _bad()
    lp[1, :2] = -0.1
    return dict(teacher_indices=idx, teacher_logprobs=lp)


DATA_CASES = [
    (_out_of_range, r"\[0, V\) = \[0, 40\).* row 1"),
    (_negative_index, r"\[0, V\) = \[0, 40\).* row 2"),
    (_duplicate, r"same token id twice .* row 0"),
    (_mass_above_one, r"support mass .* row 1"),
]


@pytest.mark.parametrize("fn", [kl_fused.sparse_kl_div, kl_fused.reference.sparse_kl_div], ids=["fused", "reference"])
@pytest.mark.parametrize("case,message", DATA_CASES, ids=[c[0].__name__ for c in DATA_CASES])
def test_bad_supports_raise_a_value_error_naming_the_row(fn, case, message):
    kwargs = case()
    with pytest.raises(ValueError, match=message):
        fn(S, **kwargs)


@pytest.mark.parametrize("fn", [kl_fused.sparse_kl_div, kl_fused.reference.sparse_kl_div], ids=["fused", "reference"])
@pytest.mark.parametrize("case", [c[0] for c in DATA_CASES], ids=[c[0].__name__ for c in DATA_CASES])
def test_without_validation_bad_rows_are_nan_and_the_others_exact(fn, case):
    kwargs = case()
    rows = fn(S, **kwargs, reduction="none", validate=False)
    good = kl_fused.sparse_kl_div(S, IDX, LP, reduction="none")
    bad = torch.isnan(rows)
    assert bad.sum() == 1
    assert_close(rows[~bad], good[~bad], 1e-6, 1e-8, "the other rows")


def test_bad_slots_that_are_unused_or_masked_are_fine():
    idx, lp = _bad()
    idx[0, 2], lp[0, 2] = 10**9, NEG_INF          # out of range, unused
    idx[1, 3], lp[1, 3] = idx[1, 0], NEG_INF      # a duplicate, unused
    kl_fused.sparse_kl_div(S, idx, lp)
    idx[2, 0] = -5                                # out of range on a masked row
    with fused_op_must_run(SPARSE_OP):
        kl_fused.sparse_kl_div(S, idx, lp, mask=torch.tensor([True, True, False]))


def test_the_op_itself_checks_its_arguments():
    with pytest.raises(ValueError, match=r"teacher_indices must lie in \[0, V\)"):
        SPARSE_OP(*op_call(S, _out_of_range()["teacher_indices"], LP))
    with pytest.raises(ValueError, match="same shape"):
        SPARSE_OP(*op_call(S, IDX, LP[:, :3]))
    with pytest.raises(TypeError, match="int64 or int32"):
        SPARSE_OP(*op_call(S, IDX.float(), LP))
    with pytest.raises(ValueError, match="K >= 1"):
        SPARSE_OP(*op_call(S, IDX[:, :0], LP[:, :0]))
    with pytest.raises(ValueError, match="reduction"):
        SPARSE_OP(*op_call(S, IDX, LP, reduction="avg"))


CASES = [
    (dict(teacher_indices=IDX[:, :3]), ValueError, "same shape"),
    (dict(teacher_indices=IDX[:2], teacher_logprobs=LP[:2]), ValueError, "leading shape"),
    (dict(teacher_indices=IDX[None], teacher_logprobs=LP[None]), ValueError, "leading shape"),
    (dict(teacher_indices=IDX[:, :0], teacher_logprobs=LP[:, :0]), ValueError, "K >= 1"),
    (dict(teacher_indices=IDX.float()), TypeError, "int64 or int32"),
    (dict(teacher_indices=IDX.to(torch.int16)), TypeError, "int64 or int32"),
    (dict(teacher_logprobs=LP.to(torch.int64)), TypeError, "teacher_logprobs must be float"),
    (dict(student_logits=S.to(torch.int64)), TypeError, "student_logits must be float"),
    (dict(student_logits=S.numpy()), TypeError, "torch.Tensor"),
    (dict(teacher_indices=IDX.tolist()), TypeError, "torch.Tensor"),
    (dict(student_logits=torch.tensor(1.0)), ValueError, "0-dim"),
    (dict(student_logits=torch.randn(3, 0)), ValueError, "non-empty"),
    (dict(mask=torch.ones(3)), TypeError, "bool"),
    (dict(mask=torch.ones(3, 1, dtype=torch.bool)), ValueError, "leading shape"),
    (dict(tail="top"), ValueError, "tail"),
    (dict(reduction="average"), ValueError, "reduction"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(temperature=float("nan")), ValueError, "temperature"),
    (dict(temperature=torch.tensor(2.0)), TypeError, "temperature"),
    (dict(validate=1), TypeError, "validate"),
    (dict(teacher_indices=IDX.to("meta")), ValueError, "device"),
]


@pytest.mark.parametrize("fn", [kl_fused.sparse_kl_div, kl_fused.reference.sparse_kl_div], ids=["fused", "reference"])
@pytest.mark.parametrize("overrides,error,message", CASES, ids=[c[2] + str(i) for i, c in enumerate(CASES)])
def test_bad_arguments_raise_a_clear_error(fn, overrides, error, message):
    kwargs = dict(student_logits=S, teacher_indices=IDX, teacher_logprobs=LP)
    kwargs.update(overrides)
    with pytest.raises(error, match=message):
        fn(**kwargs)


@pytest.mark.parametrize("args,error,message", [
    ((torch.randn(3, 10), 0), ValueError, r"k must be in \[1, V\]"),
    ((torch.randn(3, 10), 11), ValueError, r"k must be in \[1, V\]"),
    ((torch.randn(3, 10), 2.0), TypeError, "k must be a Python int"),
    ((torch.randint(0, 3, (3, 10)), 2), TypeError, "teacher_logits must be float"),
    ((torch.randn(3, 0), 1), ValueError, "V >= 1"),
])
def test_topk_teacher_bad_arguments(args, error, message):
    with pytest.raises(error, match=message):
        kl_fused.topk_teacher(*args)
    with pytest.raises(ValueError, match="temperature"):
        kl_fused.topk_teacher(torch.randn(2, 5), 2, temperature=-1.0)
