"""The SIMT emulator itself (tests/simt), on its probe kernels (tests/simt/probe_kernels.cpp): that
correct kernels compute what they should, and that each bug the sanitizer looks for is reported,
naming the kernel, block, thread and offset. Besides the checks of every launch (bounds, alignment,
uninitialised shared memory, barriers, shuffles, launch limits): races through shared and global
memory, within a block and between blocks, with atomics as a kind of access of their own; outputs
that no kernel wrote; undefined behaviour of integer arithmetic and indexing; one barrier line
reached from two call sites; the schedules (the order of blocks and threads, and interleaving
between synchronisation points), under which every call's outputs must hold the same bits; and the
build whose kernels contract a*b + c into fused multiply-adds (SIMT_FMA=1), as nvcc's do.
"""

import math

import pytest
import torch

from conftest import assert_close, make_logits
from simt.emulator import DEFAULT_LIMITS, Emulator

NEG_INF = float("-inf")


@pytest.fixture(scope="module")
def emu():
    return Emulator()


def test_probe_kernel_computes_block_sums_and_warp_prefix_sums(emu):
    data = torch.randn(3, 96, generator=torch.Generator().manual_seed(1))
    out, launches = emu.probe("block_sum", data)
    assert launches[0].kernel == "probe_block_sum" and launches[0].grid == 3 and launches[0].block == 96
    torch.testing.assert_close(out[:3], data.sum(1), rtol=1e-6, atol=1e-5)
    prefix = data.view(3, 3, 32).cumsum(-1).view(3, 96)
    torch.testing.assert_close(out[3:].view(3, 96), prefix, rtol=1e-6, atol=1e-5)


