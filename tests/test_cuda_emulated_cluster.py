"""kl_div_logits' cluster kernel (csrc/cuda/kl_div_cuda.cu, kl_cluster_rows_kernel), and distillation_loss's
with the hard term riding along (kl_hard_cluster_rows_kernel), under the SIMT
emulator: on sm_90+, a row whose two inputs do not fit one block's shared memory is spread over a
thread-block cluster of 2-8 blocks, each caching a slice, their row states merged through distributed
shared memory. The emulator runs a cluster's blocks together and checks the cluster barrier, the
distributed shared-memory accesses (bounds, initialisation, races between blocks that only a cluster
barrier orders, a block's memory read after it exits) besides everything it checks of one block.

The tests shrink the opt-in shared memory so that rows of a few thousand elements need a cluster, and
check the launch plan (blocks per cluster, threads, shared memory) against the plan written out here,
the values against the float64 reference, and the fallbacks: devices without clusters, rows that need
more than 8 blocks, rows one block caches, and the loss without a gradient keep the one-block kernel.
"""

import math
import pathlib

import pytest
import torch

from conftest import TOLERANCES, assert_close, assert_grad_close, make_logits, reference64
from distill_helpers import IGNORE, make_step, poison_uncounted
from distill_helpers import reference64 as distill_reference64
from simt.emulator import CXX_TYPES, Emulator, assert_owned_kernels_ran, only_launch, pack_of

OPTIN = 16 * 1024


@pytest.fixture(scope="module")
def emu():
    return Emulator()


def emulated_kl(emu, student, teacher, *, mask=None, temperature=1.0, direction="forward", reduction="sum",
                student_grad=True, teacher_grad=True):
    (loss, grad_s, grad_t), launches = emu.call(
        "kl_div_logits", student, teacher, mask, float(temperature), direction == "reverse", reduction,
        student_grad, teacher_grad)
    return loss, grad_s, grad_t, launches


