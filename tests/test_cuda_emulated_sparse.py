"""The CUDA kernels of sparse_kl_div (csrc/cuda/sparse_kl_cuda.cu) under the SIMT emulator (tests/simt):
the unchanged .cu source on CPU fibers with the sanitizer's checks, the real host code (launch plan,
shared-memory row cache and bitmap, vector-or-scalar choice, grid size), against the float64
reference and the numpy oracle. Each test asserts which kernel instantiation ran with which launch;
the last one checks that every instantiation this file owns ran."""

import math
import pathlib

import pytest
import torch

from conftest import TOLERANCES, assert_close, assert_grad_close
from simt.emulator import CXX_TYPES, DEFAULT_LIMITS, Emulator, assert_owned_kernels_ran, only_launch, pack_of
from sparse_helpers import NEG_INF, make_sparse, numpy_rows, op_call, reference64

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
BUCKET, RENORM = "sparse_bucket_kernel", "sparse_renorm_kernel"


@pytest.fixture(scope="module")
def emu():
    return Emulator()


def emulated(emu, student, indices, logprobs, **kwargs):
    (loss, grad_s, grad_lp), launches = emu.call("sparse_kl_div", *op_call(student, indices, logprobs, **kwargs))
    return loss, grad_s, grad_lp, launches


def check(loss, grad_s, grad_lp, student, indices, logprobs, dtype, *, student_grad=True, logprobs_grad=True,
          weights=None, **kwargs):
    """Loss and the gradients at upstream 1 against the float64 reference's autograd."""
    kwargs.setdefault("reduction", "sum")
    ref, s64, lp64 = reference64(student, indices, logprobs, **kwargs)
    tol = TOLERANCES[dtype]
    assert_close(loss, ref, tol["loss_rtol"], tol["loss_atol"], "loss vs float64 reference")
    ref.backward(torch.ones_like(ref))
    if student_grad:
        assert grad_s.dtype == dtype and grad_s.shape == student.shape
        assert_grad_close(grad_s, s64.grad, dtype, "student grad")
    else:
        assert grad_s.numel() == 0
    if logprobs_grad:
        assert grad_lp.dtype == logprobs.dtype and grad_lp.shape == logprobs.shape
        assert_grad_close(grad_lp, lp64.grad, logprobs.dtype, "log-prob grad")
    else:
        assert grad_lp.numel() == 0


def bucket_threads(units, pack, dtype):
    per_thread = 2 * (2 if pack > 1 else 8)
    max_threads = 512 if dtype == torch.float64 else 1024
    threads = 32
    while threads < max_threads and threads * per_thread < units:
        threads *= 2
    return threads


