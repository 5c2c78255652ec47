"""The cluster kernels of kl_div_logits (csrc/cuda/kl_div_cuda.cu, kl_cluster_rows_kernel) and jsd_logits
(csrc/cuda/jsd_cuda.cu, jsd_cluster_rows_kernel), and distillation_loss's with the hard term riding along
(kl_hard_cluster_rows_kernel, jsd_hard_cluster_rows_kernel), under the SIMT emulator: on sm_90+, a row whose two inputs do not fit one block's shared memory is spread over a
thread-block cluster of 2-8 blocks, each caching a slice, their row states merged through distributed
shared memory (JSD merges twice per row: the statistics, then K_p and K_q). The emulator runs a cluster's blocks together and checks the cluster barrier, the
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

from conftest import (TOLERANCES, assert_close, assert_grad_close, check_against_reference64, jsd_reference64,
                      make_logits, reference64)
from distill_helpers import IGNORE, make_step, poison_uncounted
from distill_helpers import reference64 as distill_reference64
from simt.emulator import (CXX_TYPES, Emulator, assert_owned_kernels_ran, emulated_jsd, emulated_kl, only_launch,
                           pack_of)

OPTIN = 16 * 1024


@pytest.fixture(scope="module")
def emu():
    return Emulator()


def expected_plan(vocab, dtype, optin=OPTIN, *, state_words=5, slot_bytes=None, max_threads=None):
    """(blocks per cluster, threads, shared bytes) of launch_plan.h's plan_cluster_rows_launch, or None
    where no cluster of up to 8 blocks caches the row. Per warp `state_words` accumulator words of
    scratch (KL: its row state, 5), then `slot_bytes` of slots (KL: one row state); at most `max_threads`
    threads (KL's cluster kernel: 512)."""
    element = torch.empty((), dtype=dtype).element_size()
    pack = pack_of(dtype) if vocab % pack_of(dtype) == 0 else 1
    units = vocab // pack
    per_thread = 2 * (2 if pack > 1 else 8)
    if max_threads is None:
        max_threads = 512
    state = state_words * (8 if dtype == torch.float64 else 4)
    slot = state if slot_bytes is None else slot_bytes
    for blocks in range(2, 9):
        slice_units = -(-units // blocks)
        threads = 32
        while threads < max_threads and threads * per_thread < slice_units:
            threads *= 2
        scratch = (threads // 32 * state + 15) // 16 * 16 + (slot + 15) // 16 * 16
        shared = scratch + 2 * slice_units * pack * element
        if shared <= optin:
            return blocks, threads, shared
    return None


def check_against_reference(loss, grad_s, grad_t, student, teacher, dtype, **options):
    check_against_reference64(reference64, loss, grad_s, grad_t, student, teacher, dtype, **options)


def check_jsd_against_reference(loss, grad_s, grad_t, student, teacher, dtype, **options):
    check_against_reference64(jsd_reference64, loss, grad_s, grad_t, student, teacher, dtype, **options)


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


# ------------------------------------------------------------------ jsd_logits: two merges per row

ROW_CASES = [(6000, torch.float32), (3001, torch.float32), (9000, torch.bfloat16), (9000, torch.float16),
             (2600, torch.float64), (2599, torch.float64), (11001, torch.bfloat16), (9001, torch.float16)]


def jsd_plan(vocab, dtype, hard=False, optin=OPTIN):
    """expected_plan for jsd_cuda.cu's cluster kernels: per warp the state (RowState, or RowHardState: 9
    words with the hard term) and the Divergences (2 words); slots: the state at a 16-byte boundary,
    then the Divergences. At most 512 threads (float64 256), with a gradient or without."""
    acc = 8 if dtype == torch.float64 else 4
    state_words = 9 if hard else 5
    max_threads = 256 if dtype == torch.float64 else 512
    return expected_plan(vocab, dtype, optin, state_words=state_words + 2,
                         slot_bytes=(state_words * acc + 15) // 16 * 16 + 2 * acc, max_threads=max_threads)


@pytest.mark.parametrize("vocab, dtype", ROW_CASES, ids=str)
@pytest.mark.parametrize("grads", ["student", "teacher", "both", "none"])
def test_jsd_rows_wider_than_one_block_are_spread_over_a_cluster(emu, vocab, dtype, grads):
    """JSD's three passes over a slice each block caches: the statistics and then K_p, K_q merged
    through distributed shared memory; the loss alone takes the cluster kernel too (its second pass
    needs the row again)."""
    student, teacher = make_logits((3, vocab), dtype, "cpu", seed=vocab + 7 * len(grads))
    need_s, need_t = grads in ("student", "both"), grads in ("teacher", "both")
    with_grad = need_s or need_t
    with emu.limits(max_shared_optin=OPTIN):
        loss, grad_s, grad_t, launches = emulated_jsd(emu, student, teacher, beta=0.3, temperature=1.3,
                                                      student_grad=need_s, teacher_grad=need_t)
    launch = only_launch(launches, "jsd_cluster_rows_kernel")
    pack = pack_of(dtype) if vocab % pack_of(dtype) == 0 else 1
    assert launch.template_args == [CXX_TYPES[dtype], str(pack), "true" if with_grad else "false"]
    blocks, threads, shared = jsd_plan(vocab, dtype)
    assert (launch.cluster, launch.block, launch.shared) == (blocks, threads, shared)
    assert launch.grid == 3 * blocks, "one cluster per row"
    check_jsd_against_reference(loss, grad_s, grad_t, student, teacher, dtype, student_grad=need_s,
                                teacher_grad=need_t, beta=0.3, temperature=1.3, reduction="sum")


@pytest.mark.parametrize("reduction", ["none", "batchmean"])
def test_jsd_masks_and_more_rows_than_the_grid_holds(emu, reduction):
    student, teacher = make_logits((7, 5000), torch.float32, "cpu", seed=50)
    mask = torch.tensor([1, 1, 0, 1, 0, 1, 1], dtype=torch.bool)
    student[~mask] = float("nan")
    teacher[~mask] = float("nan")
    with emu.limits(max_shared_optin=OPTIN, max_grid_x=7):
        loss, grad_s, grad_t, launches = emulated_jsd(emu, student, teacher, mask=mask, beta=0.7,
                                                      reduction=reduction, temperature=0.9)
    launch = only_launch(launches, "jsd_cluster_rows_kernel")
    blocks = jsd_plan(5000, torch.float32)[0]
    assert launch.cluster == blocks and launch.grid == 7 // blocks * blocks and launch.grid // blocks < 7
    assert grad_s[~mask].eq(0).all() and grad_t[~mask].eq(0).all()
    check_jsd_against_reference(loss, grad_s, grad_t, student, teacher, torch.float32, mask=mask, beta=0.7,
                                reduction=reduction, temperature=0.9)


def test_jsd_rows_without_a_distribution_are_nan_in_every_slice(emu):
    """A NaN student logit (row 0), a teacher all -inf (row 2), a +inf teacher logit (row 3): loss and
    gradients NaN in every block's slice, the same bits as the one-block kernel; rows 1 and 4 finite."""
    student, teacher = make_logits((5, 6000), torch.float32, "cpu", seed=51)
    student[0, 4500] = float("nan")
    teacher[2] = float("-inf")
    teacher[3, 10] = float("inf")
    with emu.limits(max_shared_optin=OPTIN):
        loss, grad_s, grad_t, launches = emulated_jsd(emu, student, teacher, beta=0.3, reduction="none")
    with emu.limits(max_shared_optin=OPTIN, cluster_launch=False):
        one_block = emulated_jsd(emu, student, teacher, beta=0.3, reduction="none")
    only_launch(launches, "jsd_cluster_rows_kernel")
    only_launch(one_block[3], "jsd_rows_kernel")
    bad = torch.tensor([True, False, True, True, False])
    assert loss[bad].isnan().all() and grad_s[bad].isnan().all() and grad_t[bad].isnan().all()
    for name, cluster, block in zip(("loss", "student grad", "teacher grad"), (loss, grad_s, grad_t), one_block[:3]):
        torch.testing.assert_close(cluster[bad], block[bad], equal_nan=True, rtol=0, atol=0, msg=name)
    check_jsd_against_reference(loss[~bad], grad_s[~bad], grad_t[~bad], student[~bad], teacher[~bad], torch.float32,
                                beta=0.3, reduction="none")


@pytest.mark.parametrize("with_grad", [True, False], ids=["student grad", "loss only"])
def test_a_262144_wide_bf16_jsd_row_is_read_once(emu, with_grad):
    """The default (sm_90) limits: 5 blocks of 227 KB; where the one-block kernel re-reads 78% of the row
    in each later pass, every input byte is loaded once and every gradient byte stored once."""
    student, teacher = make_logits((1, 262144), torch.bfloat16, "cpu", seed=52, scale=2.0)
    result, launches = emu.traffic("jsd_logits", student, teacher, None, 0.5, 1.0, "sum", with_grad, False)
    assert [t.name for t in launches] == ["jsd_cluster_rows_kernel"] and launches[0].cluster == 5
    t = launches[0]
    row_bytes = 262144 * 2
    assert t.of("input 0").loaded == row_bytes and t.of("input 1").loaded == row_bytes, "each input read once"
    assert t.reread_bytes == 0
    if with_grad:
        assert t.of("output 1").stored == row_bytes
    loss, grad_s, _ = result
    ref, s64, _ = jsd_reference64(student, teacher, beta=0.5, reduction="sum")
    assert_close(loss, ref, TOLERANCES[torch.bfloat16]["loss_rtol"], TOLERANCES[torch.bfloat16]["loss_atol"], "loss")
    if with_grad:
        ref.backward()
        assert_grad_close(grad_s, s64.grad, torch.bfloat16, "student grad")


@pytest.mark.parametrize("case", ["no clusters", "more than 8 blocks", "fits one block"])
def test_jsd_keeps_the_one_block_kernel_where_no_cluster_is_needed_or_possible(emu, case):
    vocab = {"more than 8 blocks": 40000, "fits one block": 1500}.get(case, 6000)
    student, teacher = make_logits((2, vocab), torch.float32, "cpu", seed=53)
    with emu.limits(max_shared_optin=OPTIN, cluster_launch=case != "no clusters"):
        loss, grad_s, grad_t, launches = emulated_jsd(emu, student, teacher, beta=0.3)
    launch = only_launch(launches, "jsd_rows_kernel")
    assert launch.cluster == 1
    if case == "more than 8 blocks":
        assert jsd_plan(vocab, torch.float32) is None
    check_jsd_against_reference(loss, grad_s, grad_t, student, teacher, torch.float32, beta=0.3, reduction="sum")


# ------------------------------------------------------------------ distillation_loss: the hard term rides along


def emulated_distill(emu, student, teacher, labels, *, divergence, temperature, label_smoothing, reduction="sum",
                     with_grad=True):
    (loss, grad_s, grad_t, _, parts), launches = emu.call(
        "distillation_loss", student, teacher, None, None, labels, None, None, divergence, 0.5, False,
        float(temperature), 0.7, 0.5, IGNORE, float(label_smoothing), reduction, 0.0, False, with_grad, with_grad,
        False)
    return loss, grad_s, grad_t, parts, launches


DISTILL_CASES = [(6000, torch.float32), (2999, torch.float32), (9000, torch.bfloat16), (9001, torch.bfloat16),
                 (9000, torch.float16), (9001, torch.float16), (2600, torch.float64), (2599, torch.float64)]


@pytest.mark.parametrize("vocab, dtype", DISTILL_CASES, ids=str)
@pytest.mark.parametrize("temperature, smoothing", [(1.0, 0.0), (1.6, 0.1)])
@pytest.mark.parametrize("form", ["kl", "jsd"])
def test_distillation_loss_with_labels_over_a_cluster(emu, vocab, dtype, temperature, smoothing, form):
    """The hard kernels' cluster forms: each block's hard sums merged with its KL (or JSD) state, the
    cross-entropy written once, the label's gradient element rewritten by the block whose slice holds
    it (labels spread over every slice of 9 rows; ignored rows hold NaN, never read)."""
    student, teacher, _, labels = make_step((9,), vocab, dtype, seed=vocab + int(10 * temperature) + len(form))
    student, teacher, _, labels = poison_uncounted(student, teacher, None, labels)
    divergence = "jsd" if form == "jsd" else "reverse_kl" if dtype == torch.float16 else "forward_kl"
    with emu.limits(max_shared_optin=OPTIN):
        loss, grad_s, grad_t, parts, launches = emulated_distill(emu, student, teacher, labels, divergence=divergence,
                                                                 temperature=temperature, label_smoothing=smoothing)
    pack = pack_of(dtype) if vocab % pack_of(dtype) == 0 else 1
    if form == "jsd":
        launch = only_launch(launches, "jsd_hard_cluster_rows_kernel")
        assert launch.template_args == [CXX_TYPES[dtype], str(pack), "true"]
        assert (launch.cluster, launch.block, launch.shared) == jsd_plan(vocab, dtype, hard=True)
    else:
        launch = only_launch(launches, "kl_hard_cluster_rows_kernel")
        assert launch.template_args == [CXX_TYPES[dtype], str(pack)] and 2 <= launch.cluster <= 8
        assert launch.block <= 512
    options = dict(divergence=divergence, temperature=temperature, label_smoothing=smoothing, soft_weight=0.7,
                   hard_weight=0.5, reduction="sum", beta=0.5)
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


@pytest.mark.parametrize("vocab, dtype", DISTILL_CASES, ids=str)
def test_distillation_loss_jsd_without_a_gradient_over_a_cluster(emu, vocab, dtype):
    """The loss alone (evaluation): JSD still needs the row twice, so the cluster kernel takes it too."""
    student, teacher, _, labels = make_step((5,), vocab, dtype, seed=vocab + 3)
    student, teacher, _, labels = poison_uncounted(student, teacher, None, labels)
    with emu.limits(max_shared_optin=OPTIN):
        loss, grad_s, grad_t, parts, launches = emulated_distill(emu, student, teacher, labels, divergence="jsd",
                                                                 temperature=1.6, label_smoothing=0.1,
                                                                 with_grad=False)
    launch = only_launch(launches, "jsd_hard_cluster_rows_kernel")
    pack = pack_of(dtype) if vocab % pack_of(dtype) == 0 else 1
    assert launch.template_args == [CXX_TYPES[dtype], str(pack), "false"]
    assert (launch.cluster, launch.block, launch.shared) == jsd_plan(vocab, dtype, hard=True)
    assert grad_s.numel() == 0 and grad_t.numel() == 0
    ref, _ = distill_reference64(student, teacher, None, labels, validate=False, divergence="jsd", beta=0.5,
                                 temperature=1.6, label_smoothing=0.1, soft_weight=0.7, hard_weight=0.5,
                                 reduction="sum")
    tol = TOLERANCES[dtype]
    assert_close(loss, ref, tol["loss_rtol"], tol["loss_atol"], "loss vs float64 reference")


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
