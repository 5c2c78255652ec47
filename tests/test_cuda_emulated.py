"""The CUDA kernels of csrc/cuda, run on the CPU under the SIMT emulator (tests/simt), against the
same float64 reference and scipy oracle as the CPU kernels.

The emulator compiles the unchanged .cu sources with the host compiler: every block's threads run as
fibers, __syncthreads is a real barrier, warp shuffles exchange values in lock-step, ex2.approx errs
as much as the hardware may, every memory access is checked (bounds, alignment, races through
shared and global memory, uninitialised shared memory), no output may keep bytes no kernel wrote,
and every call runs under two schedules whose outputs must be the same bits (tests/simt/emulator.py;
tests/test_simt_emulator.py shows each check at work). The host code path is the real one too:
launch plan, opt-in shared memory, vectorised-or-scalar choice, grid size. Each test asserts which
kernel instantiation ran with which launch configuration, and the last test checks that every
instantiation the host code can launch ran at least once.
"""

import math
import pathlib

import numpy as np
import pytest
import torch

from kl_fused import _shard_math
from conftest import (DTYPES, TOLERANCES, assert_close, assert_grad_close, assert_weighted_grad_close,
                      check_against_reference64, logits_at_scale, make_logits, reference64, scipy_row_kl)
from simt.emulator import CXX_TYPES, DEFAULT_LIMITS, Emulator, assert_owned_kernels_ran, emulated_kl, pack_of
from simt.emulator import only_launch as _only_launch

NEG_INF = float("-inf")


@pytest.fixture(scope="module")
def emu():
    return Emulator()


def only_launch(launches, name="kl_rows_kernel"):
    return _only_launch(launches, name)


def check_against_reference(loss, grad_s, grad_t, student, teacher, dtype, **options):
    """Loss and the gradients at upstream 1 against the float64 reference's autograd."""
    check_against_reference64(reference64, loss, grad_s, grad_t, student, teacher, dtype, **options)


# ------------------------------------------------------------------------------------- kl_div_logits


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("temperature", [1.0, 1.7])
@pytest.mark.parametrize("grads", ["student", "teacher", "both", "none"])
def test_values_and_gradients_on_the_vector_path(emu, dtype, direction, temperature, grads):
    student, teacher = make_logits((5, 320), dtype, "cpu", seed=10 + len(grads) + len(direction))
    need_s, need_t = grads in ("student", "both"), grads in ("teacher", "both")
    loss, grad_s, grad_t, launches = emulated_kl(emu, student, teacher, temperature=temperature, direction=direction,
                                                 student_grad=need_s, teacher_grad=need_t)
    launch = only_launch(launches)
    any_grad = need_s or need_t
    assert launch.template_args == [CXX_TYPES[dtype], str(pack_of(dtype)), "true" if any_grad else "false"]
    check_against_reference(loss, grad_s, grad_t, student, teacher, dtype, student_grad=need_s, teacher_grad=need_t,
                            temperature=temperature, direction=direction, reduction="sum")
    rows, _, _, _ = emulated_kl(emu, student, teacher, temperature=temperature, direction=direction, reduction="none",
                                student_grad=False, teacher_grad=False)
    tol = TOLERANCES[dtype]
    assert_close(rows, scipy_row_kl(student, teacher, temperature, direction), tol["loss_rtol"], tol["loss_atol"], "vs scipy")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("with_grad", [True, False])
def test_values_and_gradients_on_the_scalar_path(emu, dtype, direction, with_grad):
    """V = 333 is no multiple of any pack: one element per access."""
    student, teacher = make_logits((4, 333), dtype, "cpu", seed=15 + len(direction))
    loss, grad_s, grad_t, launches = emulated_kl(emu, student, teacher, temperature=0.9, direction=direction,
                                                 student_grad=with_grad, teacher_grad=with_grad)
    assert only_launch(launches).template_args == [CXX_TYPES[dtype], "1", "true" if with_grad else "false"]
    check_against_reference(loss, grad_s, grad_t, student, teacher, dtype, student_grad=with_grad, teacher_grad=with_grad,
                            temperature=0.9, direction=direction, reduction="sum")


