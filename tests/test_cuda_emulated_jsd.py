"""The CUDA kernel of jsd_logits (csrc/cuda/jsd_cuda.cu), run on the CPU under the SIMT emulator
(tests/simt; see tests/test_cuda_emulated.py for what it checks on every launch), against the same
float64 reference and numpy oracle as the CPU kernel. Each test asserts which kernel instantiation
ran with which launch configuration; the last one checks that every instantiation of
jsd_rows_kernel that the host code can launch ran here."""

import math
import pathlib

import pytest
import torch

from conftest import (DTYPES, TOLERANCES, assert_close, assert_grad_close, check_against_reference64, logits_at_scale,
                      make_logits, numpy_jsd)
from conftest import jsd_reference64 as reference64
from simt.emulator import (CXX_TYPES, DEFAULT_LIMITS, Emulator, assert_owned_kernels_ran, emulated_jsd, only_launch,
                           pack_of)

NEG_INF = float("-inf")


@pytest.fixture(scope="module")
def emu():
    return Emulator()


def check_against_reference(loss, grad_s, grad_t, student, teacher, dtype, **options):
    """Loss and the gradients at upstream 1 against the float64 reference's autograd."""
    check_against_reference64(reference64, loss, grad_s, grad_t, student, teacher, dtype, **options)