def bucket_shared(vocab, pack, dtype, threads, cached_units):
    state = 64 if dtype == torch.float64 else 48
    scratch = (threads // 32 * state + 15) // 16 * 16 + (4 * ((vocab + 31) // 32) + 15) // 16 * 16
    element = torch.empty((), dtype=dtype).element_size()
    return scratch, scratch + cached_units * pack * element


# ------------------------------------------------------------------------------------- bucket


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("grads", ["student", "logprobs", "both", "none"])
@pytest.mark.parametrize("vocab", [320, 333])
def test_bucket_vector_and_scalar_paths(emu, dtype, grads, vocab):
    """V = 320 takes 16-byte packs, V = 333 one element per access; rows with unused slots."""
    student, idx, lp = make_sparse((5,), vocab, 12, dtype, seed=vocab + len(grads), unused=4)
    need_s, need_lp = grads in ("student", "both"), grads in ("logprobs", "both")
    loss, grad_s, grad_lp, launches = emulated(emu, student, idx, lp, temperature=1.3, student_grad=need_s,
                                               logprobs_grad=need_lp)
    pack = pack_of(dtype) if vocab % pack_of(dtype) == 0 else 1
    launch = only_launch(launches, BUCKET)
    assert launch.template_args == [CXX_TYPES[dtype], str(pack), "true" if need_s or need_lp else "false"]
    check(loss, grad_s, grad_lp, student, idx, lp, dtype, student_grad=need_s, logprobs_grad=need_lp, temperature=1.3)
    rows, _, _, _ = emulated(emu, student, idx, lp, temperature=1.3, reduction="none", student_grad=False,
                             logprobs_grad=False)
    tol = TOLERANCES[dtype]
    assert_close(rows, numpy_rows(student, idx, lp, 1.3), tol["loss_rtol"], tol["loss_atol"], "vs numpy")


@pytest.mark.parametrize(
    "vocab, dtype",
    [(1000, torch.float32), (4096, torch.bfloat16), (20000, torch.float32), (6000, torch.float64), (2001, torch.float16)],
    ids=str,
)
def test_the_shared_memory_row_cache_whole_and_in_part(emu, vocab, dtype):
    """With 16 KB of opt-in shared memory small rows are cached whole, large ones in part; the bitmap
    of the support and the merge states come first."""
    optin = 16 * 1024
    student, idx, lp = make_sparse((3,), vocab, 40, dtype, seed=vocab, unused=10)
    with emu.limits(max_shared_optin=optin):
        loss, grad_s, grad_lp, launches = emulated(emu, student, idx, lp, temperature=0.8)
    launch = only_launch(launches, BUCKET)
    pack = pack_of(dtype) if vocab % pack_of(dtype) == 0 else 1
    units = vocab // pack
    assert launch.block == bucket_threads(units, pack, dtype)
    scratch, whole = bucket_shared(vocab, pack, dtype, launch.block, units)
    element = student.element_size()
    if whole <= optin:
        assert launch.shared == whole, "the whole row is cached"
    else:
        cached = (optin - scratch) // (pack * element)
        assert 0 < cached < units and launch.shared == scratch + cached * pack * element, "part of the row"
    check(loss, grad_s, grad_lp, student, idx, lp, dtype, temperature=0.8)


def test_long_rows_opt_in_and_without_gradient_only_states_and_bitmap(emu):
    """A Llama-3 row (V = 128256, bfloat16: 256 KB) is cached as far as the opt-in shared memory goes."""
    vocab = 128256
    student, idx, lp = make_sparse((2,), vocab, 64, torch.bfloat16, seed=30, lp_dtype=torch.bfloat16)
    loss, grad_s, grad_lp, launches = emulated(emu, student, idx, lp)
    launch = only_launch(launches, BUCKET)
    scratch, whole = bucket_shared(vocab, 8, torch.bfloat16, 1024, vocab // 8)
    cached = (DEFAULT_LIMITS["max_shared_optin"] - scratch) // 16
    assert launch.block == 1024 and whole > DEFAULT_LIMITS["max_shared_optin"]
    assert launch.shared == scratch + 16 * cached, "as much of the row as fits"
    check(loss, grad_s, grad_lp, student, idx, lp, torch.bfloat16)
    rows, _, _, launches = emulated(emu, student, idx, lp, reduction="none", student_grad=False, logprobs_grad=False)
    assert only_launch(launches, BUCKET).shared == scratch, "without a gradient only the merge states and the bitmap"
    assert_close(rows, numpy_rows(student, idx, lp), 1e-4, 1e-5, "vs numpy")


def test_a_small_grid_walks_the_rows_with_masks_holding_nan(emu):
    """Each block takes several rows: the bitmap, the merge states and the row cache are reused from
    row to row (each row must leave the bitmap clear), masked rows in between are never read."""
    student, idx, lp = make_sparse((11,), 2000, 30, torch.float32, seed=33, unused=7)
    mask = torch.tensor([1, 1, 0, 1, 1, 1, 0, 1, 1, 1, 1], dtype=torch.bool)
    student[~mask] = float("nan")
    idx[~mask] = -1
    lp[~mask] = float("nan")
    for reduction in ("batchmean", "mean", "none"):
        with emu.limits(max_grid_x=3):
            loss, grad_s, grad_lp, launches = emulated(emu, student, idx, lp, mask=mask, reduction=reduction)
        launch = only_launch(launches, BUCKET)
        assert launch.grid == 3 and launch.block == 128
        check(loss, grad_s, grad_lp, student, idx, lp, torch.float32, mask=mask, reduction=reduction)
        assert (grad_s[~mask] == 0).all() and (grad_lp[~mask] == 0).all()


@pytest.mark.parametrize("slots", [1, 150, 320])
def test_slot_counts_one_more_than_the_block_and_the_whole_vocabulary(emu, slots):
    """K = 1; K = 150 > the 32 threads of a V = 320 row; K = V (no complement: no bucket)."""
    student, idx, lp = make_sparse((4,), 320, slots, torch.float32, seed=slots)
    loss, grad_s, grad_lp, launches = emulated(emu, student, idx, lp, temperature=1.1)
    assert only_launch(launches, BUCKET).block == 32
    check(loss, grad_s, grad_lp, student, idx, lp, torch.float32, temperature=1.1)
    rows, _, _, _ = emulated(emu, student, idx, lp, temperature=1.1, reduction="none")
    assert_close(rows, numpy_rows(student, idx, lp, 1.1), 2e-5, 2e-6, "vs numpy")


@pytest.mark.parametrize("lead", [35.0, 120.0])
def test_confident_student_tail_is_accurate(emu, lead):
    """q_r ~ 1e-13 (1e-50): summed over the complement (the bitmap leaves the support out), never
    1 - sum_S q."""
    student, idx, lp = make_sparse((4,), 1000, 10, torch.float32, seed=15)
    support = torch.zeros_like(student, dtype=torch.bool).scatter(-1, idx.long(), True)
    student = torch.where(support, student + lead, student)
    rows, _, _, _ = emulated(emu, student, idx, lp, reduction="none", student_grad=False, logprobs_grad=False)
    assert torch.isfinite(rows).all() and (rows > 0).all()
    assert_close(rows, numpy_rows(student, idx, lp), 2e-5, 0, f"loss vs numpy, support {lead} nats ahead")
    loss, grad_s, grad_lp, _ = emulated(emu, student, idx, lp)
    check(loss, grad_s, grad_lp, student, idx, lp, torch.float32)


@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize("scale", [1e10, 1e35])
def test_huge_logit_over_temperature(emu, tail, scale):
    """|logit| / T up to 1e35 (README's range), the complement's maxima merged across threads."""
    temperature = 10.0 / scale
    student, idx, lp = make_sparse((3,), 2100, 16, torch.float32, seed=17, teacher_scale=10.0, temperature=temperature)
    with_grad = scale <= 1e10  # beyond, the student's gradient (q - p) / T ~ 1e34 is no test of the kernel
    loss, grad_s, grad_lp, _ = emulated(emu, student, idx, lp, temperature=temperature, tail=tail, reduction="none",
                                        student_grad=with_grad, logprobs_grad=with_grad)
    check(loss, grad_s, grad_lp, student, idx, lp, torch.float32, temperature=temperature, tail=tail, reduction="none",
          student_grad=with_grad, logprobs_grad=with_grad)


def test_edges_nan_infinities_empty_supports_and_clamped_mass(emu):
    student, idx, lp = make_sparse((6,), 128, 8, torch.float32, seed=16, teacher_scale=9.0)
    off_support = [j for j in range(128) if j not in idx[0].tolist()][0]
    student[0, off_support] = float("nan")
    student[1, idx[1, 2]] = float("inf")
    student[2, idx[2, 0]] = NEG_INF
    lp[3] = NEG_INF                                     # no support: loss 0
    lp[4] = lp[4] - lp[4].logsumexp(-1) + math.log1p(2e-5)  # mass 1 + 2e-5, within float32's tolerance: no bucket
    rows, grad_s, grad_lp, _ = emulated(emu, student, idx, lp, reduction="none")
    assert math.isnan(rows[0]) and math.isnan(rows[1]) and rows[2].item() == math.inf
    assert rows[3].item() == 0.0 and (grad_s[3] == 0).all()
    assert grad_s[[0, 1]].isnan().all()
    check(rows[3:], grad_s[3:], grad_lp[3:], student[3:], idx[3:], lp[3:], torch.float32, reduction="none")


def test_bad_supports_give_nan_rows_or_a_value_error(emu):
    student, idx, lp = make_sparse((5,), 200, 6, torch.float32, seed=17, unused=2)
    idx[0, 0] = 200                       # out of range on a used slot
    idx[2, 3] = idx[2, 1]                 # a duplicate
    lp[3, :2] = -0.05                     # mass far above 1
    idx[4, 5] = -4                        # out of range, but unused (make_sparse: even rows): fine
    for tail in ("bucket", "renormalize"):
        rows, grad_s, grad_lp, launches = emulated(emu, student, idx, lp, reduction="none", validate=False, tail=tail)
        only_launch(launches, BUCKET if tail == "bucket" else RENORM)
        bad = [0, 2, 3] if tail == "bucket" else [0, 2]
        good = [r for r in range(5) if r not in bad]
        assert rows[bad].isnan().all() and grad_s[bad].isnan().all() and grad_lp[bad].isnan().all()
        check(rows[good], grad_s[good], grad_lp[good], student[good], idx[good], lp[good], torch.float32, tail=tail,
              reduction="none")
        with pytest.raises(ValueError, match=r"teacher_indices must lie in \[0, V\) = \[0, 200\) .* row 0 slot 0 holds token id 200"):
            emulated(emu, student, idx, lp, tail=tail)
    with pytest.raises(ValueError, match="same token id twice among the used slots of row 1"):
        emulated(emu, student[1:], idx[1:], lp[1:])


def test_bitwise_determinism(emu):
    student, idx, lp = make_sparse((3,), 70000, 100, torch.bfloat16, seed=60)
    mask = torch.tensor([True, False, True])
    for tail in ("bucket", "renormalize"):
        first = emulated(emu, student, idx, lp, mask=mask, reduction="none", temperature=1.5, tail=tail)[:3]
        second = emulated(emu, student, idx, lp, mask=mask, reduction="none", temperature=1.5, tail=tail)[:3]
        for a, b in zip(first, second):
            assert torch.equal(a, b)


# ------------------------------------------------------------------------------------- renormalize


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_grad", [True, False])
@pytest.mark.parametrize("vocab", [320, 333])
def test_renormalize_values_and_gradients(emu, dtype, with_grad, vocab):
    student, idx, lp = make_sparse((5,), vocab, 12, dtype, seed=vocab + 3, unused=4)
    loss, grad_s, grad_lp, launches = emulated(emu, student, idx, lp, temperature=0.9, tail="renormalize",
                                               student_grad=with_grad, logprobs_grad=with_grad)
    assert only_launch(launches, RENORM).template_args == [CXX_TYPES[dtype], "true" if with_grad else "false"]
    check(loss, grad_s, grad_lp, student, idx, lp, dtype, student_grad=with_grad, logprobs_grad=with_grad,
          temperature=0.9, tail="renormalize")
    rows, _, _, _ = emulated(emu, student, idx, lp, temperature=0.9, tail="renormalize", reduction="none")
    tol = TOLERANCES[dtype]
    assert_close(rows, numpy_rows(student, idx, lp, 0.9, "renormalize"), tol["loss_rtol"], tol["loss_atol"], "vs numpy")


def test_renormalize_masks_small_grid_and_many_slots(emu):
    student, idx, lp = make_sparse((9,), 3000, 700, torch.bfloat16, seed=70, unused=100)
    mask = torch.tensor([1, 0, 1, 1, 1, 0, 1, 1, 1], dtype=torch.bool)
    student[~mask] = float("nan")
    lp[~mask] = float("nan")
    lp[3] = NEG_INF  # no support
    with emu.limits(max_grid_x=2):
        loss, grad_s, grad_lp, launches = emulated(emu, student, idx, lp, mask=mask, tail="renormalize",
                                                   reduction="batchmean")
    launch = only_launch(launches, RENORM)
    assert launch.grid == 2 and launch.block == 1024
    check(loss, grad_s, grad_lp, student, idx, lp, torch.bfloat16, mask=mask, tail="renormalize", reduction="batchmean")
    assert (grad_s[~mask] == 0).all() and (grad_s[3] == 0).all()


# ------------------------------------------------------------------------------------- coverage (keep last)


def test_every_owned_kernel_ran_and_fits_its_compiled_resources(emu):
    """Every instantiation of the kernels this file owns ran here, within its compiled resources."""
    assert_owned_kernels_ran(emu, pathlib.Path(__file__).name)
