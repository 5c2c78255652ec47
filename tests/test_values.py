"""Loss values against the float64 reference, scipy's rel_entr and F.kl_div, over the contract's grid."""

import pytest
import torch
import torch.nn.functional as F

import kl_fused
from conftest import DTYPES, TOLERANCES, assert_close, fused_op_must_run, make_logits, reference64, scipy_row_kl

SHAPES = [(1, 1), (4, 2), (3, 1271), (1, 70000), (2, 3, 257)]  # V = 1, 2, odd, > 65536; one row; 3-D


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_row_losses_match_reference_and_scipy(device, dtype, shape, direction):
    student, teacher = make_logits(shape, dtype, device, seed=sum(shape) + len(direction))
    with fused_op_must_run():
        rows = kl_fused.kl_div_logits(student, teacher, reduction="none", direction=direction, temperature=1.5)
    expected_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert rows.dtype == expected_dtype and rows.shape == shape[:-1] and rows.device.type == device
    ref, _, _ = reference64(student, teacher, reduction="none", direction=direction, temperature=1.5)
    tol = TOLERANCES[dtype]
    assert_close(rows, ref, tol["loss_rtol"], tol["loss_atol"], "vs float64 reference")
    oracle = torch.from_numpy(scipy_row_kl(student, teacher, 1.5, direction))
    assert_close(rows, oracle, tol["loss_rtol"], tol["loss_atol"], "vs scipy rel_entr")
    assert (rows >= 0).all(), "KL is never negative"
    if shape[-1] > 1:  # a one-entry softmax is 1 whatever the logit: KL is 0 there
        differs = (student != teacher).any(dim=-1)
        assert (rows[differs] > 0).all(), "rows whose logits differ have positive KL"


@pytest.mark.parametrize("reduction", ["none", "sum", "batchmean", "mean"])
@pytest.mark.parametrize("temperature", [0.5, 1.0, 4.0])
@pytest.mark.parametrize("masked", [False, True])
def test_reductions_temperatures_masks(device, reduction, temperature, masked):
    student, teacher = make_logits((3, 5, 333), torch.float32, device, seed=7)
    mask = None
    if masked:
        mask = torch.tensor([[1, 0, 1, 1, 0], [0, 0, 0, 0, 0], [1, 1, 1, 0, 1]], dtype=torch.bool, device=device)
    loss = kl_fused.kl_div_logits(student, teacher, temperature=temperature, reduction=reduction, mask=mask)
    ref, _, _ = reference64(student, teacher, temperature=temperature, reduction=reduction, mask=mask)
    assert loss.shape == ref.shape
    assert_close(loss, ref, 2e-5, 2e-6, f"{reduction} T={temperature}")
    # Independent check of the reduction arithmetic from scipy's per-row values.
    rows = torch.from_numpy(scipy_row_kl(student, teacher, temperature))
    keep = torch.ones(3, 5, dtype=torch.bool) if mask is None else mask.cpu()
    rows = torch.where(keep, rows, 0.0)
    count = max(int(keep.sum()), 1)
    expected = {"none": rows, "sum": rows.sum(), "batchmean": rows.sum() / count, "mean": rows.sum() / (count * 333)}
    assert_close(loss, expected[reduction], 2e-5, 2e-6, f"{reduction} from scipy rows")


@pytest.mark.parametrize("reduction", ["batchmean", "mean", "sum"])
def test_two_dim_input_matches_f_kl_div(device, reduction):
    student, teacher = make_logits((6, 1000), torch.float64, device, seed=3)
    loss = kl_fused.kl_div_logits(student, teacher, reduction=reduction)
    expected = F.kl_div(F.log_softmax(student, -1), F.log_softmax(teacher, -1), log_target=True, reduction=reduction)
    assert_close(loss, expected, 1e-10, 1e-12, reduction)


def test_batchmean_of_3d_input_divides_by_tokens_not_batch(device):
    student, teacher = make_logits((2, 7, 50), torch.float64, device, seed=4)
    loss = kl_fused.kl_div_logits(student, teacher, reduction="batchmean")
    per_token = kl_fused.kl_div_logits(student, teacher, reduction="none")
    assert_close(loss, per_token.sum() / 14, 1e-12, 1e-14)


def test_no_counted_rows_gives_zero_not_nan(device):
    student, teacher = make_logits((4, 10), torch.float32, device, seed=5)
    mask = torch.zeros(4, dtype=torch.bool, device=device)
    for reduction in ("sum", "batchmean", "mean"):
        assert kl_fused.kl_div_logits(student, teacher, reduction=reduction, mask=mask).item() == 0.0
        empty = kl_fused.kl_div_logits(student[:0], teacher[:0], reduction=reduction)
        assert empty.item() == 0.0 and empty.shape == ()
    assert kl_fused.kl_div_logits(student[:0], teacher[:0], reduction="none").shape == (0,)


def test_module_matches_function(device):
    student, teacher = make_logits((4, 100), torch.float32, device, seed=6)
    module = kl_fused.KLDivLogitsLoss(temperature=2.0, reduction="sum", direction="reverse")
    expected = kl_fused.kl_div_logits(student, teacher, temperature=2.0, reduction="sum", direction="reverse")
    assert torch.equal(module(student, teacher), expected)
    assert "temperature=2.0" in repr(module)