SANITIZER_PROBES = {
    "shared_out_of_bounds": r"out-of-bounds shared-memory write of 4 bytes at offset 124 \(the launch has 124 bytes"
                            r".* in kernel probe_shared_out_of_bounds, block \(0,0,0\), thread \(31,0,0\)",
    "global_read_out_of_bounds": r"out-of-bounds global read of 4 bytes at address 0x[0-9a-f]+, 0 bytes past the end of "
                                 r"input 0 .* in kernel probe_global_read_out_of_bounds, block \(0,0,0\), thread \(31,0,0\)",
    "global_write_out_of_bounds": r"out-of-bounds global write of 4 bytes.*thread \(31,0,0\)",
    "misaligned_vector_load": r"misaligned 16-byte __ldg .*\(4 bytes past a 16-byte boundary\) in kernel "
                              r"probe_misaligned_vector_load, block \(0,0,0\), thread \(0,0,0\)",
    "misaligned_shared": r"misaligned 16-byte access to 'struct float4' .*\(4 bytes past a 16-byte boundary\) at "
                         r"probe_kernels.cpp:\d+ in kernel probe_misaligned_shared, block \(0,0,0\), thread \(0,0,0\)",
    "divergent_barrier": r"divergent __syncthreads: thread \(0,0,0\) waits at probe_kernels.cpp:\d+, thread \(16,0,0\) "
                         r"at probe_kernels.cpp:\d+ in kernel probe_divergent_barrier",
    "exit_before_barrier": r"thread \(3,0,0\) exited while other threads of its block wait at __syncthreads",
    "race_read_after_write": r"shared-memory race at offset 0: written by thread \(0,0,0\) and read by this thread "
                             r".*\(read after write\) .*thread \(1,0,0\)",
    "race_write_after_read": r"shared-memory race at offset 4: read by thread \(0,0,0\) and written by this thread "
                             r".*\(write after read\).*thread \(1,0,0\)",
    "race_write_after_write": r"shared-memory race at offset 0: written by thread \(0,0,0\) and written by this thread"
                              r".*\(write after write\).*thread \(1,0,0\)",
    "uninitialised_shared": r"read of uninitialised shared memory at offset 128 .*thread \(31,0,0\)",
    "shuffle_after_exit": r"lane 16 exited while its warp waits at __shfl_xor_sync",
    "too_many_threads": r"CUDA error: invalid configuration argument .*block of 2048x1x1 threads",
    "shared_above_default_without_opt_in": r"CUDA error: invalid argument .*49168 bytes of dynamic shared memory, "
                                           r"above the 49152 a kernel may use without cudaFuncSetAttribute",
    "shared_above_opt_in": r"CUDA error: invalid argument .*65552 bytes .* above the 65536 the kernel opted in to",
    "opt_in_above_device_limit": r"CUDA error: invalid argument .*above the device's opt-in limit of 232448 bytes",
    "grid_above_device_limit": r"CUDA error: invalid configuration argument .*grid of 2147483648x1x1",
    # global memory: the race rule within a block and across the blocks of a launch
    "global_write_write": r"global-memory race at byte 0 of a tensor allocated by the call \(\d+ bytes\): written by "
                          r"thread \(0,0,0\) and written by this thread with no __syncthreads between \(write after "
                          r"write\) in kernel probe_global_write_write, block \(0,0,0\), thread \(1,0,0\)",
    "global_read_after_write": r"global-memory race at byte 0 of .*: written by thread \(0,0,0\) and read by this "
                               r"thread .*\(read after write\) .*thread \(1,0,0\)",
    "global_race_between_blocks": r"global-memory race at byte 0 of .*: written by block \(0,0,0\) \(thread \(0,0,0\)\) "
                                  r"and written by this thread of another block of the same launch .*\(write after "
                                  r"write\) in kernel probe_global_race_between_blocks, block \(1,0,0\), thread \(0,0,0\)",
    "global_read_of_another_block": r"global-memory race at byte 4 of .*: read by block \(0,0,0\) and written by this "
                                    r"thread of another block .*\(write after read\) .*block \(1,0,0\), thread \(0,0,0\)",
    # atomics: a third kind of access, racing with the plain accesses of other threads
    "atomic_then_plain_read": r"shared-memory race at offset 0: read by thread \(0,0,0\) and accessed atomically by "
                              r"this thread with no __syncthreads between \(atomic after read\) .*thread \(1,0,0\)",
    "plain_write_then_atomic": r"shared-memory race at offset 0: written by thread \(0,0,0\) and accessed atomically "
                               r"by this thread .*\(atomic after write\) .*thread \(1,0,0\)",
    # outputs no kernel wrote, undefined behaviour, one barrier line reached from two call sites
    "output_left_unwritten": r"simt: output 0 \(Float \[32\]\) has 16 elements that no kernel wrote, the first at "
                             r"flat index 1: they still hold the NaN pattern of fresh memory",
    "signed_overflow": r"signed integer overflow: (2147483647 \+ 1|1 \+ 2147483647) cannot be represented in type 'int' at "
                       r"probe_kernels.cpp:\d+ in kernel probe_signed_overflow, block \(0,0,0\), thread \(1,0,0\)",
    "shift_out_of_bounds": r"shift out of bounds: 1 of type 'unsigned int' shifted by 32 bits at probe_kernels.cpp:\d+ "
                           r".*thread \(1,0,0\)",
    "index_out_of_bounds": r"index 4 out of bounds for type 'float \[4\]' at probe_kernels.cpp:\d+ .*thread \(4,0,0\)",
    "barrier_call_sites": r"divergent __syncthreads: thread \(0,0,0\) and thread \(16,0,0\) wait at "
                          r"probe_kernels.cpp:\d+ reached through different call sites",
}
TWO_BLOCKS = {"global_race_between_blocks", "global_read_of_another_block"}


@pytest.mark.parametrize("probe", sorted(SANITIZER_PROBES))
def test_sanitizer_reports_each_bug_with_kernel_block_thread_and_offset(emu, probe):
    """Under the forward schedule, so that the first thread to meet the bug is a known one."""
    data = torch.randn(2 if probe in TWO_BLOCKS else 1, 32, generator=torch.Generator().manual_seed(2))
    with emu.schedule("forward"), pytest.raises(RuntimeError, match=SANITIZER_PROBES[probe]):
        emu.probe(probe, data)


@pytest.mark.parametrize("schedule", ["reverse", "random:3", "random:4"])
@pytest.mark.parametrize("probe", sorted(p for p in SANITIZER_PROBES if "race" in p or "atomic" in p))
def test_every_schedule_finds_the_races(emu, probe, schedule):
    """The race rule does not depend on which thread (block) comes first."""
    data = torch.randn(2 if probe in TWO_BLOCKS else 1, 32, generator=torch.Generator().manual_seed(2))
    with emu.schedule(schedule), pytest.raises(RuntimeError, match=r"simt: (shared|global)-memory race at (offset|byte) "):
        emu.probe(probe, data)


