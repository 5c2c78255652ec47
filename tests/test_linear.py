"""linear_kl_div: the chunked loss from hidden states and the output layer, against the materialised
path in float64 (values and every gradient), TRL's chunked divergence (an independent implementation),
and the contract: masks never read, memory independent of the rows, fp32 weight accumulation,
autocast, compile, errors."""

import math

import pytest
import torch

import kl_fused
from conftest import TOLERANCES, assert_close, assert_grad_close, fused_op_must_run

NAMES = ("student_hidden", "student_weight", "student_bias", "teacher_logits", "teacher_hidden", "teacher_weight",
         "teacher_bias")


def make_problem(leading, hidden, vocab, dtype, device, seed, *, teacher="hidden", bias=True, teacher_hidden_size=None):
    """Random layers whose logits have a realistic spread (std ~3), never zeros."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (scale * torch.randn(shape, generator=gen, dtype=torch.float64)).to(device=device, dtype=dtype)

    h_t_size = teacher_hidden_size or hidden + 4
    tensors = {
        "student_hidden": randn(*leading, hidden),
        "student_weight": randn(vocab, hidden, scale=3.0 / math.sqrt(hidden)),
        "student_bias": randn(vocab, scale=0.5) if bias else None,
    }
    if teacher == "hidden":
        tensors["teacher_hidden"] = randn(*leading, h_t_size)
        tensors["teacher_weight"] = randn(vocab, h_t_size, scale=3.0 / math.sqrt(h_t_size))
        tensors["teacher_bias"] = randn(vocab, scale=0.5) if bias else None
    else:
        tensors["teacher_logits"] = randn(*leading, vocab, scale=3.0)
    return tensors


def call(fn, tensors, **options):
    kwargs = {name: tensors.get(name) for name in NAMES[2:]}
    return fn(tensors["student_hidden"], tensors["student_weight"], kwargs.pop("teacher_logits"), **kwargs, **options)


def grads_of(fn, tensors, weights=None, **options):
    """(loss, {name: grad}) for every tensor in `tensors`, all made leaves that require grad."""
    leaves = {name: t.detach().clone().requires_grad_() for name, t in tensors.items() if t is not None}
    loss = call(fn, leaves, **options)
    upstream = weights if weights is not None else torch.ones_like(loss)
    names = list(leaves)
    grads = torch.autograd.grad(loss, [leaves[n] for n in names], upstream)
    return loss, dict(zip(names, grads))


def _rounded_like(exact, rounded):
    """exact's gradient, rounded's value: logits as the layer's dtype rounds them, differentiated in float64."""
    return exact + (rounded.double() - exact).detach()


def _materialised64(student_hidden, student_weight, teacher_logits=None, *, teacher_hidden=None, teacher_weight=None,
                    student_bias=None, teacher_bias=None, mask=None, dtype=torch.float64, **options):
    """The materialised path in float64, with the logits of a 16-bit layer rounded as that layer's matmul
    rounds them (the fused path computes them in the layer's dtype too)."""
    post = {side: (options.pop(f"{side}_logit_scale", 1.0), options.pop(f"{side}_softcap", None))
            for side in ("student", "teacher")}
    options.pop("chunk_rows", None)

    def logits(side, h, w, b):
        if mask is not None:
            h = torch.where(mask.unsqueeze(-1), h, 0.0)
        exact = torch.nn.functional.linear(h, w, b)
        if dtype != torch.float64:
            rounded = torch.nn.functional.linear(h.detach().to(dtype), w.detach().to(dtype),
                                                 b.detach().to(dtype) if b is not None else None)
            exact = _rounded_like(exact, rounded)
        return kl_fused.reference._post_logits(exact, *post[side])

    student = logits("student", student_hidden, student_weight, student_bias)
    teacher = teacher_logits if teacher_logits is not None else logits("teacher", teacher_hidden, teacher_weight, teacher_bias)
    if "beta" in options:  # linear_jsd
        return kl_fused.reference.jsd_logits(student, teacher, mask=mask, **options)
    return kl_fused.reference.kl_div_logits(student, teacher, mask=mask, **options)


