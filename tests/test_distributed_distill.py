"""kl_fused.distributed's distillation step on vocabulary shards (distillation_loss_vocab_parallel,
linear_distillation_loss_vocab_parallel) across 2, 3 and 4 spawned gloo processes, against the
single-process distillation_loss and linear_distillation_loss: every divergence and teacher form,
labels owned by each rank, masks, reductions, both hidden_grad modes, values and every gradient; on
3 ranks also a sub-group and the calls that must raise on every rank (masks of equal count in other
rows, create_graph=True, bad labels, a rank's own bad argument). The cases are in
vocab_parallel_distill_workers.py, all of them in one process-group launch per world size."""

import pytest

from test_distributed import _spawn


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_vocab_parallel_distillation_matches_single_process(world_size):
    _spawn(world_size, "vocab_parallel_distill_workers:every_case")