def expected_plan(vocab, dtype, optin=OPTIN):
    """(blocks per cluster, threads, shared bytes) of launch_plan.h's plan_cluster_rows_launch, or None
    where no cluster of up to 8 blocks caches the row."""
    element = torch.empty((), dtype=dtype).element_size()
    pack = pack_of(dtype) if vocab % pack_of(dtype) == 0 else 1
    units = vocab // pack
    per_thread = 2 * (2 if pack > 1 else 8)
    max_threads = 512 if dtype == torch.float64 else 1024
    state = 5 * (8 if dtype == torch.float64 else 4)
    for blocks in range(2, 9):
        slice_units = -(-units // blocks)
        threads = 32
        while threads < max_threads and threads * per_thread < slice_units:
            threads *= 2
        scratch = (threads // 32 * state + 15) // 16 * 16 + (state + 15) // 16 * 16
        shared = scratch + 2 * slice_units * pack * element
        if shared <= optin:
            return blocks, threads, shared
    return None


def check_against_reference(loss, grad_s, grad_t, student, teacher, dtype, *, student_grad=True, teacher_grad=True,
                            **options):
    ref, s64, t64 = reference64(student, teacher, **options)
    tol = TOLERANCES[dtype]
    assert_close(loss, ref, tol["loss_rtol"], tol["loss_atol"], "loss vs float64 reference")
    ref.backward(torch.ones_like(ref))
    if student_grad:
        assert_grad_close(grad_s, s64.grad, dtype, "student grad")
    else:
        assert grad_s.numel() == 0
    if teacher_grad:
        assert_grad_close(grad_t, t64.grad, dtype, "teacher grad")
    else:
        assert grad_t.numel() == 0


@pytest.mark.parametrize(
    "vocab, dtype",
    [(6000, torch.float32), (3001, torch.float32), (9000, torch.bfloat16), (9000, torch.float16), (2600, torch.float64),
     (2599, torch.float64), (11001, torch.bfloat16), (9001, torch.float16)],
    ids=str,
)
@pytest.mark.parametrize("grads", ["student", "teacher", "both"])
def test_rows_wider_than_one_block_are_spread_over_a_cluster(emu, vocab, dtype, grads):
    student, teacher = make_logits((3, vocab), dtype, "cpu", seed=vocab + len(grads))
    need_s, need_t = grads in ("student", "both"), grads in ("teacher", "both")
    with emu.limits(max_shared_optin=OPTIN):
        loss, grad_s, grad_t, launches = emulated_kl(emu, student, teacher, temperature=1.3,
                                                     student_grad=need_s, teacher_grad=need_t)
    launch = only_launch(launches, "kl_cluster_rows_kernel")
    blocks, threads, shared = expected_plan(vocab, dtype)
    pack = pack_of(dtype) if vocab % pack_of(dtype) == 0 else 1
    assert launch.template_args == [CXX_TYPES[dtype], str(pack)]
    assert (launch.cluster, launch.block, launch.shared) == (blocks, threads, shared)
    assert launch.grid == 3 * blocks, "one cluster per row"
    check_against_reference(loss, grad_s, grad_t, student, teacher, dtype, student_grad=need_s, teacher_grad=need_t,
                            temperature=1.3, reduction="sum")


@pytest.mark.parametrize("reduction", ["none", "batchmean", "mean"])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_masks_reductions_and_more_rows_than_the_grid_holds(emu, reduction, direction):
    """Masked rows (NaN inside, never read) get zero gradients from every block of their cluster; with
    two clusters in the grid, each takes every other row."""
    student, teacher = make_logits((7, 5000), torch.float32, "cpu", seed=40)
    mask = torch.tensor([1, 0, 1, 1, 0, 1, 1], dtype=torch.bool)
    student[~mask] = float("nan")
    teacher[~mask] = float("nan")
    with emu.limits(max_shared_optin=OPTIN, max_grid_x=6):
        loss, grad_s, grad_t, launches = emulated_kl(emu, student, teacher, mask=mask, reduction=reduction,
                                                     direction=direction, temperature=0.8)
    launch = only_launch(launches, "kl_cluster_rows_kernel")
    blocks = expected_plan(5000, torch.float32)[0]
    assert launch.cluster == blocks == 3 and launch.grid == 6, "two clusters for seven rows"
    assert grad_s[~mask].eq(0).all() and grad_t[~mask].eq(0).all()
    check_against_reference(loss, grad_s, grad_t, student, teacher, torch.float32, mask=mask, reduction=reduction,
                            direction=direction, temperature=0.8)


def test_a_row_without_a_distribution_is_nan_in_every_slice(emu):
    """Teacher logits all -inf in row 1: the loss and student gradient NaN, the same bits as the one-block kernel."""
    student, teacher = make_logits((3, 6000), torch.float32, "cpu", seed=41)
    teacher[1] = float("-inf")
    with emu.limits(max_shared_optin=OPTIN):
        loss, grad_s, grad_t, launches = emulated_kl(emu, student, teacher, reduction="none")
    with emu.limits(max_shared_optin=OPTIN, cluster_launch=False):
        one_block = emulated_kl(emu, student, teacher, reduction="none")
    only_launch(launches, "kl_cluster_rows_kernel")
    assert math.isnan(loss[1]) and grad_s[1].isnan().all()
    for name, cluster, block in zip(("loss", "student grad", "teacher grad"), (loss, grad_s, grad_t), one_block[:3]):
        assert torch.equal(cluster.isnan(), block.isnan()), f"{name}: NaN where the one-block kernel has none, or none"
        torch.testing.assert_close(cluster[1], block[1], equal_nan=True, rtol=0, atol=0, msg=name)
    keep = torch.tensor([True, False, True])
    check_against_reference(loss[keep], grad_s[keep], grad_t[keep], student[keep], teacher[keep], torch.float32,
                            reduction="none")


def test_a_262144_wide_bf16_row_takes_five_blocks_of_an_h100(emu):
    """The default (sm_90) limits: 227 KB per block, so a 262144-wide bf16 row (1 MiB of inputs) needs
    five blocks; every input byte is loaded once, every gradient byte stored once."""
    student, teacher = make_logits((1, 262144), torch.bfloat16, "cpu", seed=42, scale=2.0)
    (result, launches) = emu.traffic("kl_div_logits", student, teacher, None, 1.0, False, "sum", True, False)
    assert [t.name for t in launches] == ["kl_cluster_rows_kernel"] and launches[0].cluster == 5
    t = launches[0]
    row_bytes = 262144 * 2
    assert t.of("input 0").loaded == row_bytes and t.of("input 1").loaded == row_bytes, "each input read once"
    assert t.reread_bytes == 0
    assert t.of("output 1").stored == row_bytes
    loss, grad_s, _ = result
    ref, s64, _ = reference64(student, teacher, reduction="sum")
    assert_close(loss, ref, TOLERANCES[torch.bfloat16]["loss_rtol"], TOLERANCES[torch.bfloat16]["loss_atol"], "loss")
    ref.backward()
    assert_grad_close(grad_s, s64.grad, torch.bfloat16, "student grad")


@pytest.mark.parametrize("case", ["no clusters", "more than 8 blocks", "fits one block", "loss only"])
def test_the_one_block_kernel_where_no_cluster_is_needed_or_possible(emu, case):
    vocab = {"more than 8 blocks": 40000, "fits one block": 1500}.get(case, 6000)
    student, teacher = make_logits((2, vocab), torch.float32, "cpu", seed=43)
    with_grad = case != "loss only"
    with emu.limits(max_shared_optin=OPTIN, cluster_launch=case != "no clusters"):
        loss, grad_s, grad_t, launches = emulated_kl(emu, student, teacher, student_grad=with_grad,
                                                     teacher_grad=with_grad)
    launch = only_launch(launches, "kl_rows_kernel")
    assert launch.cluster == 1 and launch.template_args[2] == ("true" if with_grad else "false")
    if case == "more than 8 blocks":
        assert expected_plan(vocab, torch.float32) is None
    check_against_reference(loss, grad_s, grad_t, student, teacher, torch.float32, student_grad=with_grad,
                            teacher_grad=with_grad, reduction="sum")


# ------------------------------------------------------------------ distillation_loss: the hard term rides along


def emulated_distill(emu, student, teacher, labels, *, divergence, temperature, label_smoothing, reduction="sum"):
    (loss, grad_s, grad_t, _, parts), launches = emu.call(
        "distillation_loss", student, teacher, None, None, labels, None, None, divergence, 0.5, False,
        float(temperature), 0.7, 0.5, IGNORE, float(label_smoothing), reduction, 0.0, False, True, True, False)
    return loss, grad_s, grad_t, parts, launches


@pytest.mark.parametrize("vocab, dtype", [(6000, torch.float32), (2999, torch.float32), (9000, torch.bfloat16),
                                          (9001, torch.bfloat16), (9000, torch.float16), (9001, torch.float16),
                                          (2600, torch.float64), (2599, torch.float64)], ids=str)
@pytest.mark.parametrize("temperature, smoothing", [(1.0, 0.0), (1.6, 0.1)])
def test_distillation_loss_with_labels_over_a_cluster(emu, vocab, dtype, temperature, smoothing):
    """The hard kernel's cluster form: each block's hard sums merged with its KL state, the
    cross-entropy written once, the label's gradient element rewritten by the block whose slice holds
    it (labels spread over every slice of 9 rows; ignored rows hold NaN, never read)."""
    student, teacher, _, labels = make_step((9,), vocab, dtype, seed=vocab + int(10 * temperature))
    student, teacher, _, labels = poison_uncounted(student, teacher, None, labels)
    divergence = "reverse_kl" if dtype == torch.float16 else "forward_kl"
    with emu.limits(max_shared_optin=OPTIN):
        loss, grad_s, grad_t, parts, launches = emulated_distill(emu, student, teacher, labels, divergence=divergence,
                                                                 temperature=temperature, label_smoothing=smoothing)
    launch = only_launch(launches, "kl_hard_cluster_rows_kernel")
    pack = pack_of(dtype) if vocab % pack_of(dtype) == 0 else 1
    assert launch.template_args == [CXX_TYPES[dtype], str(pack)] and 2 <= launch.cluster <= 8 and launch.block <= 512
    options = dict(divergence=divergence, temperature=temperature, label_smoothing=smoothing, soft_weight=0.7,
                   hard_weight=0.5, reduction="sum")
    ref, (s64, t64) = distill_reference64(student, teacher, None, labels, validate=False, **options)
    tol = TOLERANCES[dtype]
    assert_close(loss, ref, tol["loss_rtol"], tol["loss_atol"], "loss vs float64 reference")
    ref.sum().backward()
    counted = labels != IGNORE
    assert_grad_close(grad_s[counted], s64.grad[counted], dtype, "student grad")
    assert_grad_close(grad_t[counted], t64.grad[counted], dtype, "teacher grad")
    assert (grad_s[~counted] == 0).all() and (grad_t[~counted] == 0).all()
    slice_elements = -(-vocab // pack // launch.cluster) * pack
    assert len(set((labels[counted] // slice_elements).tolist())) >= 2, "labels in more than one block's slice"


def test_labels_out_of_range_over_a_cluster_give_nan_rows(emu):
    student, teacher, _, labels = make_step((4,), 6000, torch.float32, seed=44)
    labels[:] = torch.tensor([5, 6000, 5999, -7])
    with emu.limits(max_shared_optin=OPTIN):
        rows, grad_s, _, parts, launches = emulated_distill(emu, student, teacher, labels, divergence="forward_kl",
                                                            temperature=2.0, label_smoothing=0.0, reduction="none")
    only_launch(launches, "kl_hard_cluster_rows_kernel")
    assert rows[[1, 3]].isnan().all() and rows[[0, 2]].isfinite().all()
    assert grad_s[[1, 3]].isnan().all() and grad_s[[0, 2]].isfinite().all()
    assert parts[1, [1, 3]].isnan().all()


def test_every_cluster_kernel_instantiation_ran(emu):
    assert_owned_kernels_ran(emu, pathlib.Path(__file__).name)