def float64_reference(tensors, weights=None, **options):
    dtype = tensors["student_hidden"].dtype
    as64 = {name: t.double() if t is not None else None for name, t in tensors.items()}
    if torch.is_autocast_enabled(tensors["student_hidden"].device.type):
        dtype = torch.get_autocast_dtype(tensors["student_hidden"].device.type)
    return grads_of(_materialised64, as64, weights.double() if weights is not None else None, dtype=dtype, **options)


def check_against_reference(tensors, dtype, weights=None, **options):
    """linear_kl_div, or linear_jsd when the options hold a beta, against the materialised path."""
    loss, grads = grads_of(kl_fused.linear_jsd if "beta" in options else kl_fused.linear_kl_div, tensors, weights,
                           **options)
    ref_loss, ref_grads = float64_reference(tensors, weights, **options)
    tol = TOLERANCES[dtype]
    assert_close(loss, ref_loss, tol["loss_rtol"], tol["loss_atol"], "loss vs float64 materialised")
    for name, grad in grads.items():
        assert grad.dtype == tensors[name].dtype and grad.shape == tensors[name].shape, name
        assert_layer_grad_close(grad, ref_grads[name], dtype, name)
    return loss, grads


def assert_layer_grad_close(actual, expected, dtype, name):
    """A layer's gradient is a sum over rows or the vocabulary of products with the logits' gradient,
    which a 16-bit path holds rounded to 16 bits (as a materialised 16-bit path does): an element
    where those terms cancel keeps the terms' absolute error, so the tolerance is relative to the
    gradient's largest element rather than to each element."""
    if dtype in (torch.float16, torch.bfloat16) and name != "teacher_logits":
        scale = expected.abs().max().item()
        rtol = TOLERANCES[dtype]["grad_rtol"]
        assert_close(actual, expected, rtol, rtol * scale, f"{name} gradient")
    else:
        assert_grad_close(actual, expected, dtype, f"{name} gradient")


@pytest.mark.parametrize("chunk_rows", [1, 7, 12, 64])
@pytest.mark.parametrize("teacher", ["hidden", "logits"])
@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_values_and_every_gradient_match_the_materialised_path(device, chunk_rows, teacher, direction):
    """12 rows in 3-D: chunks of 7 do not divide them, 12 and 64 hold them whole."""
    tensors = make_problem((3, 4), 24, 301, torch.float64, device, seed=chunk_rows, teacher=teacher)
    # The chunk loop runs the distillation step's row op (kl_div_logits' kernels when there are no labels).
    with fused_op_must_run(torch.ops.kl_fused.chunked_linear_loss.default, torch.ops.kl_fused.distillation_loss.default):
        check_against_reference(tensors, torch.float64, temperature=1.6, direction=direction, chunk_rows=chunk_rows)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("reduction", ["none", "sum", "batchmean", "mean"])
def test_dtypes_and_reductions(device, dtype, reduction):
    tensors = make_problem((2, 9), 32, 500, dtype, device, seed=3)
    weights = None
    if reduction == "none":
        weights = torch.linspace(-1.0, 2.0, 18, dtype=torch.float32, device=device).view(2, 9)
    check_against_reference(tensors, dtype, weights, temperature=0.9, reduction=reduction, chunk_rows=5)