def test_a_launch_may_use_the_opt_in_maximum_once_opted_in(emu):
    out, launches = emu.probe("opted_in_large_shared", torch.ones(1, 64))
    assert launches[0].shared == DEFAULT_LIMITS["max_shared_optin"]
    assert torch.equal(out[:64], torch.ones(64))


def test_a_launch_outside_a_call_may_touch_no_global_memory(emu):
    student, teacher = make_logits((2, 64), torch.float32, "cpu", seed=3)
    with pytest.raises(RuntimeError, match=r"out-of-bounds global read .*(not given to this launch's call|every tensor given to the launch)"):
        torch.ops.kl_fused_emulated.kl_div_logits(student, teacher, None, 1.0, False, "sum", False, False)


def test_the_emulator_leaves_the_process_cpu_allocator_usable(emu):
    """Its allocator wrapper serves the whole process: oneDNN's bf16 matmul allocates scratch through
    raw_allocate/raw_deallocate, which once aborted the process after the emulator was loaded."""
    a = torch.randn(64, 96, generator=torch.Generator().manual_seed(5)).bfloat16()
    b = torch.randn(96, 80, generator=torch.Generator().manual_seed(6)).bfloat16()
    assert_close(torch.nn.functional.linear(a, b.t()), a.double() @ b.double(), 2**-7, 1e-2, "bf16 matmul")


def test_ex2_approx_has_the_documented_semantics_and_error(emu):
    gen = torch.Generator().manual_seed(4)
    x = torch.cat([torch.empty(20000).uniform_(-140.0, 130.0, generator=gen), torch.empty(20000).uniform_(-1, 1, generator=gen)])
    got = torch.ops.simt.ex2_approx_ftz(x)
    exact = torch.exp2(x.double())
    normal = (exact >= 2.0**-126) & (exact < 2.0**128)
    ulp = torch.ldexp(torch.ones_like(exact), torch.frexp(exact)[1] - 24)  # float32 ulp at the result
    error_ulps = ((got.double() - exact).abs() / ulp)[normal]
    assert error_ulps.max() <= 2.5, "within 2 ulp of the correctly rounded value"
    assert (error_ulps > 1.0).float().mean() > 0.2, "the emulator errs as much as the hardware may, not less"
    assert (got[exact < 2.0**-126] == 0).all(), "results below the normal range flush to zero"
    specials = torch.tensor([NEG_INF, float("inf"), float("nan"), 1e-40, -1e-40])
    out = torch.ops.simt.ex2_approx_ftz(specials)
    assert out[0] == 0 and out[1] == math.inf and math.isnan(out[2])
    assert torch.equal(out[3:], torch.ops.simt.ex2_approx_ftz(torch.zeros(2))), "subnormal inputs flush to zero"
    assert torch.equal(got, torch.ops.simt.ex2_approx_ftz(x)), "deterministic"


# ------------------------------------------------------------------------------------- correct probes


def test_global_memory_ordered_by_a_barrier_and_inputs_read_by_every_thread_are_no_race(emu):
    data = torch.randn(3, 32, generator=torch.Generator().manual_seed(7))
    out, launches = emu.probe("global_ordered_by_barrier", data)
    assert launches[0].grid == 3
    first = data[0, 0] + torch.arange(3.0)
    assert torch.equal(out[0:6:2], first) and torch.equal(out[1:6:2], 2 * first)


def test_atomics_of_every_thread_on_one_word_are_no_race(emu):
    out, _ = emu.probe("atomics_without_race", torch.randn(1, 64, generator=torch.Generator().manual_seed(8)))
    assert torch.equal(out[:64], torch.ones(64)), "every bit set, read after the barrier"


# ------------------------------------------------------------------------------------- schedules


def _execution_order(emu, schedule, blocks=3, threads=32):
    with emu.schedule(schedule):
        out, _ = emu.probe("execution_order", torch.ones(blocks, 4 * threads + 1))
    return out[1 : 1 + blocks].long(), out[1 + blocks : 1 + blocks + 4 * blocks * threads].view(blocks, threads, 4).long()