@pytest.mark.parametrize("reduction", ["none", "sum", "batchmean", "mean"])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_reductions_and_masks_holding_nan(emu, reduction, masked, direction):
    student, teacher = make_logits((3, 4, 96), torch.float32, "cpu", seed=20)
    mask = None
    if masked:
        mask = torch.tensor([[1, 0, 1, 1], [0, 0, 0, 0], [1, 1, 0, 1]], dtype=torch.bool)
        student[~mask] = float("nan")  # masked rows are never read
        teacher[~mask] = float("nan")
    loss, grad_s, grad_t, launches = emulated_kl(emu, student, teacher, mask=mask, reduction=reduction,
                                                 direction=direction, temperature=0.8)
    only_launch(launches)
    check_against_reference(loss, grad_s, grad_t, student, teacher, torch.float32, mask=mask, reduction=reduction,
                            direction=direction, temperature=0.8)
    if masked:
        assert (grad_s[~mask] == 0).all() and (grad_t[~mask] == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("reduction", ["none", "batchmean"])
def test_upstream_weights_through_grad_scale(emu, dtype, reduction):
    """Backward's arithmetic on the device: the forward's gradients, scaled by grad_scale_."""
    student, teacher = make_logits((2, 3, 200), dtype, "cpu", seed=21)
    weights = torch.tensor([[0.5, 0.0, 2.0], [-1.0, 1.0, 3.0]]) if reduction == "none" else torch.tensor(-2.5)
    _, grad_s, grad_t, _ = emulated_kl(emu, student, teacher, reduction=reduction, temperature=1.3)
    for grad in (grad_s, grad_t):
        _, launches = emu.call("grad_scale_", grad, weights)
        assert only_launch(launches, "grad_scale_kernel").template_args[1] == str(pack_of(dtype))
    ref, s64, t64 = reference64(student, teacher, reduction=reduction, temperature=1.3)
    ref.backward(weights.double())
    assert_grad_close(grad_s, s64.grad, dtype, "student grad, weighted")
    assert_grad_close(grad_t, t64.grad, dtype, "teacher grad, weighted")


@pytest.mark.parametrize(
    "vocab, dtype",
    [(1, torch.float32), (7, torch.float32), (31, torch.bfloat16), (1271, torch.float32), (1272, torch.float16),
     (4096, torch.float32), (20000, torch.float32), (20000, torch.bfloat16), (6000, torch.float64)],
    ids=str,
)
def test_vocabulary_sizes_and_the_shared_memory_row_cache(emu, vocab, dtype):
    """With 16 KB of opt-in shared memory, small rows are cached whole and large ones in part (on a device
    without thread-block clusters: test_cuda_emulated_cluster.py has those)."""
    optin = 16 * 1024
    student, teacher = make_logits((3, vocab), dtype, "cpu", seed=vocab)
    with emu.limits(max_shared_optin=optin, cluster_launch=False):
        loss, grad_s, grad_t, launches = emulated_kl(emu, student, teacher, temperature=1.2)
    launch = only_launch(launches)
    element = student.element_size()
    pack = pack_of(dtype) if vocab % pack_of(dtype) == 0 else 1
    assert launch.template_args[1] == str(pack)
    units = vocab // pack
    per_thread = 2 * (2 if pack > 1 else 8)
    max_threads = 512 if dtype == torch.float64 else 1024
    threads = 32
    while threads < max_threads and threads * per_thread < units:
        threads *= 2
    assert launch.block == threads
    state_bytes = 5 * (8 if dtype == torch.float64 else 4)
    scratch = (threads // 32 * state_bytes + 15) // 16 * 16
    whole_row = scratch + 2 * vocab * element
    if whole_row <= optin:
        assert launch.shared == whole_row, "the whole row is cached"
    else:
        cached_units = (optin - scratch) // (2 * pack * element)
        assert 0 < cached_units < units and launch.shared == scratch + 2 * cached_units * pack * element, "part of the row"
    check_against_reference(loss, grad_s, grad_t, student, teacher, dtype, temperature=1.2, reduction="sum")


def test_long_rows_use_1024_threads_and_opt_in_shared_memory(emu):
    """An sm_80-like device (no clusters; sm_90's spread this row over two blocks)."""
    student, teacher = make_logits((2, 70000), torch.bfloat16, "cpu", seed=30)
    with emu.limits(cluster_launch=False):
        loss, grad_s, grad_t, launches = emulated_kl(emu, student, teacher, direction="reverse")
    launch = only_launch(launches)
    assert launch.block == 1024 and launch.shared == DEFAULT_LIMITS["max_shared_optin"] // 16 * 16
    check_against_reference(loss, grad_s, grad_t, student, teacher, torch.bfloat16, direction="reverse", reduction="sum")
    rows, _, _, launches = emulated_kl(emu, student, teacher, direction="reverse", reduction="none",
                                       student_grad=False, teacher_grad=False)
    assert only_launch(launches).shared == 1024 // 32 * 20, "without a gradient only the merge scratch"
    assert_close(rows, scipy_row_kl(student, teacher, 1.0, "reverse"), 1e-4, 1e-5, "vs scipy")


def _views():
    gen = torch.Generator().manual_seed(31)
    base = torch.randn(6, 1, 264, generator=gen, dtype=torch.float64) * 3
    return {
        # element offset 1: rows start 4 bytes past a 16-byte boundary
        "misaligned": (lambda x: x.reshape(-1)[1 : 1 + 5 * 256].view(5, 256), 1),
        # a shifted view: every row starts one element past a 16-byte boundary
        "strided_odd": (lambda x: x.reshape(6, 264)[:, 1:257], 1),
        # non-contiguous leading dims whose rows stay 16-byte aligned: the vector path reads them in place
        "strided_aligned": (lambda x: x.reshape(6, 264)[::2, :256], 4),
        "transposed_leading": (lambda x: x.reshape(2, 3, 264)[..., :256].transpose(0, 1), 4),
    }, base


@pytest.mark.parametrize("view", ["misaligned", "strided_odd", "strided_aligned", "transposed_leading"])
def test_views_choose_the_scalar_or_vector_path_and_are_read_in_place(emu, view):
    views, base = _views()
    make_view, pack = views[view]
    teacher_base = base.float()
    student_base = (0.7 * base + torch.randn(base.shape, generator=torch.Generator().manual_seed(32), dtype=torch.float64)).float()
    student, teacher = make_view(student_base), make_view(teacher_base)
    loss, grad_s, grad_t, launches = emulated_kl(emu, student, teacher, temperature=2.0)
    assert only_launch(launches).template_args[1] == str(pack)
    check_against_reference(loss, grad_s, grad_t, student, teacher, torch.float32, temperature=2.0, reduction="sum")


def test_a_small_grid_walks_the_rows_grid_stride(emu):
    """Each block takes several rows, with several warps: the per-warp merge states and the row cache
    are reused from row to row, which is where a missing barrier between rows would race."""
    student, teacher = make_logits((11, 2000), torch.float32, "cpu", seed=33)
    mask = torch.tensor([1, 1, 0, 1, 1, 1, 0, 1, 1, 1, 1], dtype=torch.bool)
    with emu.limits(max_grid_x=3):
        loss, grad_s, grad_t, launches = emulated_kl(emu, student, teacher, mask=mask, reduction="batchmean")
        launch = only_launch(launches)
        assert launch.grid == 3 and launch.block == 128
        scaled, launches = emu.call("grad_scale_", grad_s, torch.linspace(0.5, 1.5, 11))
        assert only_launch(launches, "grad_scale_kernel").grid == 3
    ref, s64, _ = reference64(student, teacher, mask=mask, reduction="batchmean")
    ref.backward(torch.ones_like(ref))
    assert_close(loss, ref, 2e-5, 2e-6, "loss")
    assert_grad_close(grad_s, s64.grad * torch.linspace(0.5, 1.5, 11, dtype=torch.float64)[:, None], torch.float32, "grad")


# ------------------------------------------------------------------------------------- edges


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_zero_probability_entries(emu, dtype, direction):
    student, teacher = make_logits((3, 64), dtype, "cpu", seed=40)
    (teacher if direction == "forward" else student)[:, ::3] = NEG_INF
    loss, grad_s, grad_t, _ = emulated_kl(emu, student, teacher, direction=direction, reduction="none")
    assert torch.isfinite(loss).all() and torch.isfinite(grad_s.float()).all() and torch.isfinite(grad_t.float()).all()
    check_against_reference(loss, grad_s, grad_t, student, teacher, dtype, direction=direction, reduction="none")


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_missing_mass_where_the_other_side_has_it_is_infinite(emu, direction):
    student, teacher = make_logits((2, 40), torch.float32, "cpu", seed=41)
    (student if direction == "forward" else teacher)[0, 5] = NEG_INF
    rows, _, _, _ = emulated_kl(emu, student, teacher, direction=direction, reduction="none", student_grad=False,
                                teacher_grad=False)
    assert rows[0].item() == math.inf and math.isfinite(rows[1].item())


@pytest.mark.parametrize("which", ["student", "teacher"])
def test_nan_in_a_counted_row(emu, which):
    student, teacher = make_logits((3, 100), torch.float32, "cpu", seed=42)
    (student if which == "student" else teacher)[1, 17] = float("nan")
    rows, grad_s, _, _ = emulated_kl(emu, student, teacher, reduction="none")
    assert math.isnan(rows[1].item()) and torch.isfinite(rows[[0, 2]]).all()
    assert torch.isnan(grad_s[1]).all() and torch.isfinite(grad_s[[0, 2]]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_huge_logits_are_exact(emu, dtype):
    student, teacher = make_logits((4, 50), dtype, "cpu", seed=43)
    student = student + torch.tensor([1e4, -1e4, 0.0, 1e4], dtype=dtype)[:, None]
    teacher = teacher + torch.tensor([1e4, -1e4, 1e4, 0.0], dtype=dtype)[:, None]
    loss, grad_s, grad_t, _ = emulated_kl(emu, student, teacher, reduction="none")
    check_against_reference(loss, grad_s, grad_t, student, teacher, dtype, reduction="none")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("scale", [1e10, 1e35])
def test_huge_logit_over_temperature(emu, dtype, direction, scale):
    """|logit| / T up to 1e35 (README's range), rows spread over many threads' online states."""
    student, teacher, temperature = logits_at_scale((3, 2100), dtype, scale, seed=45)
    loss, grad_s, grad_t, launches = emulated_kl(emu, student, teacher, temperature=temperature, direction=direction,
                                                 reduction="none", teacher_grad=scale <= 1e10, student_grad=scale <= 1e10)
    only_launch(launches)
    ref, s64, t64 = reference64(student, teacher, temperature=temperature, direction=direction, reduction="none")
    assert_close(loss, ref, TOLERANCES[dtype]["loss_rtol"], TOLERANCES[dtype]["loss_atol"], "loss")
    if scale <= 1e10:  # beyond, the weighted gradient overflows float32 itself
        ref.sum().backward()
        diff, weighted = (grad_s, grad_t) if direction == "forward" else (grad_t, grad_s)
        diff64, weighted64 = (s64.grad, t64.grad) if direction == "forward" else (t64.grad, s64.grad)
        assert_grad_close(diff, diff64, dtype, "(q - p) / T")
        assert_weighted_grad_close(weighted, weighted64, dtype, scale, temperature, "p (log p - log q - KL) / T")


@pytest.mark.parametrize("direction", ["forward", "reverse"])
@pytest.mark.parametrize("big", [1e37, 3e38])
def test_a_logit_near_the_float32_limit_in_a_wide_row(emu, direction, big):
    """A logit near float32's limit in the distribution averaged over: the merges of the threads' states."""
    student, teacher, _ = logits_at_scale((2, 2100), torch.float32, 10.0, seed=46)
    (teacher if direction == "forward" else student)[:, 1500] = big
    loss, grad_s, grad_t, _ = emulated_kl(emu, student, teacher, direction=direction, reduction="none")
    ref, _, _ = reference64(student, teacher, direction=direction, reduction="none")
    assert_close(loss, ref, 2e-5, 1e-6, "loss")
    assert not grad_s.isnan().any() and not grad_t.isnan().any()


def test_all_rows_masked_and_zero_rows(emu):
    student, teacher = make_logits((4, 30), torch.float32, "cpu", seed=44)
    mask = torch.zeros(4, dtype=torch.bool)
    for reduction in ("sum", "batchmean", "mean"):
        loss, grad_s, grad_t, launches = emulated_kl(emu, student, teacher, mask=mask, reduction=reduction)
        only_launch(launches)
        assert loss.item() == 0.0 and (grad_s == 0).all() and (grad_t == 0).all()
    loss, grad_s, _, launches = emulated_kl(emu, student[:0], teacher[:0], reduction="batchmean")
    assert launches == [] and loss.item() == 0.0 and grad_s.shape == (0, 30)


# ------------------------------------------------------------------------------------- grad_scale_


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("vocab", [5, 64])
def test_grad_scale_per_row_scalar_and_factor_one(emu, dtype, vocab):
    gen = torch.Generator().manual_seed(50)
    grad = torch.randn(4, vocab, generator=gen, dtype=torch.float64).to(dtype)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    factors = torch.tensor([2.0, 1.0, -0.5, 1.0], dtype=acc)
    scaled = grad.clone()
    _, launches = emu.call("grad_scale_", scaled, factors)
    assert only_launch(launches, "grad_scale_kernel").template_args[1] == str(pack_of(dtype) if vocab % pack_of(dtype) == 0 else 1)
    assert torch.equal(scaled[[1, 3]], grad[[1, 3]]), "rows whose factor is exactly 1 are not touched"
    expected = (grad.to(acc) * factors[:, None]).to(dtype)
    assert torch.equal(scaled, expected)
    scalar = grad.clone()
    emu.call("grad_scale_", scalar, torch.tensor(0.25, dtype=acc))
    assert torch.equal(scalar, (grad.to(acc) * 0.25).to(dtype))
    unchanged = grad.clone()
    emu.call("grad_scale_", unchanged, torch.tensor(1.0, dtype=acc))
    assert torch.equal(unchanged, grad)


# ------------------------------------------------------------------------------------- vocab-parallel shards


def _shard_rows(dtype, width, seed):
    """(7, width) shards with the edge rows of the vocab-parallel contract."""
    student, teacher = make_logits((7, width), dtype, "cpu", seed=seed)
    teacher[1] = NEG_INF                  # an all -inf side: the empty partial state
    student[2, 5] = float("nan")          # an undefined row
    teacher[3, width // 2 :] = NEG_INF    # -inf on part of the shard
    student[5, 3] = float("inf")          # +inf: undefined too
    mask = torch.tensor([True, True, True, True, False, True, True])
    student[4] = float("nan")             # masked: never read
    return student, teacher, mask


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("width", [1280, 1283])
def test_shard_states_match_their_definition(emu, dtype, reverse, width):
    student, teacher, mask = _shard_rows(dtype, width, seed=70 + width)
    states, launches = emu.call("kl_row_states", student, teacher, mask, 1.5, reverse)
    pack = pack_of(dtype) if width % pack_of(dtype) == 0 else 1
    assert only_launch(launches, "kl_row_states_kernel").template_args == [CXX_TYPES[dtype], str(pack)]
    expected = _shard_math.shard_states_torch(student, teacher, mask, 1.5, reverse)
    tol = TOLERANCES[dtype]
    assert_close(states, expected, tol["loss_rtol"], tol["loss_atol"], "partial states")
    assert states[4].tolist() == [NEG_INF, NEG_INF, 0.0, 0.0, 0.0], "masked row: the empty state"
    assert states[[2, 5], 2:].isnan().all() and (states[[2, 5], :2] == NEG_INF).all(), "undefined rows"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("width", [1280, 1283])
def test_shard_gradients_match_their_definition(emu, dtype, reverse, width):
    student, teacher, mask = _shard_rows(dtype, width, seed=80 + width)
    acc = _shard_math.acc_dtype(dtype)
    states = _shard_math.shard_states_torch(student, teacher, mask, 0.8, reverse).to(acc)
    maxima = states[:, :2].contiguous()  # one shard is its own full row
    _, stats = _shard_math.finish_rows(maxima, _shard_math.rescaled_sums(states, maxima, reverse, 0.8), mask, reverse)
    factor = torch.linspace(-1.0, 2.0, 7, dtype=acc)
    for student_grad, teacher_grad in ((True, True), (True, False), (False, True)):
        args = (student, teacher, mask, stats.contiguous(), factor, 0.8, reverse, student_grad, teacher_grad)
        grads, launches = emu.call("kl_grad_from_stats", *args)
        only_launch(launches, "kl_grad_from_stats_kernel")
        expected = _shard_math.shard_grads_torch(*args)
        for got, want, wanted, name in zip(grads, expected, (student_grad, teacher_grad), ("student", "teacher")):
            if not wanted:
                assert got.numel() == 0
                continue
            assert_grad_close(got[[0, 3, 6]], want[[0, 3, 6]], dtype, f"{name} gradient")
            assert got[[1, 2, 5]].float().isnan().all(), "undefined rows: NaN gradient"
            assert (got[4] == 0).all(), "masked row: zero gradient"


def test_shards_of_a_row_give_the_full_rows_loss_and_gradient(emu):
    """Two unequal shards through the emulated shard kernels and the merge of _shard_math equal the
    full rows' KL and gradient, on a grid that walks its rows."""
    student, teacher = make_logits((9, 3000), torch.float32, "cpu", seed=90)
    cut = 1100
    with emu.limits(max_grid_x=4):
        shard_states = [emu.call("kl_row_states", s, t, None, 1.3, False)[0]
                        for s, t in ((student[:, :cut], teacher[:, :cut]), (student[:, cut:], teacher[:, cut:]))]
        maxima = torch.maximum(shard_states[0][:, :2], shard_states[1][:, :2])
        sums = sum(_shard_math.rescaled_sums(st, maxima, False, 1.3) for st in shard_states)
        kl, stats = _shard_math.finish_rows(maxima, sums, None, False)
        factor = torch.full((9,), 1.0 / 9)
        grads = [emu.call("kl_grad_from_stats", s, t, None, stats.contiguous(), factor, 1.3, False, True, False)[0][0]
                 for s, t in ((student[:, :cut], teacher[:, :cut]), (student[:, cut:], teacher[:, cut:]))]
    rows = scipy_row_kl(student, teacher, 1.3, "forward")
    assert_close(kl, rows, 2e-5, 2e-6, "merged KL vs scipy")
    ref, s64, _ = reference64(student, teacher, temperature=1.3, reduction="batchmean")
    ref.backward()
    assert_grad_close(torch.cat(grads, dim=1) / 1.3, s64.grad, torch.float32, "shard gradients")


@pytest.mark.parametrize("reverse", [False, True])
def test_shards_at_huge_logit_over_temperature(emu, reverse):
    """The shard kernels keep raw maxima: the merge's e^((m - M) / T) and the gradient's shift are exact
    where a maximum of t / T, rounded, would be off by hundreds (|logit| / T = 1e10)."""
    student, teacher, temperature = logits_at_scale((4, 2400), torch.float32, 1e10, seed=91)
    cut = 1000
    shards = ((student[:, :cut], teacher[:, :cut]), (student[:, cut:], teacher[:, cut:]))
    states = [emu.call("kl_row_states", s, t, None, temperature, reverse)[0] for s, t in shards]
    maxima = torch.maximum(states[0][:, :2], states[1][:, :2])
    sums = sum(_shard_math.rescaled_sums(st, maxima, reverse, temperature) for st in states)
    kl, stats = _shard_math.finish_rows(maxima, sums, None, reverse)
    factor = torch.ones(4)
    grads = [emu.call("kl_grad_from_stats", s, t, None, stats.contiguous(), factor, temperature, reverse, True, False)[0][0]
             for s, t in shards]
    direction = "reverse" if reverse else "forward"
    ref, s64, _ = reference64(student, teacher, temperature=temperature, direction=direction, reduction="none")
    assert_close(kl, ref, 2e-5, 0.0, "merged KL")
    ref.sum().backward()
    grad = torch.cat(grads, dim=1) / temperature
    if reverse:
        assert_weighted_grad_close(grad, s64.grad, torch.float32, 1e10, temperature, "shard gradients")
    else:
        assert_grad_close(grad, s64.grad, torch.float32, "shard gradients")


# ------------------------------------------------------------------------------------- determinism


def test_bitwise_determinism(emu):
    student, teacher = make_logits((3, 70000), torch.bfloat16, "cpu", seed=60)
    mask = torch.tensor([True, False, True])
    first = emulated_kl(emu, student, teacher, mask=mask, reduction="none", temperature=1.5)[:3]
    second = emulated_kl(emu, student, teacher, mask=mask, reduction="none", temperature=1.5)[:3]
    for a, b in zip(first, second):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------- coverage (keep last)


def test_every_launchable_kernel_ran_and_fits_its_compiled_resources(emu):
    """Every instantiation of the kernels this file owns ran here, within its compiled resources;
    every launchable kernel has an owning test file (simt/emulator.py: KERNEL_OWNERS)."""
    assert_owned_kernels_ran(emu, pathlib.Path(__file__).name)