@pytest.mark.parametrize("reduction", ["batchmean", "none", "mean"])
def test_masked_rows_are_never_read_and_get_zero_gradient(device, reduction):
    tensors = make_problem((3, 5), 16, 200, torch.float64, device, seed=4)
    mask = torch.tensor([[1, 0, 1, 1, 0], [0, 0, 0, 0, 0], [1, 1, 0, 1, 1]], dtype=torch.bool, device=device)
    for name in ("student_hidden", "teacher_hidden"):
        tensors[name][~mask] = float("nan")
    weights = torch.rand(3, 5, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(device)
    weights = weights if reduction == "none" else None
    loss, grads = check_against_reference(tensors, torch.float64, weights, mask=mask, reduction=reduction, chunk_rows=3)
    assert torch.isfinite(loss).all()
    assert (grads["student_hidden"][~mask] == 0).all() and (grads["teacher_hidden"][~mask] == 0).all()
    for name in ("student_weight", "student_bias", "teacher_weight", "teacher_bias"):
        assert torch.isfinite(grads[name]).all(), name


def test_all_rows_masked_gives_zero_loss_and_gradients(device):
    tensors = make_problem((4,), 8, 50, torch.float32, device, seed=6)
    mask = torch.zeros(4, dtype=torch.bool, device=device)
    loss, grads = grads_of(kl_fused.linear_kl_div, tensors, mask=mask)
    assert loss.item() == 0.0 and all((g == 0).all() for g in grads.values())


def test_non_contiguous_hidden_states_are_read_in_place(device):
    """A shifted view (hidden[:, :-1]) and a transposed one: no copy of the whole hidden states."""
    base = make_problem((4, 7), 20, 150, torch.float64, device, seed=7, teacher="logits")
    tensors = dict(base)
    tensors["student_hidden"] = base["student_hidden"][:, :-1]
    tensors["teacher_logits"] = base["teacher_logits"][:, :-1]
    check_against_reference(tensors, torch.float64, chunk_rows=5)
    tensors["student_hidden"] = base["student_hidden"].transpose(0, 1)
    tensors["teacher_logits"] = base["teacher_logits"].transpose(0, 1)
    mask = torch.rand(7, 4, generator=torch.Generator().manual_seed(8)).to(device) > 0.3
    check_against_reference(tensors, torch.float64, chunk_rows=4, mask=mask)


def test_no_bias_and_one_dimensional_hidden(device):
    tensors = make_problem((), 12, 90, torch.float64, device, seed=9, bias=False)
    loss, _ = check_against_reference(tensors, torch.float64, reduction="none")
    assert loss.shape == ()


@pytest.mark.parametrize("teacher", ["hidden", "logits"])
def test_logit_scales_and_softcaps_with_gradients(device, teacher):
    tensors = make_problem((10,), 16, 240, torch.float64, device, seed=10, teacher=teacher)
    options = dict(student_logit_scale=0.75, student_softcap=4.0, temperature=2.0, chunk_rows=3)
    if teacher == "hidden":
        options.update(teacher_logit_scale=1.5, teacher_softcap=6.0)
    check_against_reference(tensors, torch.float64, **options)


def test_against_trl_chunked_divergence(device):
    """TRL 1.16's DistillationTrainer loss (forward KL: beta = 0) on the same hidden states and heads,
    with Cohere/Gemma-style logit scale and softcap, masked completion tokens."""
    from trl.trainer.distillation_trainer import _chunked_divergence_loss

    tensors = make_problem((2, 6), 32, 1000, torch.float32, device, seed=11)
    mask = torch.tensor([[0, 1, 1, 1, 1, 0], [0, 0, 1, 1, 1, 1]], dtype=torch.bool, device=device)
    options = dict(temperature=1.5, student_logit_scale=0.8, teacher_logit_scale=1.2, student_softcap=5.0,
                   teacher_softcap=7.0)
    loss, grads = grads_of(kl_fused.linear_kl_div, tensors, mask=mask, **options)
    leaves = {name: t.detach().clone().requires_grad_() for name, t in tensors.items() if t is not None}
    trl_loss, _, _ = _chunked_divergence_loss(
        leaves["student_hidden"], leaves["teacher_hidden"], leaves["student_weight"], leaves["teacher_weight"],
        mask.long(), beta=0.0, student_lm_head_bias=leaves["student_bias"], teacher_lm_head_bias=leaves["teacher_bias"],
        student_logit_scale=1.0 * options["student_logit_scale"], teacher_logit_scale=options["teacher_logit_scale"],
        student_final_logit_softcapping=options["student_softcap"],
        teacher_final_logit_softcapping=options["teacher_softcap"], temperature=options["temperature"])
    trl_loss.backward()
    assert_close(loss, trl_loss, 2e-5, 2e-6, "loss vs TRL")
    for name in ("student_hidden", "student_weight", "student_bias"):
        assert_grad_close(grads[name], leaves[name].grad, torch.float32, f"{name} vs TRL")


# ------------------------------------------------------------------------------------- linear_jsd


@pytest.mark.parametrize("beta", [0.0, 0.1, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("teacher", ["hidden", "logits"])
def test_linear_jsd_matches_the_materialised_path(device, beta, teacher):
    tensors = make_problem((3, 5), 20, 257, torch.float64, device, seed=40, teacher=teacher)
    mask = torch.tensor([[1, 1, 0, 1, 1], [0, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool, device=device)
    tensors["student_hidden"][~mask] = float("nan")
    with fused_op_must_run(torch.ops.kl_fused.chunked_linear_loss.default, torch.ops.kl_fused.distillation_loss.default):
        check_against_reference(tensors, torch.float64, beta=beta, temperature=1.4, mask=mask, chunk_rows=4,
                                student_softcap=5.0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_linear_jsd_dtypes_and_reductions(device, dtype, reduction):
    tensors = make_problem((2, 7), 32, 400, dtype, device, seed=41)
    weights = torch.linspace(-1.0, 2.0, 14, device=device).view(2, 7) if reduction == "none" else None
    check_against_reference(tensors, dtype, weights, beta=0.3, reduction=reduction, chunk_rows=5)


@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_linear_jsd_against_trl_chunked_divergence(device, beta):
    """TRL 1.16's DistillationTrainer loss on the same hidden states and heads (its mixture is
    (1 - beta) student + beta teacher, GKD's convention and ours), logit scales and softcaps included."""
    from trl.trainer.distillation_trainer import _chunked_divergence_loss

    tensors = make_problem((2, 6), 32, 700, torch.float32, device, seed=42)
    mask = torch.tensor([[0, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 0]], dtype=torch.bool, device=device)
    options = dict(temperature=2.0, student_logit_scale=1.1, teacher_logit_scale=0.9, student_softcap=6.0,
                   teacher_softcap=8.0)
    loss, grads = grads_of(kl_fused.linear_jsd, tensors, mask=mask, beta=beta, chunk_rows=3, **options)
    leaves = {name: t.detach().clone().requires_grad_() for name, t in tensors.items() if t is not None}
    trl_loss, _, _ = _chunked_divergence_loss(
        leaves["student_hidden"], leaves["teacher_hidden"], leaves["student_weight"], leaves["teacher_weight"],
        mask.long(), beta=beta, student_lm_head_bias=leaves["student_bias"], teacher_lm_head_bias=leaves["teacher_bias"],
        student_logit_scale=options["student_logit_scale"], teacher_logit_scale=options["teacher_logit_scale"],
        student_final_logit_softcapping=options["student_softcap"],
        teacher_final_logit_softcapping=options["teacher_softcap"], temperature=options["temperature"])
    trl_loss.backward()
    assert_close(loss, trl_loss, 2e-5, 2e-6, "loss vs TRL")
    for name in ("student_hidden", "student_weight", "student_bias"):
        assert_grad_close(grads[name], leaves[name].grad, torch.float32, f"{name} vs TRL")


def test_linear_jsd_rejects_a_beta_outside_the_unit_interval(device):
    tensors = make_problem((2,), 8, 20, torch.float32, device, seed=43, teacher="logits")
    for beta, error in ((-0.1, ValueError), (1.5, ValueError), (float("nan"), ValueError), ("0.5", TypeError)):
        with pytest.raises(error, match="beta"):
            kl_fused.linear_jsd(tensors["student_hidden"], tensors["student_weight"], tensors["teacher_logits"], beta=beta)


# ------------------------------------------------------------------------------------- accumulation


def _bf16_ulp(x):
    return torch.ldexp(torch.ones_like(x), torch.frexp(x.double())[1] - 8)


def test_bf16_weight_gradient_accumulates_in_fp32_and_rounds_once(device):
    """128 chunks of one row each give the bf16 weight gradient of one chunk of 128 rows to within one
    bf16 step per element: every chunk's product is added in fp32 and the sum rounded once. Rounding the
    running sum to bf16 at every chunk (the precision bug of Liger's fused linear losses, #1432) is far
    off that, as the second half checks on the same products."""
    tensors = make_problem((128,), 32, 64, torch.bfloat16, device, seed=12, teacher="logits")
    grads = {chunk: grads_of(kl_fused.linear_kl_div, tensors, chunk_rows=chunk)[1]["student_weight"] for chunk in (1, 128)}
    one_step = _bf16_ulp(grads[128].abs().double() + 1e-30)
    assert ((grads[1].double() - grads[128].double()).abs() <= one_step).all()

    # The same products accumulated in bf16, chunk by chunk: what the test must tell apart.
    leaves = {name: t.detach().clone().requires_grad_() for name, t in tensors.items() if t is not None}
    rows_logits = torch.nn.functional.linear(leaves["student_hidden"], leaves["student_weight"], leaves["student_bias"])
    (dz,) = torch.autograd.grad(kl_fused.kl_div_logits(rows_logits, leaves["teacher_logits"]), [rows_logits])
    running = torch.zeros_like(grads[128])
    for row in range(128):
        running = running + torch.outer(dz[row], tensors["student_hidden"][row])  # bf16 running sum
    assert ((running.double() - grads[128].double()).abs() > one_step).any(), "the bound must catch bf16 accumulation"


def test_retained_graph_and_weighted_upstream(device):
    tensors = make_problem((6,), 16, 100, torch.float64, device, seed=13)
    leaves = {name: t.clone().requires_grad_() for name, t in tensors.items() if t is not None}
    loss = call(kl_fused.linear_kl_div, leaves, chunk_rows=4, reduction="sum")
    (loss * 2.5).backward(retain_graph=True)
    first = {name: t.grad.clone() for name, t in leaves.items()}
    for t in leaves.values():
        t.grad = None
    (loss * -0.5).backward()
    _, ref = float64_reference(tensors, torch.tensor(1.0, dtype=torch.float64, device=device), reduction="sum")
    for name, t in leaves.items():
        assert_close(first[name], 2.5 * ref[name], 1e-9, 1e-12, f"{name}, first backward")
        assert_close(t.grad, -0.5 * ref[name], 1e-9, 1e-12, f"{name}, second backward")


def test_only_the_tensors_that_require_grad_get_one(device):
    tensors = make_problem((5,), 8, 60, torch.float32, device, seed=14)
    h = tensors["student_hidden"].clone().requires_grad_()
    loss = kl_fused.linear_kl_div(h, tensors["student_weight"], teacher_hidden=tensors["teacher_hidden"],
                                  teacher_weight=tensors["teacher_weight"])
    (grad,) = torch.autograd.grad(loss, [h])
    _, ref = float64_reference({"student_hidden": tensors["student_hidden"], "student_weight": tensors["student_weight"],
                                "teacher_hidden": tensors["teacher_hidden"], "teacher_weight": tensors["teacher_weight"]})
    assert_grad_close(grad, ref["student_hidden"], torch.float32, "hidden gradient")
    with torch.no_grad():
        assert kl_fused.linear_kl_div(h, tensors["student_weight"], teacher_hidden=tensors["teacher_hidden"],
                                      teacher_weight=tensors["teacher_weight"]).grad_fn is None


def test_inputs_are_never_modified(device):
    tensors = make_problem((3, 4), 16, 80, torch.bfloat16, device, seed=15)
    copies = {name: t.clone() for name, t in tensors.items() if t is not None}
    mask = torch.ones(3, 4, dtype=torch.bool, device=device)
    grads_of(kl_fused.linear_kl_div, tensors, mask=mask, student_softcap=3.0, student_logit_scale=2.0,
             teacher_softcap=3.0, chunk_rows=5)
    for name, t in copies.items():
        assert torch.equal(tensors[name], t), name


def test_no_tensor_grows_with_the_rows_times_the_vocabulary(device):
    """Forward and backward of 600 rows in chunks of 32 rows, the teacher as hidden states: no op, at any
    depth, takes a tensor of more than one chunk's logits (the rows x V logits, 20x larger, never exist).
    Every tensor the loss creates is the input of a later op, which the profiler records with its shape."""
    rows, vocab, chunk = 600, 500, 32
    tensors = make_problem((rows,), 16, vocab, torch.float32, device, seed=16)
    leaves = {name: t.clone().requires_grad_() for name, t in tensors.items()}
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) as profile:
        loss = call(kl_fused.linear_kl_div, leaves, chunk_rows=chunk)
        loss.backward()
    sizes = [math.prod(shape) for event in profile.events() for shape in event.input_shapes if shape]
    assert any(size == chunk * vocab for size in sizes), "the profiler saw the chunks' logits"
    assert max(sizes) <= chunk * vocab, f"largest tensor {max(sizes)} elements > one chunk's {chunk * vocab}"


@pytest.mark.parametrize("vocab", [301, 32000, 128256, 256000])
@pytest.mark.parametrize("hidden", [0, 24, 256, 1000, 4096])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_default_chunk_rows_rule(vocab, hidden, dtype):
    """The default chunk: a multiple of 64, at least the device's minimum and its budget's rows; on the
    CPU at least the hidden size (rounded up to 64) unless that would put one logits buffer over the
    cap; on CUDA independent of the hidden size."""
    from kl_fused.linear import CHUNK_BYTES, MAX_CHUNK_BYTES, MIN_CHUNK_ROWS, default_chunk_rows

    row_bytes = vocab * torch.empty((), dtype=dtype).element_size()
    for device in ("cpu", "cuda"):
        rows = default_chunk_rows(vocab, device, dtype, hidden)
        budget_rows = max(MIN_CHUNK_ROWS[device], CHUNK_BYTES[device] // row_bytes // 64 * 64)
        assert rows % 64 == 0 and rows >= budget_rows, (device, rows)
        if rows > budget_rows:
            assert rows * row_bytes <= MAX_CHUNK_BYTES[device] and rows < hidden + 64, (device, rows)
        if device == "cpu" and (hidden + 63) // 64 * 64 * row_bytes <= MAX_CHUNK_BYTES["cpu"]:
            assert rows >= hidden, (rows, hidden)
    assert default_chunk_rows(vocab, "cuda", dtype, hidden) == default_chunk_rows(vocab, "cuda", dtype, 0)
    assert default_chunk_rows(32000, "cpu", torch.float32, 1024) == 1024
    assert default_chunk_rows(32000, "cpu", torch.float32, 256) == 256


def test_autocast_runs_the_matmuls_in_its_dtype(device):
    tensors = make_problem((8,), 32, 200, torch.float32, device, seed=17)
    with torch.autocast(device, dtype=torch.bfloat16):
        loss, grads = grads_of(kl_fused.linear_kl_div, tensors, chunk_rows=3)
        ref_loss, ref_grads = grads_of(kl_fused.reference.linear_kl_div, tensors)
    assert loss.dtype == torch.float32
    assert_close(loss, ref_loss, 1e-4, 1e-5, "loss under autocast")
    for name, grad in grads.items():
        assert grad.dtype == torch.float32
        assert_grad_close(grad, ref_grads[name], torch.bfloat16, f"{name} under autocast")


def test_compile_fullgraph_matches_eager(device):
    torch._dynamo.reset()
    tensors = make_problem((2, 5), 16, 120, torch.float32, device, seed=18)
    mask = torch.tensor([[1, 1, 0, 1, 1], [1, 0, 1, 1, 1]], dtype=torch.bool, device=device)

    def step(h, w):
        return kl_fused.linear_kl_div(h, w, teacher_hidden=tensors["teacher_hidden"], teacher_weight=tensors["teacher_weight"],
                                      mask=mask, chunk_rows=4, student_softcap=5.0) * 1.5

    compiled = torch.compile(step, fullgraph=True)
    h1, w1 = (tensors["student_hidden"].clone().requires_grad_(), tensors["student_weight"].clone().requires_grad_())
    h2, w2 = (tensors["student_hidden"].clone().requires_grad_(), tensors["student_weight"].clone().requires_grad_())
    eager = step(h1, w1)
    eager.backward()
    got = compiled(h2, w2)
    got.backward()
    assert_close(got, eager, 1e-6, 1e-7, "compiled loss")
    assert_grad_close(h2.grad, h1.grad, torch.float32, "compiled hidden grad")
    assert_grad_close(w2.grad, w1.grad, torch.float32, "compiled weight grad")


def test_opcheck(device):
    tensors = make_problem((6,), 8, 40, torch.float32, device, seed=19)
    args = [tensors[name].clone().requires_grad_() if tensors.get(name) is not None else None for name in NAMES]
    args.append(None)  # teacher_logprobs
    mask = torch.tensor([1, 0, 1, 1, 1, 0], dtype=torch.bool, device=device)
    for reduction in ("batchmean", "none"):
        wants = [t is not None and reduction != "none" for t in args]
        torch.library.opcheck(torch.ops.kl_fused.chunked_linear_loss.default,
                              (*args, None, None, mask, None, None, "forward_kl", 0.5, False, 1.3, 1.0, 0.0, -100, 0.0,
                               0.0, True, 1.0, 0.0, 1.0, 2.0, torch.float32, reduction, 4, *wants))


def test_module(device):
    tensors = make_problem((4,), 8, 70, torch.float64, device, seed=20, teacher="logits")
    module = kl_fused.LinearKLDivLoss(temperature=2.0, direction="reverse", chunk_rows=3, student_softcap=4.0)
    got = module(tensors["student_hidden"], tensors["student_weight"], tensors["teacher_logits"],
                 student_bias=tensors["student_bias"])
    expected = kl_fused.reference.linear_kl_div(
        tensors["student_hidden"], tensors["student_weight"], tensors["teacher_logits"], student_bias=tensors["student_bias"],
        temperature=2.0, direction="reverse", student_softcap=4.0)
    assert_close(got, expected, 1e-12, 1e-14, "module")
    assert repr(module) == ("LinearKLDivLoss(temperature=2.0, reduction='batchmean', direction='reverse', chunk_rows=3, "
                            "student_logit_scale=1.0, teacher_logit_scale=1.0, student_softcap=4.0, teacher_softcap=None)")


@pytest.mark.parametrize("options, error, message", [
    (dict(chunk_rows=0), ValueError, "chunk_rows must be at least 1"),
    (dict(chunk_rows=2.5), TypeError, "chunk_rows must be an int"),
    (dict(student_softcap=-1.0), ValueError, "student_softcap must be finite and > 0"),
    (dict(teacher_softcap=float("nan")), ValueError, "teacher_softcap must be finite and > 0"),
    (dict(student_logit_scale=0.0), ValueError, "student_logit_scale must be finite and > 0"),
    (dict(teacher_logit_scale="2"), TypeError, "teacher_logit_scale must be a Python number"),
], ids=str)
def test_module_checks_its_options_when_built(options, error, message):
    with pytest.raises(error, match=message):
        kl_fused.LinearKLDivLoss(**options)


def _bad_calls(device):
    t = make_problem((2, 3), 8, 30, torch.float32, device, seed=21)
    h, w, ht, wt = t["student_hidden"], t["student_weight"], t["teacher_hidden"], t["teacher_weight"]
    logits = torch.randn(2, 3, 30, device=device)
    return [
        (ValueError, r"teacher is missing", lambda: kl_fused.linear_kl_div(h, w)),
        (ValueError, r"teacher is missing", lambda: kl_fused.linear_kl_div(h, w, teacher_hidden=ht)),
        (ValueError, r"not both", lambda: kl_fused.linear_kl_div(h, w, logits, teacher_hidden=ht, teacher_weight=wt)),
        (ValueError, r"student_weight must have shape \(V, H\) with H = .* = 8", lambda: kl_fused.linear_kl_div(h, w[:, :5], logits)),
        (ValueError, r"student_weight must have 2 dimensions", lambda: kl_fused.linear_kl_div(h, w[0], logits)),
        (ValueError, r"vocabularies differ", lambda: kl_fused.linear_kl_div(h, w, teacher_hidden=ht, teacher_weight=wt[:20])),
        (ValueError, r"teacher_logits must have shape \(2, 3, 30\)", lambda: kl_fused.linear_kl_div(h, w, logits[..., :29])),
        (ValueError, r"teacher_hidden must have the student's leading shape", lambda: kl_fused.linear_kl_div(h, w, teacher_hidden=ht[:1], teacher_weight=wt)),
        (ValueError, r"student_bias must have shape \(V,\)", lambda: kl_fused.linear_kl_div(h, w, logits, student_bias=torch.zeros(29, device=device))),
        (ValueError, r"mask must have the leading shape \(2, 3\) of the hidden states", lambda: kl_fused.linear_kl_div(h, w, logits, mask=torch.ones(3, 2, dtype=torch.bool, device=device))),
        (TypeError, r"mask must be a bool tensor", lambda: kl_fused.linear_kl_div(h, w, logits, mask=torch.ones(2, 3, device=device))),
        (TypeError, r"student_hidden must be a float32", lambda: kl_fused.linear_kl_div(h.long(), w, logits)),
        (TypeError, r"student_hidden must be a torch.Tensor", lambda: kl_fused.linear_kl_div([1.0], w, logits)),
        (TypeError, r"share one dtype", lambda: kl_fused.linear_kl_div(h.double(), w, logits)),
        (TypeError, r"share one dtype", lambda: kl_fused.linear_kl_div(h, w, teacher_hidden=ht.double(), teacher_weight=wt.double())),
        (TypeError, r"teacher_logits must have the dtype", lambda: kl_fused.linear_kl_div(h, w, logits.double())),
        (ValueError, r"chunk_rows must be at least 1", lambda: kl_fused.linear_kl_div(h, w, logits, chunk_rows=0)),
        (TypeError, r"chunk_rows must be an int", lambda: kl_fused.linear_kl_div(h, w, logits, chunk_rows=2.0)),
        (ValueError, r"temperature must be finite and > 0", lambda: kl_fused.linear_kl_div(h, w, logits, temperature=0.0)),
        (ValueError, r"reduction must be one of", lambda: kl_fused.linear_kl_div(h, w, logits, reduction="avg")),
        (ValueError, r"direction must be one of", lambda: kl_fused.linear_kl_div(h, w, logits, direction="both")),
        (ValueError, r"student_softcap must be finite and > 0", lambda: kl_fused.linear_kl_div(h, w, logits, student_softcap=-1.0)),
        (ValueError, r"teacher_logit_scale must be finite and > 0", lambda: kl_fused.linear_kl_div(h, w, logits, teacher_logit_scale=math.inf)),
    ]


def test_bad_input_raises_a_clear_error(device):
    for error, pattern, bad_call in _bad_calls(device):
        with pytest.raises(error, match=pattern):
            bad_call()