def test_schedules_order_blocks_and_threads_and_interleave_between_barriers(emu):
    blocks, tickets = _execution_order(emu, "forward")
    assert blocks.tolist() == [0, 1, 2]
    assert torch.equal(tickets[1], torch.arange(128).view(32, 4)), "each thread runs to its next barrier"
    blocks, tickets = _execution_order(emu, "reverse")
    assert blocks.tolist() == [2, 1, 0]
    assert torch.equal(tickets[0], torch.arange(128).view(32, 4).flip(0))
    blocks, tickets = _execution_order(emu, "random:5")
    assert sorted(blocks.tolist()) == [0, 1, 2] and torch.equal(tickets[2].flatten().sort().values, torch.arange(128))
    consecutive = (tickets.diff(dim=-1) == 1).all(dim=-1)
    assert not consecutive.all(), "threads preempted between barriers: their accesses interleave"
    again = _execution_order(emu, "random:5")
    assert torch.equal(again[1], tickets), "a seed gives the same schedule every time"
    assert not torch.equal(_execution_order(emu, "random:6")[1], tickets), "another seed another"


def test_outputs_that_depend_on_the_schedule_are_caught(emu):
    """Every call runs under each schedule (emulator.py); a kernel whose outputs differ fails."""
    with emu.schedule("forward", "random:5"), pytest.raises(AssertionError, match=r"probe execution_order: output 0 "
                                                             r"differs between schedules \('forward', 0\) and "
                                                             r"\('random', 5\)"):
        emu.probe("execution_order", torch.ones(2, 4 * 32 + 1))


# ------------------------------------------------------------------------------------- contraction (FMA)


def _threads_apart(out, blocks, threads, words, group):
    """Groups of `group` consecutive threads (a warp, a block) whose results do not all hold the
    bits of the group's first thread."""
    results = out[: blocks * threads * words].view(-1, group, words).view(torch.int32)
    return int((results != results[:, :1]).any(dim=-1).any(dim=-1).sum())


def test_the_fma_build_contracts_so_the_lanes_of_a_bare_butterfly_part(emu):
    """warp_reduce alone, with a combine that contraction makes order-dependent, leaves each lane
    its own rounding in the fma build (else that build would test nothing the plain one does not),
    and bit-identical lanes in the plain one."""
    data = 3 * torch.randn(6, 2 * 1024, generator=torch.Generator().manual_seed(10))
    out, _ = emu.probe("warp_products", data)
    apart = _threads_apart(out, 6, 1024, 2, 32)
    if emu.mode == "fma":
        assert apart > 0, "the fma build left every warp's lanes identical: is a*b + c contracted?"
    else:
        assert apart == 0, "without contraction the combine is commutative, and the lanes agree"


@pytest.mark.parametrize("probe, words", [("block_products", 2), ("block_merge", 5)])
def test_block_reductions_give_every_thread_the_same_bits(emu, probe, words):
    """Branches after a block reduction must be block-uniform: block_reduce hands every thread lane
    0's result, so that the threads agree even where contraction makes combine(a, b) and
    combine(b, a) round differently (the first probe's combine does in the fma build)."""
    data = 3 * torch.randn(6, words * 1024, generator=torch.Generator().manual_seed(9))
    out, _ = emu.probe(probe, data)
    assert _threads_apart(out, 6, 1024, words, 1024) == 0, f"threads of a block disagree ({emu.mode} build)"


# ------------------------------------------------------------------------------------- fresh memory


def test_memory_allocated_during_a_call_starts_as_nan(emu):
    """What no kernel writes is NaN, never the plausible zero of a fresh page (here read outside the
    emulated call, where check_outputs would have refused it)."""
    torch.ops.simt.begin_call([])
    try:
        fresh = torch.empty(1000)
    finally:
        torch.ops.simt.end_call()
    assert fresh.isnan().all()


# ---- thread-block clusters: blocks that run together, a cluster barrier, distributed shared memory

@pytest.mark.parametrize("probe, cluster", [("cluster_sum", 2), ("cluster_sum_of_4", 4)])
def test_blocks_of_a_cluster_read_each_others_shared_memory(emu, probe, cluster):
    data = torch.randn(8, 64, generator=torch.Generator().manual_seed(11))
    out, launches = emu.probe(probe, data)
    assert launches == [launches[0]] and launches[0].cluster == cluster and launches[0].grid == 8
    sums = data.double().sum(1).view(-1, cluster)
    weighted = (sums * torch.arange(1, cluster + 1, dtype=torch.float64)).sum(1)
    torch.testing.assert_close(out[:8].double(), weighted.repeat_interleave(cluster), rtol=1e-5, atol=1e-4)
    assert out[8:16].tolist() == [float(r % cluster) for r in range(8)]


