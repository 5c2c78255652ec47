"""The edges that decide correctness: infinities, NaN, huge logits, masked garbage, strided views,
determinism, and inputs left untouched."""

import math

import pytest
import torch

import kl_fused
from conftest import DTYPES, TOLERANCES, assert_close, assert_grad_close, make_logits, reference64

NEG_INF = float("-inf")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_zero_probability_entries_give_finite_loss_and_gradient(device, dtype, direction):
    student, teacher = make_logits((3, 40), dtype, device, seed=21)
    # forward: teacher -inf is p = 0; reverse: student -inf is q = 0 (the distribution averaged over).
    zeroed = teacher if direction == "forward" else student
    zeroed[:, ::3] = NEG_INF
    student.requires_grad_()
    teacher.requires_grad_()
    rows = kl_fused.kl_div_logits(student, teacher, direction=direction, reduction="none")
    rows.sum().backward()
    assert torch.isfinite(rows).all()
    assert torch.isfinite(student.grad.float()).all() and torch.isfinite(teacher.grad.float()).all()
    ref, s64, t64 = reference64(student, teacher, direction=direction, reduction="none")
    ref.sum().backward()
    tol = TOLERANCES[dtype]
    assert_close(rows, ref, tol["loss_rtol"], tol["loss_atol"], "loss")
    assert_grad_close(student.grad, s64.grad, dtype, "student grad")
    assert_grad_close(teacher.grad, t64.grad, dtype, "teacher grad")


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_missing_mass_where_the_other_side_has_it_is_infinite(device, direction):
    student, teacher = make_logits((2, 30), torch.float32, device, seed=22)
    # forward: student -inf where the teacher has mass; reverse: teacher -inf where the student has.
    (student if direction == "forward" else teacher)[0, 5] = NEG_INF
    rows = kl_fused.kl_div_logits(student, teacher, direction=direction, reduction="none")
    assert rows[0].item() == math.inf
    assert math.isfinite(rows[1].item())


@pytest.mark.parametrize("which", ["student", "teacher"])
def test_nan_in_a_counted_row_gives_nan(device, which):
    student, teacher = make_logits((3, 100), torch.float32, device, seed=23)
    (student if which == "student" else teacher)[1, 17] = float("nan")
    rows = kl_fused.kl_div_logits(student, teacher, reduction="none")
    assert math.isnan(rows[1].item())
    assert torch.isfinite(rows[[0, 2]]).all()
    assert math.isnan(kl_fused.kl_div_logits(student, teacher).item())


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("which", ["student", "teacher"])
def test_nan_gives_nan_even_where_the_averaged_side_has_no_mass(device, direction, which):
    student, teacher = make_logits((2, 300), torch.float32, device, seed=25)
    averaged = teacher if direction == "forward" else student
    averaged[1, 40] = -1e3  # exp(-1e3 - max) is 0 in float32: that entry carries no weight
    (student if which == "student" else teacher)[1, 40] = float("nan")
    student.requires_grad_()
    rows = kl_fused.kl_div_logits(student, teacher, direction=direction, reduction="none")
    rows.sum().backward()
    assert math.isnan(rows[1].item()) and math.isfinite(rows[0].item())
    assert torch.isnan(student.grad[1]).all() and torch.isfinite(student.grad[0]).all()


