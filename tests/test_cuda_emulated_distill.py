"""The CUDA kernels of the distillation step (kl_hard_rows_kernel, jsd_hard_rows_kernel,
sparse_bucket_hard_kernel: the soft kernels with the hard term riding along, csrc/cuda/hard_term.cuh) under
the SIMT emulator (tests/simt): the unchanged .cu sources on CPU fibers with the sanitizer's checks, the
real host code of distillation_loss (distill_cuda.cu), against the float64 reference. Each test asserts which
kernel instantiation ran; the last one checks that every instantiation this file owns ran."""

import pathlib

import pytest
import torch

from conftest import TOLERANCES, assert_close, assert_grad_close
from distill_helpers import IGNORE, make_labels, make_step, poison_uncounted, reference64
from kl_fused._sparse_args import support_mass_tolerance
from simt.emulator import CXX_TYPES, Emulator, assert_owned_kernels_ran, only_launch, pack_of

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
KERNELS = {"dense": "kl_hard_rows_kernel", "jsd": "jsd_hard_rows_kernel", "topk": "sparse_bucket_hard_kernel",
           "none": "sparse_bucket_hard_kernel"}


@pytest.fixture(scope="module")
def emu():
    return Emulator()


def emulated(emu, student, teacher, topk, labels, *, mask=None, num_items=None, divergence="forward_kl", beta=0.5,
             tail="bucket", temperature=1.0, soft_weight=1.0, hard_weight=0.5, label_smoothing=0.0, reduction="sum",
             validate=False, student_grad=True, teacher_grad=True):
    idx, lp = topk if topk is not None else (None, None)
    tolerance = support_mass_tolerance(lp.dtype, idx.shape[-1]) if idx is not None else 0.0
    (loss, gs, gt, glp, parts), launches = emu.call(
        "distillation_loss", student, teacher, idx, lp, labels, mask, num_items, divergence, float(beta),
        tail == "renormalize", float(temperature), float(soft_weight), float(hard_weight), IGNORE,
        float(label_smoothing), reduction, tolerance, validate, student_grad, teacher_grad and teacher is not None,
        teacher_grad and lp is not None)
    return loss, gs, (gt if teacher is not None else glp), parts, launches


def check(loss, grad_s, grad_t, student, teacher, topk, labels, dtype, *, student_grad=True, teacher_grad=True,
          **options):
    options.setdefault("reduction", "sum")
    options.setdefault("hard_weight", 0.5)
    ref, (s64, t64) = reference64(student, teacher, topk, labels, validate=False, **options)
    tol = TOLERANCES[dtype]
    assert_close(loss, ref, tol["loss_rtol"], tol["loss_atol"], "loss vs float64 reference")
    ref.sum().backward()
    counted = labels != IGNORE
    if options.get("mask") is not None:
        counted &= options["mask"]
    if student_grad:
        assert_grad_close(grad_s[counted], s64.grad[counted], dtype, "student grad")
        assert (grad_s[~counted] == 0).all()
    else:
        assert grad_s.numel() == 0
    if teacher_grad and t64 is not None:
        assert_grad_close(grad_t[counted], t64.grad[counted], grad_t.dtype, "teacher grad")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("vocab", [320, 333])
@pytest.mark.parametrize("form", ["dense", "jsd", "topk"])
@pytest.mark.parametrize("with_grad", [True, False])
def test_every_instantiation_against_the_reference(emu, dtype, vocab, form, with_grad):
    """V = 320 takes 16-byte packs, V = 333 one element per access; ignored rows hold NaN."""
    teacher_form = "topk" if form == "topk" else "dense"
    student, teacher, topk, labels = make_step((5,), vocab, dtype, seed=vocab + len(form), teacher=teacher_form)
    student, teacher, topk, labels = poison_uncounted(student, teacher, topk, labels)
    options = dict(divergence="jsd" if form == "jsd" else "forward_kl", beta=0.3, temperature=1.6,
                   label_smoothing=0.1, soft_weight=0.7)
    loss, grad_s, grad_t, _, launches = emulated(emu, student, teacher, topk, labels, student_grad=with_grad,
                                                 teacher_grad=with_grad, **options)
    pack = pack_of(dtype) if vocab % pack_of(dtype) == 0 else 1
    launch = only_launch(launches, KERNELS[form])
    assert launch.template_args == [CXX_TYPES[dtype], str(pack), "true" if with_grad else "false"]
    assert launch.block <= 512
    check(loss, grad_s, grad_t, student, teacher, topk, labels, dtype, student_grad=with_grad, teacher_grad=with_grad,
          **options)


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
@pytest.mark.parametrize("temperature, eps", [(1.0, 0.0), (1.0, 0.2), (2.5, 0.0), (2.5, 0.2)])
@pytest.mark.parametrize("grads", ["student", "teacher", "both"])
def test_dense_divergences_temperatures_smoothing_and_gradients(emu, divergence, temperature, eps, grads):
    student, teacher, _, labels = make_step((4,), 256, torch.float32, seed=3)
    mask = torch.tensor([1, 0, 1, 1], dtype=torch.bool)
    student, teacher, _, labels = poison_uncounted(student, teacher, None, labels, mask)
    need_s, need_t = grads in ("student", "both"), grads in ("teacher", "both")
    options = dict(divergence=divergence, beta=0.4, temperature=temperature, label_smoothing=eps, mask=mask,
                   reduction="batchmean", hard_weight=0.8)
    loss, grad_s, grad_t, parts, launches = emulated(emu, student, teacher, None, labels, student_grad=need_s,
                                                     teacher_grad=need_t, **options)
    only_launch(launches, "jsd_hard_rows_kernel" if divergence == "jsd" else "kl_hard_rows_kernel")
    check(loss, grad_s, grad_t, student, teacher, None, labels, torch.float32, student_grad=need_s,
          teacher_grad=need_t, **options)


