"""Bad input gets a ValueError/TypeError that names the problem, from the API and the op alike."""

import pytest
import torch

import kl_fused

S = torch.randn(3, 10)
T = torch.randn(3, 10)

CASES = [
    (dict(student_logits=torch.randn(3, 11)), ValueError, "same shape"),
    (dict(student_logits=torch.randn(10), teacher_logits=torch.randn(3, 10)), ValueError, "same shape"),
    (dict(mask=torch.ones(3, 1, dtype=torch.bool)), ValueError, "leading shape"),
    (dict(mask=torch.ones(3)), TypeError, "bool"),
    (dict(mask=[True, False, True]), TypeError, "mask"),
    (dict(reduction="average"), ValueError, "reduction"),
    (dict(direction="backward"), ValueError, "direction"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(temperature=-1.0), ValueError, "temperature"),
    (dict(temperature=float("inf")), ValueError, "temperature"),
    (dict(temperature=float("nan")), ValueError, "temperature"),
    (dict(temperature=torch.tensor(2.0)), TypeError, "temperature"),
    (dict(student_logits=torch.tensor(1.0), teacher_logits=torch.tensor(1.0)), ValueError, "0-dim"),
    (dict(student_logits=torch.randn(3, 0), teacher_logits=torch.randn(3, 0)), ValueError, "non-empty"),
    (dict(student_logits=torch.randint(0, 5, (3, 10))), TypeError, "floating-point"),
    (dict(teacher_logits=torch.randint(0, 5, (3, 10))), TypeError, "floating-point"),
    (dict(teacher_logits=torch.randn(3, 10, dtype=torch.float64)), TypeError, "same dtype"),
    (dict(student_logits=S.numpy()), TypeError, "torch.Tensor"),
    (dict(student_logits=torch.randn(3, 10, dtype=torch.complex64)), TypeError, "floating-point"),
    (dict(teacher_logits=torch.randn(3, 10, device="meta")), ValueError, "same device"),
    (dict(mask=torch.ones(3, dtype=torch.bool, device="meta")), ValueError, "device"),
]


@pytest.mark.parametrize("fn", [kl_fused.kl_div_logits, kl_fused.reference.kl_div_logits], ids=["fused", "reference"])
@pytest.mark.parametrize("overrides,error,message", CASES, ids=[c[2] + str(i) for i, c in enumerate(CASES)])
def test_bad_arguments_raise_a_clear_error(fn, overrides, error, message):
    kwargs = dict(student_logits=S, teacher_logits=T)
    kwargs.update(overrides)
    student = kwargs.pop("student_logits")
    teacher = kwargs.pop("teacher_logits")
    with pytest.raises(error, match=message):
        fn(student, teacher, **kwargs)


@pytest.mark.parametrize(
    "args,error,message",
    [
        ((torch.randn(3, 10), torch.randn(3, 9), None, 1.0, False, "sum", False, False), ValueError, "same shape"),
        ((S, T, None, 0.0, False, "sum", False, False), ValueError, "temperature"),
        ((S, T, None, 1.0, False, "avg", False, False), ValueError, "reduction"),
        ((S, T, torch.ones(3), 1.0, False, "sum", False, False), TypeError, "bool"),
        ((S, T.double(), None, 1.0, False, "sum", False, False), TypeError, "same dtype"),
        ((torch.tensor(1.0), torch.tensor(1.0), None, 1.0, False, "sum", False, False), ValueError, "0-dim"),
    ],
)
def test_the_op_itself_checks_its_arguments(args, error, message):
    with pytest.raises(error, match=message):
        torch.ops.kl_fused.kl_div_logits(*args)


def test_grad_scale_checks_its_arguments():
    grad = torch.randn(3, 10)
    with pytest.raises(ValueError, match="one per row"):
        torch.ops.kl_fused.grad_scale_(grad, torch.ones(2))
    with pytest.raises(ValueError, match="contiguous"):
        torch.ops.kl_fused.grad_scale_(torch.randn(10, 3).T, torch.ones(1))


def test_module_rejects_bad_configuration():
    with pytest.raises(ValueError, match="reduction"):
        kl_fused.KLDivLogitsLoss(reduction="avg")
    with pytest.raises(ValueError, match="direction"):
        kl_fused.KLDivLogitsLoss(direction="sideways")
    with pytest.raises(ValueError, match="temperature"):
        kl_fused.KLDivLogitsLoss(temperature=0)