def test_a_cluster_launch_counts_its_cluster_barriers(emu):
    data = torch.randn(4, 32, generator=torch.Generator().manual_seed(12))
    _, traffic = emu.probe_traffic("cluster_sum", data)
    assert [t.cluster for t in traffic] == [2]
    assert traffic[0].cluster_barriers == 2 * 2  # two per cluster, two clusters
    assert traffic[0].barriers == 4              # block_sum_to_shared's __syncthreads, once per block


CLUSTER_PROBES = {
    "cluster_block_barrier_only": r"distributed shared-memory race at offset 128 of block rank 1: written by block "
                                  r"\(1,0,0\) \(rank 1 of the cluster\) and read by this thread of another block of the "
                                  r"cluster with no cluster barrier between \(read after write\) in kernel "
                                  r"probe_cluster_block_barrier_only, block \(0,0,0\), thread \(0,0,0\)",
    "cluster_slot_reused": r"distributed shared-memory race at offset 0 of block rank 0: written by block \(0,0,0\) "
                           r"\(rank 0 of the cluster\) and read by this thread of another block .*\(read after write\)",
    "cluster_exit_before_peer_reads": r"distributed shared-memory read of block rank 0, whose threads have all exited",
    "cluster_rank_out_of_range": r"map_shared_rank to block rank 2 of a cluster of 2 blocks in kernel "
                                 r"probe_cluster_rank_out_of_range, block \(0,0,0\), thread \(0,0,0\)",
    "cluster_shared_out_of_bounds": r"out-of-bounds distributed shared-memory read of 4 bytes at offset 128 of the "
                                    r"shared memory of block rank 1 \(the launch has 128 bytes of dynamic shared memory\)"
                                    r" in kernel probe_cluster_shared_out_of_bounds, block \(0,0,0\), thread \(31,0,0\)",
    "cluster_divergent_barrier": r"divergent cluster barriers: thread \(0,0,0\) of block \(0,0,0\) waits at "
                                 r"probe_kernels.cpp:\d+, thread \(0,0,0\) of block \(1,0,0\) at probe_kernels.cpp:\d+",
    "cluster_barrier_beside_block_barrier": r"divergent barriers: thread \(0,0,0\) waits at __syncthreads "
                                            r"\(probe_kernels.cpp:\d+\), thread \(5,0,0\) of the same block at the "
                                            r"cluster barrier",
    "cluster_not_dividing_grid": r"CUDA error: invalid argument .*clusters of 2 blocks over a grid of 3x1x1",
    "cluster_above_portable_limit": r"CUDA error: cluster misconfiguration .*clusters of 16 blocks",
}


@pytest.mark.parametrize("probe", sorted(CLUSTER_PROBES))
def test_sanitizer_reports_each_cluster_bug(emu, probe):
    data = torch.randn(4, 32, generator=torch.Generator().manual_seed(2))
    with emu.schedule("forward"), pytest.raises(RuntimeError, match=CLUSTER_PROBES[probe]):
        emu.probe(probe, data)


@pytest.mark.parametrize("schedule", ["reverse", "random:3", "random:4"])
@pytest.mark.parametrize("probe", ["cluster_block_barrier_only", "cluster_slot_reused", "cluster_exit_before_peer_reads"])
def test_every_schedule_finds_the_cluster_bugs(emu, probe, schedule):
    """Whichever block runs first: a read before the peer's write is uninitialised memory, after it a
    race; a peer that exits before the read, or after it with no cluster barrier, is reported either way."""
    data = torch.randn(4, 32, generator=torch.Generator().manual_seed(2))
    with emu.schedule(schedule), pytest.raises(
            RuntimeError, match=r"simt: (distributed shared-memory race|read of uninitialised distributed shared memory"
                                r"|distributed shared-memory read of block rank \d, whose threads have all exited"
                                r"|block rank \d of the cluster exits while another block may still access)"):
        emu.probe(probe, data)