@pytest.mark.parametrize("bad", [float("inf"), "all -inf"])
def test_undefined_softmax_gives_nan(device, bad):
    student, teacher = make_logits((2, 50), torch.float32, device, seed=26)
    if bad == "all -inf":
        teacher[0] = NEG_INF
    else:
        student[0, 3] = bad
    student.requires_grad_()
    rows = kl_fused.kl_div_logits(student, teacher, reduction="none")
    rows.sum().backward()
    ref, _, _ = reference64(student, teacher, reduction="none")
    assert math.isnan(ref[0].item()), "the reference calls this row undefined too"
    assert math.isnan(rows[0].item()) and math.isfinite(rows[1].item())
    assert torch.isnan(student.grad[0]).all() and torch.isfinite(student.grad[1]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_huge_logits_are_exact(device, dtype):
    student, teacher = make_logits((4, 1000), dtype, device, seed=24, scale=1.0)
    student = student + 1e4
    teacher = teacher - 1e4
    student[:, 0] = -1e4
    teacher[:, 1] = 1e4
    rows = kl_fused.kl_div_logits(student, teacher, reduction="none")
    ref, _, _ = reference64(student, teacher, reduction="none")
    assert torch.isfinite(rows).all()
    tol = TOLERANCES[dtype]
    assert_close(rows, ref, tol["loss_rtol"], tol["loss_atol"], "logits near 1e4")


def test_masked_rows_are_never_read(device):
    student, teacher = make_logits((4, 5, 64), torch.float32, device, seed=25)
    mask = torch.ones(4, 5, dtype=torch.bool, device=device)
    mask[1] = False
    mask[3, 2:] = False
    clean_student, clean_teacher = student.clone(), teacher.clone()
    student[~mask] = float("nan")  # padding garbage
    teacher[~mask] = float("inf")
    student.requires_grad_()
    loss = kl_fused.kl_div_logits(student, teacher, mask=mask)
    loss.backward()
    ref, s64, _ = reference64(clean_student, clean_teacher, mask=mask)
    ref.backward()
    assert_close(loss, ref, 2e-5, 2e-6, "masked loss")
    assert torch.isfinite(student.grad).all()
    assert (student.grad[~mask] == 0).all()
    assert_grad_close(student.grad, s64.grad, torch.float32, "masked grad")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_strided_views_need_no_copy_and_agree(device, dtype):
    student_full, teacher_full = make_logits((3, 9, 130), dtype, device, seed=26)
    student = student_full[:, :-1]  # shifted views: the rows are strided
    teacher = teacher_full[:, 1:]
    assert not student.is_contiguous()
    leaf = student_full.clone().requires_grad_()
    loss = kl_fused.kl_div_logits(leaf[:, :-1], teacher, reduction="sum")
    loss.backward()
    ref, s64, _ = reference64(student.contiguous(), teacher.contiguous(), reduction="sum")
    ref.backward()
    tol = TOLERANCES[dtype]
    assert_close(loss, ref, tol["loss_rtol"], tol["loss_atol"], "shifted views")
    assert_grad_close(leaf.grad[:, :-1], s64.grad, dtype, "grad through the view")
    assert (leaf.grad[:, -1] == 0).all()
    # A last dim with stride != 1 and a permuted leading layout work too (the former is copied).
    transposed_student = student_full.transpose(1, 2).contiguous().transpose(1, 2)
    transposed_teacher = teacher_full.permute(1, 0, 2)
    out = kl_fused.kl_div_logits(transposed_student.permute(1, 0, 2), transposed_teacher, reduction="none")
    expected, _, _ = reference64(student_full.permute(1, 0, 2), teacher_full.permute(1, 0, 2), reduction="none")
    assert_close(out, expected, tol["loss_rtol"], tol["loss_atol"], "strided last dim")


def test_results_are_deterministic(device):
    student, teacher = make_logits((64, 3001), torch.bfloat16, device, seed=27)
    student.requires_grad_()
    results = []
    for _ in range(3):
        student.grad = None
        loss = kl_fused.kl_div_logits(student, teacher, direction="reverse")
        loss.backward()
        results.append((loss.detach().clone(), student.grad.clone()))
    for loss, grad in results[1:]:
        assert torch.equal(loss, results[0][0]) and torch.equal(grad, results[0][1])


def test_inputs_are_not_modified(device):
    student, teacher = make_logits((5, 300), torch.float16, device, seed=28)
    mask = torch.tensor([True, False, True, True, False], device=device)
    copies = (student.clone(), teacher.clone(), mask.clone())
    student.requires_grad_()
    teacher.requires_grad_()
    loss = kl_fused.kl_div_logits(student, teacher, mask=mask, temperature=3.0, reduction="mean")
    (loss * 7).backward()
    for before, after in zip(copies, (student.detach(), teacher.detach(), mask)):
        assert torch.equal(before, after)


def test_vocabulary_of_one_gives_zero_loss_and_gradient(device):
    student, teacher = make_logits((4, 1), torch.float32, device, seed=29)
    student.requires_grad_()
    loss = kl_fused.kl_div_logits(student, teacher, reduction="sum")
    loss.backward()
    assert loss.item() == 0.0 and (student.grad == 0).all()