@pytest.mark.parametrize("tail", ["bucket", "renormalize"])
@pytest.mark.parametrize("temperature", [1.0, 1.8])
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_topk_tails_with_labels_on_and_off_the_support(emu, tail, temperature, eps):
    student, _, topk, labels = make_step((6,), 400, torch.float32, seed=4, teacher="topk", slots=16)
    labels[:3] = topk[0][:3, 1].long()  # on the support; the others mostly off it
    loss, grad_s, grad_lp, _, launches = emulated(emu, student, None, topk, labels, tail=tail, temperature=temperature,
                                                  label_smoothing=eps)
    only_launch(launches, "sparse_bucket_hard_kernel")
    check(loss, grad_s, grad_lp, student, None, topk, labels, torch.float32, tail=tail, temperature=temperature,
          label_smoothing=eps)


@pytest.mark.parametrize("form", ["dense", "topk"])
def test_hard_term_after_a_stretch_of_minus_inf(emu, form):
    """The first 300 logits -inf and the rest near -200, at T = 1.5 (the hard term's own sums): the CPU
    top-k kernel once took the empty stretch's stand-in shift 0 for the row's (tests/test_distill.py); the
    CUDA kernels' online maxima start at -inf."""
    student, teacher, topk, labels = make_step((3,), 700, torch.float32, seed=14, teacher=form, slots=8)
    student = (student - 200).clone()
    student[:, :300] = float("-inf")
    if teacher is not None:
        teacher = teacher.clone()
        teacher[:, :300] = float("-inf")
    else:
        idx, lp = topk
        topk = (torch.where(lp.isfinite(), idx % 400 + 300, idx), lp)
    labels = torch.tensor([350, 500, 699])
    loss, grad_s, grad_t, _, launches = emulated(emu, student, teacher, topk, labels, temperature=1.5,
                                                 hard_weight=1.0)
    only_launch(launches, KERNELS[form])
    check(loss, grad_s, grad_t, student, teacher, topk, labels, torch.float32, temperature=1.5, hard_weight=1.0)


@pytest.mark.parametrize("eps", [0.0, 0.3])
def test_no_teacher_is_a_cross_entropy(emu, eps):
    student, _, _, labels = make_step((7,), 500, torch.bfloat16, seed=5, teacher="none")
    loss, grad_s, _, parts, launches = emulated(emu, student, None, None, labels, hard_weight=1.0,
                                                label_smoothing=eps, reduction="batchmean",
                                                num_items=torch.tensor(11))
    only_launch(launches, "sparse_bucket_hard_kernel")
    check(loss, grad_s, None, student, None, None, labels, torch.bfloat16, hard_weight=1.0, label_smoothing=eps,
          reduction="batchmean", num_items_in_batch=11)
    assert parts[0] == 0


@pytest.mark.parametrize("form", ["dense", "jsd", "topk", "none"])
def test_labels_out_of_range_give_nan_rows_never_read_and_raise_with_validate(emu, form):
    teacher_form = {"jsd": "dense"}.get(form, form)
    student, teacher, topk, labels = make_step((4,), 96, torch.float32, seed=6, teacher=teacher_form)
    labels = make_labels((4,), 96, seed=7, ignored=0.0)
    labels[1], labels[3] = 96, -7
    divergence = "jsd" if form == "jsd" else "forward_kl"
    rows, grad_s, _, parts, _ = emulated(emu, student, teacher, topk, labels, reduction="none", divergence=divergence)
    assert rows[[1, 3]].isnan().all() and rows[[0, 2]].isfinite().all()
    assert grad_s[[1, 3]].isnan().all() and grad_s[[0, 2]].isfinite().all()
    assert parts[1, [1, 3]].isnan().all()
    with pytest.raises(ValueError, match=r"labels must lie in \[0, V\) = \[0, 96\).*row 1 holds 96"):
        emulated(emu, student, teacher, topk, labels, divergence=divergence, validate=True)


@pytest.mark.parametrize("form", ["dense", "jsd", "topk"])
def test_a_small_grid_and_a_partial_row_cache(emu, form):
    """Each block takes several rows (the merge states, the row cache and the bitmap reused), and the
    row is cached in part (a small opt-in shared memory; a device without clusters, as sm_80:
    test_cuda_emulated_cluster.py has the cluster kernel)."""
    teacher_form = "topk" if form == "topk" else "dense"
    student, teacher, topk, labels = make_step((9,), 3000, torch.float32, seed=8, teacher=teacher_form, slots=20)
    student, teacher, topk, labels = poison_uncounted(student, teacher, topk, labels)
    options = dict(divergence="jsd" if form == "jsd" else "reverse_kl" if form == "dense" else "forward_kl",
                   temperature=1.4, label_smoothing=0.05)
    with emu.limits(max_grid_x=2, max_shared_optin=8 * 1024, cluster_launch=False):
        loss, grad_s, grad_t, _, launches = emulated(emu, student, teacher, topk, labels, **options)
    launch = only_launch(launches, KERNELS[form])
    assert launch.grid == 2
    check(loss, grad_s, grad_t, student, teacher, topk, labels, torch.float32, **options)


def test_every_owned_instantiation_ran(emu):
    assert_owned_kernels_ran(emu, pathlib.Path(__file__).name)
