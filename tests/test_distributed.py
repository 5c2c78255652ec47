"""kl_fused.distributed: the shard kernels against their plain-PyTorch definition, opcheck, and the
vocab-parallel loss across 2, 3 and 4 spawned gloo processes against the single-process loss."""

import os
import tempfile
import time

import pytest
import torch
import torch.multiprocessing as mp

from conftest import TOLERANCES, assert_close, assert_grad_close, make_logits
from kl_fused import _shard_math

import vocab_parallel_workers

SPAWN_TIMEOUT_S = 240


def _spawn(world_size, scenario):
    """Runs the scenario on world_size gloo ranks; fails (never hangs) past SPAWN_TIMEOUT_S."""
    with tempfile.TemporaryDirectory() as tmp:
        init_file = os.path.join(tmp, "rendezvous")
        context = mp.start_processes(
            vocab_parallel_workers.run, args=(world_size, init_file, scenario), nprocs=world_size,
            join=False, start_method="spawn",
        )
        deadline = time.monotonic() + SPAWN_TIMEOUT_S
        while not context.join(timeout=max(deadline - time.monotonic(), 0.1)):
            if time.monotonic() > deadline:
                for process in context.processes:
                    process.kill()
                pytest.fail(f"{scenario} on {world_size} ranks did not finish in {SPAWN_TIMEOUT_S} s (a hang)")


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_vocab_parallel_matches_full_rows(world_size):
    _spawn(world_size, "compare_with_full_rows")


@pytest.mark.parametrize("world_size", [2, 3])
def test_vocab_parallel_edge_rows(world_size):
    _spawn(world_size, "edge_rows")


def test_data_parallel_normalisation_recipe():
    _spawn(4, "data_parallel_batchmean")


def test_vocab_parallel_sub_group():
    _spawn(3, "sub_group")


@pytest.mark.parametrize("world_size", [2, 4])
def test_bad_calls_raise_on_every_rank(world_size):
    _spawn(world_size, "bad_calls_raise_everywhere")


def _shards(dtype, seed, width=1300):
    student, teacher = make_logits((7, width), dtype, "cpu", seed=seed)
    teacher[1] = float("-inf")                      # an all -inf side: the empty partial state
    student[2, 5] = float("nan")                    # an undefined row
    teacher[3, 1100:] = float("-inf")               # -inf on part of the shard
    mask = torch.tensor([True, True, True, True, False, True, True])
    student[4] = float("nan")                       # masked: never read
    return student, teacher, mask


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("reverse", [False, True])
def test_shard_states_kernel_matches_its_definition(dtype, reverse):
    student, teacher, mask = _shards(dtype, seed=61)
    fused = torch.ops.kl_fused.kl_row_states(student, teacher, mask, 1.5, reverse)
    expected = _shard_math.shard_states_torch(student, teacher, mask, 1.5, reverse)
    tol = TOLERANCES[dtype]
    assert_close(fused, expected, tol["loss_rtol"], tol["loss_atol"], "partial states")
    assert fused[4].tolist() == [float("-inf"), float("-inf"), 0.0, 0.0, 0.0], "masked row: empty state"
    assert fused[2, 2:].isnan().all() and fused[1, 0] == float("-inf") and fused[1, 2] == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("reverse", [False, True])
def test_shard_gradient_kernel_matches_its_definition(dtype, reverse):
    student, teacher, mask = _shards(dtype, seed=62)
    acc = _shard_math.acc_dtype(dtype)
    states = _shard_math.shard_states_torch(student, teacher, mask, 0.8, reverse).to(acc)
    # A single shard is its own full row: its maxima are the row's.
    maxima = states[:, :2].contiguous()
    _, stats = _shard_math.finish_rows(maxima, _shard_math.rescaled_sums(states, maxima, reverse, 0.8), mask, reverse)
    factor = torch.linspace(-1.0, 2.0, 7, dtype=acc)
    args = (student, teacher, mask, stats.contiguous(), factor, 0.8, reverse, True, True)
    fused = torch.ops.kl_fused.kl_grad_from_stats(*args)
    expected = _shard_math.shard_grads_torch(*args)
    for got, want, name in zip(fused, expected, ("student", "teacher")):
        assert_grad_close(got[[0, 3, 5, 6]], want[[0, 3, 5, 6]], dtype, f"{name} gradient")
        assert got[2].float().isnan().all() and got[1].float().isnan().all(), "undefined rows: NaN gradient"
        assert (got[4] == 0).all(), "masked row: zero gradient"


def test_opcheck_shard_ops():
    student, teacher = make_logits((2, 3, 41), torch.float32, "cpu", seed=63)
    mask = torch.tensor([[True, False, True], [True, True, True]])
    for reverse in (False, True):
        torch.library.opcheck(torch.ops.kl_fused.kl_row_states.default, (student, teacher, mask, 1.3, reverse))
        stats = torch.randn(6, 5).abs()
        torch.library.opcheck(
            torch.ops.kl_fused.kl_grad_from_stats.default,
            (student, teacher, mask, stats, torch.rand(6), 1.3, reverse, True, reverse),
        )


def test_shard_gradient_rejects_bad_stats():
    student, teacher = make_logits((4, 30), torch.float32, "cpu", seed=64)
    ok_stats, ok_factor = torch.zeros(4, 5), torch.ones(4)
    op = torch.ops.kl_fused.kl_grad_from_stats
    with pytest.raises(ValueError, match=r"stats must be a contiguous \(rows, 5\)"):
        op(student, teacher, None, torch.zeros(4, 4), ok_factor, 1.0, False, True, False)
    with pytest.raises(ValueError, match=r"row_factor must be a contiguous \(rows,\)"):
        op(student, teacher, None, ok_stats, torch.ones(3), 1.0, False, True, False)
    with pytest.raises(TypeError, match="stats and row_factor must be Float"):
        op(student, teacher, None, ok_stats.double(), ok_factor, 1.0, False, True, False)


def test_vocab_parallel_needs_an_initialised_process_group():
    from kl_fused.distributed import kl_div_logits_vocab_parallel

    student, teacher = make_logits((2, 10), torch.float32, "cpu", seed=65)
    with pytest.raises(RuntimeError, match="init_process_group"):
        kl_div_logits_vocab_parallel(student, teacher)


def test_devices_without_shard_kernels_run_the_same_math_in_pytorch_and_say_so(monkeypatch, tmp_path):
    import warnings

    import torch.distributed as dist

    import kl_fused
    from kl_fused import _warn_once
    from kl_fused.distributed import kl_div_logits_vocab_parallel

    monkeypatch.setattr(_shard_math, "has_fused_shard_kernels", lambda device: False)
    _warn_once.forget(("vocab_parallel", "cpu"))
    student, teacher = make_logits((3, 4, 300), torch.float32, "cpu", seed=66)
    student.requires_grad_()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loss = kl_div_logits_vocab_parallel(student, teacher, direction="reverse", temperature=1.5)
            kl_div_logits_vocab_parallel(student, teacher)
        (grad,) = torch.autograd.grad(loss, student)
    finally:
        dist.destroy_process_group()
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "plain PyTorch" in messages[0]
    expected = kl_fused.kl_div_logits(student, teacher, direction="reverse", temperature=1.5)
    (expected_grad,) = torch.autograd.grad(expected, student)
    assert_close(loss, expected, 2e-5, 2e-6, "loss")
    assert_grad_close(grad, expected_grad, torch.float32, "gradient")