def shared_bytes(threads, dtype, cached_elements):
    """The launch's dynamic shared memory: per-warp merge states and K sums, then the row cache."""
    acc = 8 if dtype == torch.float64 else 4
    scratch = (threads // 32 * 7 * acc + 15) // 16 * 16  # RowState (5 values) + Divergences (2)
    return scratch + 2 * cached_elements * torch.empty((), dtype=dtype).element_size()


def block_threads(units, pack, dtype, with_grad):
    """The launch plan's threads: about 2 x kUnroll packs per thread, up to the kernel's launch bound
    (512 for float64 and for the gradient kernels, whose gradient pass needs 128 registers)."""
    per_thread = 2 * (2 if pack > 1 else 8)
    max_threads = 512 if dtype == torch.float64 or with_grad else 1024
    threads = 32
    while threads < max_threads and threads * per_thread < units:
        threads *= 2
    return threads


# ------------------------------------------------------------------------------------- values and gradients


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("grads", ["student", "teacher", "both", "none"])
def test_values_and_gradients_on_the_vector_path(emu, dtype, grads):
    student, teacher = make_logits((5, 320), dtype, "cpu", seed=10 + len(grads))
    need_s, need_t = grads in ("student", "both"), grads in ("teacher", "both")
    loss, grad_s, grad_t, launches = emulated_jsd(emu, student, teacher, beta=0.3, temperature=1.7,
                                                  student_grad=need_s, teacher_grad=need_t)
    launch = only_launch(launches, "jsd_rows_kernel")
    any_grad = need_s or need_t
    assert launch.template_args == [CXX_TYPES[dtype], str(pack_of(dtype)), "true" if any_grad else "false"]
    assert launch.shared == shared_bytes(launch.block, dtype, 320), "the whole row is cached, also for the loss alone"
    check_against_reference(loss, grad_s, grad_t, student, teacher, dtype, student_grad=need_s, teacher_grad=need_t,
                            beta=0.3, temperature=1.7, reduction="sum")
    rows, _, _, _ = emulated_jsd(emu, student, teacher, beta=0.3, temperature=1.7, reduction="none",
                                 student_grad=False, teacher_grad=False)
    oracle, oracle_s, oracle_t = numpy_jsd(student, teacher, 0.3, 1.7)
    tol = TOLERANCES[dtype]
    assert_close(rows, oracle, tol["loss_rtol"], tol["loss_atol"], "vs numpy oracle")
    if need_s:
        assert_grad_close(grad_s, torch.from_numpy(oracle_s), dtype, "student grad vs formula")
    if need_t:
        assert_grad_close(grad_t, torch.from_numpy(oracle_t), dtype, "teacher grad vs formula")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_grad", [True, False])
def test_values_and_gradients_on_the_scalar_path(emu, dtype, with_grad):
    """V = 333 is no multiple of any pack: one element per access."""
    student, teacher = make_logits((4, 333), dtype, "cpu", seed=15)
    loss, grad_s, grad_t, launches = emulated_jsd(emu, student, teacher, beta=0.8, temperature=0.9,
                                                  student_grad=with_grad, teacher_grad=with_grad)
    assert only_launch(launches, "jsd_rows_kernel").template_args == [CXX_TYPES[dtype], "1",
                                                                      "true" if with_grad else "false"]
    check_against_reference(loss, grad_s, grad_t, student, teacher, dtype, student_grad=with_grad,
                            teacher_grad=with_grad, beta=0.8, temperature=0.9, reduction="sum")


@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_endpoints_run_the_kl_kernel(emu, beta):
    """beta = 0 is KL(teacher || student) and beta = 1 KL(student || teacher): the op launches the KL
    row kernel and returns exactly what kl_div_logits returns."""
    student, teacher = make_logits((3, 320), torch.float32, "cpu", seed=16)
    mask = torch.tensor([True, False, True])
    loss, grad_s, grad_t, launches = emulated_jsd(emu, student, teacher, beta=beta, mask=mask, temperature=1.3,
                                                  reduction="batchmean")
    assert only_launch(launches, "kl_rows_kernel").template_args == ["float", "4", "true"]
    (kl, kl_s, kl_t), _ = emu.call("kl_div_logits", student, teacher, mask, 1.3, beta == 1.0, "batchmean", True, True)
    assert torch.equal(loss, kl) and torch.equal(grad_s, kl_s) and torch.equal(grad_t, kl_t)
    check_against_reference(loss, grad_s, grad_t, student, teacher, torch.float32, beta=beta, mask=mask,
                            temperature=1.3, reduction="batchmean")


@pytest.mark.parametrize("reduction", ["none", "sum", "batchmean", "mean"])
@pytest.mark.parametrize("masked", [False, True])
def test_reductions_and_masks_holding_nan(emu, reduction, masked):
    student, teacher = make_logits((3, 4, 96), torch.float32, "cpu", seed=20)
    mask = None
    if masked:
        mask = torch.tensor([[1, 0, 1, 1], [0, 0, 0, 0], [1, 1, 0, 1]], dtype=torch.bool)
        student[~mask] = float("nan")  # masked rows are never read
        teacher[~mask] = float("nan")
    loss, grad_s, grad_t, launches = emulated_jsd(emu, student, teacher, beta=0.6, mask=mask, reduction=reduction,
                                                  temperature=0.8)
    only_launch(launches, "jsd_rows_kernel")
    clean_s, clean_t = (torch.nan_to_num(x, nan=0.0) for x in (student, teacher))
    check_against_reference(loss, grad_s, grad_t, clean_s, clean_t, torch.float32, beta=0.6, mask=mask,
                            reduction=reduction, temperature=0.8)
    if masked:
        assert (grad_s[~mask] == 0).all() and (grad_t[~mask] == 0).all()


def test_upstream_weights_through_grad_scale(emu):
    student, teacher = make_logits((2, 3, 200), torch.bfloat16, "cpu", seed=21)
    weights = torch.tensor([[0.5, 0.0, 2.0], [-1.0, 1.0, 3.0]])
    _, grad_s, _, _ = emulated_jsd(emu, student, teacher, beta=0.4, reduction="none", temperature=1.3,
                                   teacher_grad=False)
    emu.call("grad_scale_", grad_s, weights)
    ref, s64, _ = reference64(student, teacher, beta=0.4, reduction="none", temperature=1.3)
    ref.backward(weights.double())
    assert_grad_close(grad_s, s64.grad, torch.bfloat16, "student grad, weighted per row")


# ------------------------------------------------------------------------------------- the row cache and the grid


@pytest.mark.parametrize(
    "vocab, dtype, with_grad",
    [(1, torch.float32, True), (7, torch.float32, True), (1272, torch.float16, True), (4096, torch.float32, True),
     (4096, torch.float32, False), (20000, torch.bfloat16, True), (20001, torch.bfloat16, False),
     (6000, torch.float64, True)],
    ids=str,
)
def test_whole_and_partially_cached_rows(emu, vocab, dtype, with_grad):
    """With 16 KB of opt-in shared memory, small rows are cached whole and large ones in part; the
    later passes then read the rest from global memory again (the loss alone as well: log m needs a
    second pass). On a device without clusters (sm_80): with them, a row one block cannot cache goes
    to the cluster kernel (test_cuda_emulated_cluster.py)."""
    optin = 16 * 1024
    student, teacher = make_logits((3, vocab), dtype, "cpu", seed=vocab)
    with emu.limits(max_shared_optin=optin, cluster_launch=False):
        loss, grad_s, grad_t, launches = emulated_jsd(emu, student, teacher, beta=0.45, temperature=1.2,
                                                      student_grad=with_grad, teacher_grad=with_grad)
    launch = only_launch(launches, "jsd_rows_kernel")
    pack = pack_of(dtype) if vocab % pack_of(dtype) == 0 else 1
    assert launch.template_args[1:] == [str(pack), "true" if with_grad else "false"]
    units = vocab // pack
    assert launch.block == block_threads(units, pack, dtype, with_grad)
    whole_row = shared_bytes(launch.block, dtype, vocab)
    if whole_row <= optin:
        assert launch.shared == whole_row, "the whole row is cached"
    else:
        scratch = shared_bytes(launch.block, dtype, 0)
        cached_units = (optin - scratch) // (2 * pack * student.element_size())
        assert 0 < cached_units < units and launch.shared == shared_bytes(launch.block, dtype, cached_units * pack)
    check_against_reference(loss, grad_s, grad_t, student, teacher, dtype, student_grad=with_grad,
                            teacher_grad=with_grad, beta=0.45, temperature=1.2, reduction="sum")


def test_long_rows_use_the_largest_block_and_opt_in_shared_memory(emu):
    """The one-block kernel on a device without clusters (sm_80): a 70000-wide row, partly cached."""
    student, teacher = make_logits((2, 70000), torch.bfloat16, "cpu", seed=30)
    with emu.limits(cluster_launch=False):
        loss, grad_s, grad_t, launches = emulated_jsd(emu, student, teacher, beta=0.9, teacher_grad=False)
    launch = only_launch(launches, "jsd_rows_kernel")
    assert launch.block == 512 and launch.shared == DEFAULT_LIMITS["max_shared_optin"] // 16 * 16
    check_against_reference(loss, grad_s, grad_t, student, teacher, torch.bfloat16, teacher_grad=False, beta=0.9,
                            reduction="sum")
    with emu.limits(cluster_launch=False):
        rows, _, _, launches = emulated_jsd(emu, student, teacher, beta=0.9, reduction="none", student_grad=False,
                                            teacher_grad=False)
    launch = only_launch(launches, "jsd_rows_kernel")
    assert launch.block == 1024 and launch.shared == DEFAULT_LIMITS["max_shared_optin"] // 16 * 16
    assert_close(rows, numpy_jsd(student, teacher, 0.9, 1.0)[0], 1e-4, 1e-5, "loss alone vs numpy oracle")


def test_a_small_grid_walks_the_rows_grid_stride(emu):
    """Each block takes several rows, with several warps: both per-warp scratch areas and the row
    cache are reused from row to row, where a missing barrier would race."""
    student, teacher = make_logits((11, 2000), torch.float32, "cpu", seed=33)
    mask = torch.tensor([1, 1, 0, 1, 1, 1, 0, 1, 1, 1, 1], dtype=torch.bool)
    with emu.limits(max_grid_x=3):
        loss, grad_s, grad_t, launches = emulated_jsd(emu, student, teacher, beta=0.2, mask=mask,
                                                      reduction="batchmean")
    launch = only_launch(launches, "jsd_rows_kernel")
    assert launch.grid == 3 and launch.block == 128  # 500 packs, 4 per thread: several warps
    check_against_reference(loss, grad_s, grad_t, student, teacher, torch.float32, beta=0.2, mask=mask,
                            reduction="batchmean")


def test_strided_and_misaligned_views(emu):
    base_s, base_t = make_logits((6, 264), torch.float32, "cpu", seed=31)
    for view, pack in ((lambda x: x[:, 1:257], 1), (lambda x: x[::2, :256], 4)):
        student, teacher = view(base_s), view(base_t)
        loss, grad_s, grad_t, launches = emulated_jsd(emu, student, teacher, beta=0.5, temperature=2.0)
        assert only_launch(launches, "jsd_rows_kernel").template_args[1] == str(pack)
        check_against_reference(loss, grad_s, grad_t, student, teacher, torch.float32, beta=0.5, temperature=2.0,
                                reduction="sum")


# ------------------------------------------------------------------------------------- edges


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("zeroed", ["teacher", "student", "both"])
def test_zero_probability_entries(emu, dtype, zeroed):
    student, teacher = make_logits((3, 64), dtype, "cpu", seed=40)
    if zeroed in ("teacher", "both"):
        teacher[:, ::3] = NEG_INF
    if zeroed in ("student", "both"):
        student[:, ::3 if zeroed == "both" else 4] = NEG_INF
    loss, grad_s, grad_t, _ = emulated_jsd(emu, student, teacher, beta=0.3, reduction="none")
    assert torch.isfinite(loss).all() and torch.isfinite(grad_s.float()).all() and torch.isfinite(grad_t.float()).all()
    check_against_reference(loss, grad_s, grad_t, student, teacher, dtype, beta=0.3, reduction="none")


@pytest.mark.parametrize("which", ["student", "teacher"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), "all -inf"])
def test_undefined_rows_give_nan(emu, which, bad):
    student, teacher = make_logits((3, 100), torch.float32, "cpu", seed=42)
    target = student if which == "student" else teacher
    if bad == "all -inf":
        target[1] = NEG_INF
    else:
        target[1, 17] = bad
    rows, grad_s, grad_t, _ = emulated_jsd(emu, student, teacher, reduction="none")
    assert math.isnan(rows[1].item()) and torch.isfinite(rows[[0, 2]]).all()
    assert torch.isnan(grad_s[1]).all() and torch.isnan(grad_t[1]).all()
    assert torch.isfinite(grad_s[[0, 2]]).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_huge_logits_are_exact(emu, dtype):
    student, teacher = make_logits((4, 50), dtype, "cpu", seed=43)
    student = student + torch.tensor([1e4, -1e4, 0.0, 1e4], dtype=dtype)[:, None]
    teacher = teacher + torch.tensor([1e4, -1e4, 1e4, 0.0], dtype=dtype)[:, None]
    loss, grad_s, grad_t, _ = emulated_jsd(emu, student, teacher, beta=0.5, reduction="none")
    check_against_reference(loss, grad_s, grad_t, student, teacher, dtype, beta=0.5, reduction="none")


