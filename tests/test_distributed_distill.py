"""kl_fused.distributed's distillation step on vocabulary shards (distillation_loss_vocab_parallel,
linear_distillation_loss_vocab_parallel) across 2, 3 and 4 spawned gloo processes, against the
single-process distillation_loss and linear_distillation_loss; the cases are in
vocab_parallel_distill_workers.py, many per process-group launch."""

import pytest

from test_distributed import _spawn


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_distillation_loss_vocab_parallel_matches_single_process(world_size):
    _spawn(world_size, "vocab_parallel_distill_workers:logits_cases")


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_linear_distillation_loss_vocab_parallel_matches_single_process(world_size):
    _spawn(world_size, "vocab_parallel_distill_workers:linear_cases")


@pytest.mark.parametrize("world_size", [2, 3])
def test_sub_group_and_calls_that_raise_on_every_rank(world_size):
    _spawn(world_size, "vocab_parallel_distill_workers:sub_group_and_errors")