@pytest.mark.parametrize("scale", [1e10, 1e35])
def test_huge_logit_over_temperature(emu, scale):
    """|logit| / T up to 1e35 (README's range): the JSD stays within its bound and matches the reference."""
    student, teacher, temperature = logits_at_scale((3, 2100), torch.float32, scale, seed=47)
    teacher[0, 1500] = 1e37 * temperature  # and a logit of 1e37 / T
    loss, grad_s, grad_t, launches = emulated_jsd(emu, student, teacher, beta=0.3, temperature=temperature,
                                                  reduction="none")
    only_launch(launches, "jsd_rows_kernel")
    assert (loss <= -0.3 * math.log(0.3) - 0.7 * math.log(0.7) + 1e-6).all()
    check_against_reference(loss, grad_s, grad_t, student, teacher, torch.float32, beta=0.3, temperature=temperature,
                            reduction="none")


def test_all_rows_masked_and_zero_rows(emu):
    student, teacher = make_logits((4, 30), torch.float32, "cpu", seed=44)
    mask = torch.zeros(4, dtype=torch.bool)
    for reduction in ("sum", "batchmean", "mean"):
        loss, grad_s, grad_t, launches = emulated_jsd(emu, student, teacher, mask=mask, reduction=reduction)
        only_launch(launches, "jsd_rows_kernel")
        assert loss.item() == 0.0 and (grad_s == 0).all() and (grad_t == 0).all()
    loss, grad_s, _, launches = emulated_jsd(emu, student[:0], teacher[:0], reduction="batchmean")
    assert launches == [] and loss.item() == 0.0 and grad_s.shape == (0, 30)


def test_bitwise_determinism(emu):
    student, teacher = make_logits((3, 20000), torch.bfloat16, "cpu", seed=60)
    mask = torch.tensor([True, False, True])
    first = emulated_jsd(emu, student, teacher, beta=0.7, mask=mask, reduction="none", temperature=1.5)[:3]
    second = emulated_jsd(emu, student, teacher, beta=0.7, mask=mask, reduction="none", temperature=1.5)[:3]
    for a, b in zip(first, second):
        assert torch.equal(a, b)


# ------------------------------------------------------------------------------------- coverage (keep last)


def test_every_launchable_jsd_kernel_ran_and_fits_its_compiled_resources(emu):
    assert_owned_kernels_ran(emu, pathlib.Path(__file__).name)
