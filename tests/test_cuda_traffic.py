"""Memory-traffic budgets of the CUDA kernels, counted by the SIMT emulator: every global byte each
launch loads and stores, per tensor, against the byte formula each kernel documents (the design
notes' budget), launches per call, MUFU calls, and the L2 model's verdict on re-reads. A change
that adds a pass over rows x V, or re-reads what the row cache holds, fails here.

The counters themselves are tested first, on a probe kernel with known traffic.
"""

import pytest
import torch

import kl_fused
from cuda_traffic import SCENARIOS, count, distillation, hard_labels, logits, sparse_support
from host_syncs import HostSyncs
from simt.emulator import Emulator

e_of = {torch.bfloat16: 2, torch.float32: 4}
SCENARIO = {sc.name: sc for sc in SCENARIOS}


@pytest.fixture(scope="module")
def emu():
    return Emulator()


# ------------------------------------------------------------------------------------- the counters


def _lines(t, begin, end):
    """128-byte lines holding bytes [begin, end) of tensor t's data."""
    base = t.data_ptr()
    return (base + end - 1) // 128 - (base + begin) // 128 + 1


def test_counters_of_a_probe_kernel_with_known_traffic(emu):
    blocks, threads = 3, 64
    data = torch.linspace(-2.0, 2.0, blocks * threads).view(blocks, threads)
    out, launches = emu.probe_traffic("traffic", data)
    assert [t.name for t in launches] == ["probe_traffic"]
    t = launches[0]
    n = blocks * threads
    assert t.grid == blocks and t.block == threads
    assert t.of("input 0").loaded == 8 * n and t.of("input 0").distinct_loaded == 4 * n
    assert t.of("input 0").stored == 0
    assert t.of("output 0").stored == 4 * n and t.of("output 0").distinct_stored == 4 * n
    assert t.of("output 0").loaded == 0
    assert t.shared_stored == 4 * n and t.shared_loaded == 4 * n
    assert t.barriers == blocks and t.ex2 == n and t.lg2 == n
    assert t.reread_bytes == 4 * n
    # The whole share: every re-read hits; device reads are the first touch of each line.
    assert t.reread_dram_bytes == 0 and t.reread_hit_rate == 1.0
    assert t.dram_read_bytes == 128 * sum(_lines(data, 4 * threads * b, 4 * threads * (b + 1)) for b in range(blocks))
    # One line per block: the re-read pass finds none of its lines.
    _, (tiny,) = emu.probe_traffic("traffic", data, l2_bytes=128, resident_blocks=1)
    assert tiny.l2_share_bytes == 128
    assert tiny.reread_hit_rate == 0.0 and tiny.reread_dram_bytes >= tiny.reread_bytes
    # The share follows the resident blocks: 50 MB over min(grid, SMs) by default.
    assert t.l2_share_bytes == 50 * 10**6 // blocks


# ------------------------------------------------------------------------------------- budgets

ROWS, VOCAB = 3, 1024  # the whole row fits the shared-memory cache


def _other(t, *names):
    """Bytes the launch moved outside the named tensors (row losses, factors, row statistics)."""
    return sum(x.loaded + x.stored for x in t.tensors if x.name not in names)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("grads", ["none", "student", "both"])
def test_kl_reads_each_input_once_and_writes_each_gradient_once(emu, dtype, grads):
    e, E = e_of[dtype], ROWS * VOCAB
    need_s, need_t = grads in ("student", "both"), grads == "both"
    s, t = logits(ROWS, VOCAB, dtype)
    _, launches = emu.traffic("kl_div_logits", s, t, None, 1.0, False, "sum", need_s, need_t)
    (k,) = launches
    assert k.name == "kl_rows_kernel"
    for name in ("input 0", "input 1"):
        assert k.of(name).loaded == k.of(name).distinct_loaded == E * e, f"{name} read more than once"
    assert k.of("output 1").stored == (E * e if need_s else 0)
    assert k.of("output 2").stored == (E * e if need_t else 0)
    assert k.reread_bytes <= 8 * k.block * k.grid, "only per-thread scalars (the factor) are read twice"
    assert _other(k, "input 0", "input 1", "output 1", "output 2") <= 16 * ROWS + 8 * k.block * k.grid
    documented = {"none": 2, "student": 3, "both": 4}[grads]
    logits_bytes = k.of("input 0").loaded + k.of("input 1").loaded + k.of("output 1").stored + k.of("output 2").stored
    assert logits_bytes == documented * e * E
    # Two exponentials per element per pass (statistics, then the gradient), and the online
    # rescales of the running sums when a maximum moves (at most two more per element).
    passes = 2 if need_s or need_t else 1
    assert 2 * passes <= count(launches, E).ex2 <= 2 * passes + 2


def test_partial_row_cache_rereads_only_the_tail_most_recently_read_first(emu):
    """A row wider than the cache: a later pass reads the uncached tail again (once per pass) and
    nothing else. JSD's second pass, whose loads are not evict-first, reads it in the order opposite
    to the pass before (most recently read first), and then keeps what a share of L2 smaller than
    the tail still holds (in the model: 70% of re-reads served; in the first pass's order, 38%).
    KL's single re-read pass is evict-first, which protects the lines it has not reached yet in
    either order. (The one-block kernels, as on a device without clusters: sm_80.)"""
    dtype, e, vocab = torch.bfloat16, 2, 4096
    s, t = logits(ROWS, vocab, dtype)
    with emu.limits(max_shared_optin=4 * 1024 + 512, cluster_launch=False):
        _, (k,) = emu.traffic("kl_div_logits", s, t, None, 1.0, False, "sum", True, False)
        scratch = (k.block // 32 * 20 + 15) // 16 * 16  # per-warp row states: 5 floats each
        tail = vocab * e - (k.shared - scratch) // 2
        assert 0 < tail < vocab * e
        for name in ("input 0", "input 1"):
            assert k.of(name).distinct_loaded == ROWS * vocab * e
            assert k.of(name).loaded == ROWS * (vocab * e + tail), f"{name}: more than the tail re-read"
        assert k.of("output 1").stored == ROWS * vocab * e
        assert k.reread_hit_rate == 1.0, "a share larger than the tail serves every re-read"
        _, (jsd,) = emu.traffic("jsd_logits", s, t, None, 0.5, 1.0, "sum", True, False)
        reread = jsd.of("input 0").loaded - jsd.of("input 0").distinct_loaded
        jsd_tail = reread // (2 * ROWS)  # JSD's scratch is a little larger: its tail a little longer
        assert reread == 2 * ROWS * jsd_tail and 0 <= jsd_tail - tail <= 64, "the tail re-read twice, no more"
        assert jsd.of("input 1").loaded == jsd.of("input 0").loaded
        _, (small,) = emu.traffic("jsd_logits", s, t, None, 0.5, 1.0, "sum", True, False,
                                  l2_bytes=jsd_tail * 3 // 2, resident_blocks=1)
        assert small.reread_hit_rate >= 0.55, small.reread_hit_rate


@pytest.mark.parametrize("grads", ["student", "both"])
def test_cluster_kernel_reads_a_row_wider_than_one_block_once(emu, grads):
    """The row of test_partial_row_cache_... (4096 bf16, 4.5 KB of shared memory per block) on a device
    with clusters: spread over a cluster whose blocks each cache a slice, every input byte is loaded
    once and every gradient byte stored once (3e, 4e: the floor), two cluster barriers per row, and
    the blocks' row states (one per block) read through distributed shared memory by every thread."""
    dtype, e, vocab = torch.bfloat16, 2, 4096
    E = ROWS * vocab
    need_t = grads == "both"
    s, t = logits(ROWS, vocab, dtype)
    with emu.limits(max_shared_optin=4 * 1024 + 512):
        _, launches = emu.traffic("kl_div_logits", s, t, None, 1.0, False, "sum", True, need_t)
    (k,) = launches
    assert k.name == "kl_cluster_rows_kernel" and 2 <= k.cluster <= 8 and k.grid == ROWS * k.cluster
    for name in ("input 0", "input 1"):
        assert k.of(name).loaded == k.of(name).distinct_loaded == E * e, f"{name} read more than once"
    assert k.of("output 1").stored == E * e and k.of("output 2").stored == (E * e if need_t else 0)
    assert k.reread_bytes <= 8 * k.block * k.grid, "only per-thread scalars (the factor) are read twice"
    assert k.cluster_barriers == 2 * ROWS
    state = 20  # RowState<float>: 5 floats
    assert k.shared_loaded >= ROWS * k.cluster * k.block * k.cluster * state, "every thread reads every block's state"


def test_hard_cluster_kernel_reads_a_row_wider_than_one_block_once(emu):
    """distillation_loss (KL with labels, T = 2) on the row above: the cluster form of the hard kernel
    loads each input once, beyond it only the label's logit (twice per row at most: its cross-entropy
    and its rewritten gradient element) and the labels, and stores the gradient once plus the label's
    element rewritten."""
    e, vocab = 2, 4096
    E = ROWS * vocab
    with emu.limits(max_shared_optin=4 * 1024 + 512):
        _, launches = distillation(emu, ROWS, vocab, torch.bfloat16, "kl")
    (k,) = launches
    assert k.name == "kl_hard_cluster_rows_kernel" and 2 <= k.cluster <= 8 and k.grid == ROWS * k.cluster
    for name in ("input 0", "input 1"):
        assert k.of(name).distinct_loaded == E * e
        assert k.of(name).loaded <= E * e + 2 * ROWS * e, f"{name} read more than once"
    assert E * e <= k.of("output 1").stored <= E * e + ROWS * e
    assert k.cluster_barriers == 2 * ROWS


@pytest.mark.parametrize("factor,moved", [(2.0, 2), (1.0, 0)])
def test_grad_scale_moves_the_gradient_once_or_not_at_all(emu, factor, moved):
    e, E = 2, ROWS * VOCAB
    grad, _ = logits(ROWS, VOCAB, torch.bfloat16)
    _, (k,) = emu.traffic("grad_scale_", grad, torch.tensor(factor, dtype=torch.float32))
    assert k.name == "grad_scale_kernel"
    g = k.of("input 0")
    assert g.loaded + g.stored == moved * e * E
    assert g.loaded == g.distinct_loaded
    assert _other(k, "input 0") <= 8 * k.block * k.grid  # the factor, per thread


@pytest.mark.parametrize("with_grad", [False, True])
def test_jsd_reads_each_input_once_and_counts_its_mufu_work(emu, with_grad):
    e, E = 2, ROWS * VOCAB
    s, t = logits(ROWS, VOCAB, torch.bfloat16)
    _, launches = emu.traffic("jsd_logits", s, t, None, 0.5, 1.0, "sum", with_grad, False)
    (k,) = launches
    assert k.name == "jsd_rows_kernel"
    for name in ("input 0", "input 1"):
        assert k.of(name).loaded == E * e, f"{name} read more than once"
    assert k.of("output 1").stored == (E * e if with_grad else 0)
    c = count(launches, E)
    # Passes 1, 2 (and 3): 2 ex2 each; passes 2 (and 3): one log2 per element (log m).
    passes = 3 if with_grad else 2
    assert 2 * passes <= c.ex2 <= 2 * passes + 2
    assert passes - 1 <= c.lg2 <= passes


@pytest.mark.parametrize("renormalize", [False, True])
def test_sparse_reads_the_student_once_or_never(emu, renormalize):
    e, E, slots = 2, ROWS * VOCAB, 16
    s, _ = logits(ROWS, VOCAB, torch.bfloat16)
    indices, logprobs = sparse_support(ROWS, VOCAB, slots)
    _, launches = emu.traffic("sparse_kl_div", s, indices, logprobs, None, 1.0, renormalize, "sum", 1e-3, False,
                              True, False)
    (k,) = launches
    student = k.of("input 0")
    if renormalize:
        assert student.loaded <= 2 * ROWS * slots * e, "renormalize reads the support's logits only (twice)"
    else:
        assert student.distinct_loaded == E * e
        assert student.loaded - E * e <= ROWS * slots * e, "beyond one read: the support's logits only"
    # The row's gradient once, then the support's slots again (after a barrier): O(K) more.
    grad = k.of("output 1")
    assert grad.distinct_stored == E * e and grad.stored <= E * e + ROWS * slots * e
    support = k.of("input 1").loaded + k.of("input 2").loaded
    assert support <= 4 * ROWS * slots * (8 + 4), "the support (int64 index, fp32 log-prob) is read at most 4 times"


def test_shard_kernels_read_twice_and_write_once(emu):
    e, E = 2, ROWS * VOCAB
    grads, launches = SCENARIO["vocab-parallel shard: states + student grad"].run(emu, ROWS, VOCAB, torch.bfloat16)
    assert [k.name for k in launches] == ["kl_row_states_kernel", "kl_grad_from_stats_kernel"]
    states, grad = launches
    for k in launches:
        assert k.of("input 0").loaded == k.of("input 1").loaded == E * e
    assert grad.of("output 0").stored == E * e
    assert states.stored <= 5 * 4 * ROWS


@pytest.mark.parametrize("sc", SCENARIOS, ids=lambda sc: sc.name)
def test_every_scenario_meets_its_documented_bytes_and_launches(emu, sc):
    """The table's scenarios at a cached width: the bytes moved on rows x V tensors (logits,
    gradients) equal the documented count of e per element, up to O(K) per row for the sparse
    support's slots written twice; everything else (row losses, statistics, factors, the support)
    is O(rows) and O(threads). The front door's rows run its op, then backward's grad_scale_ by the
    upstream gradient (2e when it is not 1, nothing over rows x V when it is)."""
    e, E = 2, ROWS * VOCAB
    _, launches = sc.run(emu, ROWS, VOCAB, torch.bfloat16)
    assert len(launches) == sc.launches
    full = [x for k in launches for x in k.tensors if E * e in (x.distinct_loaded, x.distinct_stored)]
    moved = sum(x.loaded + x.stored for x in full)
    # O(K) per row: the sparse support's slots; O(rows): the hard term's label logit and gradient element.
    assert sc.bytes_in_e * e * E <= moved <= sc.bytes_in_e * e * E + 2 * ROWS * 64 * e + 4 * ROWS * e, \
        (moved / E, sc.formula)
    other = sum(x.loaded + x.stored for k in launches for x in k.tensors) - moved
    assert other <= ROWS * 64 * 12 * 4 + sum(8 * k.block * k.grid for k in launches), other


# ------------------------------------------------------------------------------------- the front door's hard term


DISTILL_FORMS = {"kl": ("kl_hard_rows_kernel", "kl_rows_kernel", 1, ("input 0", "input 1")),
                 "jsd": ("jsd_hard_rows_kernel", "jsd_rows_kernel", 2, ("input 0", "input 1")),
                 "topk": ("sparse_bucket_hard_kernel", "sparse_bucket_kernel", 1, ("input 0",))}


@pytest.mark.parametrize("temperature,smoothing", [(1.0, 0.0), (2.0, 0.1)])
@pytest.mark.parametrize("form", DISTILL_FORMS)
@pytest.mark.parametrize("cache", ["whole row", "partial"])
def test_hard_term_adds_only_bytes_per_row(emu, form, cache, temperature, smoothing):
    """distillation_loss with labels (the hard kernel) against the same call without (the soft kernel):
    the same launches, the same distinct bytes of every rows x V tensor, and beyond them only O(rows)
    bytes: the label's logit read at most twice per row of each input (the row's cross-entropy; the
    label's gradient element, rewritten once), the labels (8 bytes per thread and row). A row wider than
    the cache also re-reads, per later pass, what the hard state's per-warp scratch (16 B a warp) takes
    off the row cache: O(rows x warps). No pass over rows x V is added."""
    hard_kernel, soft_kernel, later_passes, inputs = DISTILL_FORMS[form]
    e, vocab = 2, 1024 if cache == "whole row" else 4096
    limits = {} if cache == "whole row" else {"max_shared_optin": 4 * 1024 + 512, "cluster_launch": False}
    with emu.limits(**limits):
        runs = {labels: distillation(emu, ROWS, vocab, torch.bfloat16, form, labels=labels, temperature=temperature,
                                     label_smoothing=smoothing)[1] for labels in (True, False)}
    (hard,), (soft,) = runs[True], runs[False]
    assert (hard.name, soft.name) == (hard_kernel, soft_kernel)
    assert hard.grid == soft.grid and hard.block == soft.block
    labels = hard.of("input 3" if form == "topk" else "input 2")
    assert labels.distinct_loaded == 8 * ROWS and labels.loaded <= 8 * hard.block * ROWS
    scratch = 0 if cache == "whole row" else later_passes * 16 * (hard.block // 32)
    for name in inputs:
        h, s = hard.of(name), soft.of(name)
        assert h.distinct_loaded == s.distinct_loaded == ROWS * vocab * e, name
        assert 0 <= h.loaded - s.loaded <= ROWS * (2 * e + scratch), (name, h.loaded - s.loaded)
    if cache == "partial":
        assert hard.of("input 0").loaded > ROWS * vocab * e, "the tail is re-read: the case the bound is about"
    grad_h, grad_s = hard.of("output 1"), soft.of("output 1")
    assert grad_h.distinct_stored == grad_s.distinct_stored == ROWS * vocab * e
    assert grad_h.stored - grad_s.stored == ROWS * e, "the label's gradient element rewritten once per row"
    # Everything else: the labels and the hard term's factor, read per thread and row; its row outputs.
    def rest(k):
        return k.loaded + k.stored - sum(k.of(n).loaded for n in inputs) - k.of("output 1").stored

    assert 0 < rest(hard) - rest(soft) <= ROWS * 16 * hard.block, rest(hard) - rest(soft)


@pytest.mark.parametrize("form", ["kl", "topk"])
def test_front_door_host_code_never_synchronises(emu, form):
    """validate=False (the capture-safe path): the CUDA host code of distillation_loss reads nothing on
    the host, with labels, and neither does the Python front door's forward and backward."""
    with HostSyncs() as syncs:
        _, launches = distillation(emu, 3, 64, torch.float32, form, slots=8)
    assert len(launches) == 1 and syncs.calls == []
    s, t = logits(3, 64, torch.float32)
    s.requires_grad_()
    indices, logprobs = sparse_support(3, 64, 8)
    teacher = {"teacher_logits": t} if form == "kl" else {"teacher_topk": (indices, logprobs)}
    with HostSyncs() as syncs:
        loss = kl_fused.distillation_loss(s, labels=hard_labels(3, 64), temperature=2.0, soft_weight=4.0,
                                          hard_weight=0.5, validate=False, **teacher)
        (loss * 0.3).backward()
    assert syncs.calls == []


# ------------------------------------------------------------------------------------- the linear chunk loop


@pytest.mark.parametrize("with_labels", [False, True])
def test_linear_chunk_loop_launches_one_row_kernel_per_chunk_at_3e(emu, monkeypatch, with_labels):
    """The linear forms' chunk loop (kl_fused.linear_kl_div; linear_distillation_loss with labels) with
    its row op emulated: one row kernel launch per chunk (the hard kernel with labels), 3e per element
    of the chunk's logits (plus, with labels, the label's logit and gradient element per row), nothing
    else over rows x V from our kernels."""
    from kl_fused import _chunked_linear
    recorded = []

    def emulated_rows(*args):
        args = tuple(a.contiguous() if isinstance(a, torch.Tensor) else a for a in args)
        result, launches = emu.traffic("distillation_loss", *args)
        recorded.append((args[0].shape, launches))
        return result

    monkeypatch.setattr(_chunked_linear, "distillation_rows", emulated_rows)
    gen = torch.Generator().manual_seed(3)
    rows, hidden, vocab = 10, 16, 256
    h = torch.randn(rows, hidden, generator=gen, requires_grad=True)
    w = torch.randn(vocab, hidden, generator=gen, requires_grad=True)
    t = torch.randn(rows, vocab, generator=gen)
    if with_labels:
        loss = kl_fused.linear_distillation_loss(h, w, t, labels=hard_labels(rows, vocab), temperature=2.0,
                                                 hard_weight=0.5, chunk_rows=4, validate=False)
    else:
        loss = kl_fused.linear_kl_div(h, w, t, chunk_rows=4)
    loss.backward()
    assert [shape[0] for shape, _ in recorded] == [4, 4, 2]
    for shape, launches in recorded:
        (k,) = launches
        assert k.name == ("kl_hard_rows_kernel" if with_labels else "kl_rows_kernel")
        elements = shape[0] * shape[1]
        moved = k.of("input 0").loaded + k.of("input 1").loaded + k.of("output 1").stored + k.of("output 2").stored
        assert 3 * 4 * elements <= moved <= 3 * 4 * elements + (4 * 4 * shape[0] if with_labels else 0)
    assert torch.isfinite(h.grad).all() and h.grad.abs().sum() > 0


# ------------------------------------------------------------------------------------- host synchronisations


def test_host_sync_counter_sees_reads_of_device_data():
    x = torch.arange(4.0)
    with HostSyncs() as syncs:
        x.sum().item()
        x.cpu()
        x.to("cpu")  # a CPU tensor stays where it is
        bool(x[0] > 1)
        y = x * 2  # no read
    assert sorted(syncs.calls) == ["cpu", "item", "item"] and y.shape == x.shape


@pytest.mark.parametrize("upstream", [1.0, 0.3])
def test_kl_forward_and_backward_never_synchronise(upstream):
    s, t = logits(3, 64, torch.float32)
    s.requires_grad_()
    with HostSyncs() as syncs:
        loss = kl_fused.kl_div_logits(s, t, temperature=2.0)
        (loss * upstream).backward()
    assert syncs.calls == []


def test_vocab_parallel_agreement_once_leaves_no_host_synchronisation(tmp_path):
    """The first call of a signature checks that the ranks agree (two host reads); later calls with
    agreement="once" skip it: nothing on the hot path reads device data on the host."""
    import torch.distributed as dist
    from kl_fused.distributed import kl_div_logits_vocab_parallel
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        s, t = logits(4, 32, torch.float32)
        mask = torch.tensor([True, False, True, True])
        calls = []
        for _ in range(3):
            student = s.clone().requires_grad_()
            with HostSyncs() as syncs:
                loss = kl_div_logits_vocab_parallel(student, t, mask=mask, agreement="once")
                loss.backward()
            calls.append(syncs.calls)
            torch.testing.assert_close(loss, kl_fused.kl_div_logits(s, t, mask=mask))
        assert len(calls[0]) >= 2, calls[0]  # the mask's count and the gathered records
        assert calls[1] == [] and calls[2] == []
        with HostSyncs() as syncs:
            kl_div_logits_vocab_parallel(s, t, mask=mask)  # every_call: checked again
        assert len(syncs.calls) >= 2
    finally:
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------- torch.compile


def test_compiled_backward_scales_the_forward_gradient_in_place():
    """Under torch.compile the upstream scaling runs out of place in the graph (scale_by_upstream);
    Inductor fuses it into one pass over the forward's gradient buffer and writes it in place (the
    buffer's last use): no second rows x V buffer. Checked in the generated CPU code, where buffer
    reuse is decided by Inductor's scheduler as it is for CUDA."""
    from torch._inductor.utils import run_and_get_code
    rows, vocab = 8, 512
    s = torch.randn(rows, vocab, requires_grad=True)
    t = torch.randn(rows, vocab)
    compiled = torch.compile(lambda s, t, w: w * kl_fused.kl_div_logits(s, t, temperature=2.0), fullgraph=True)

    def step():
        compiled(s, t, torch.tensor(0.5)).backward()

    _, (forward_code, backward_code) = run_and_get_code(step)
    assert "in_out_ptr0" in backward_code and "# reuse" in backward_code
    assert f"empty_strided_cpu(({rows}, {vocab})" not in backward_code, "a second rows x V buffer in backward"
    expected = torch.autograd.grad(0.5 * kl_fused.kl_div_logits(s, t, temperature=2.0), s)[0]
    torch.testing.assert_close(s.grad, expected)


def test_sparse_cuda_host_code_without_validation_never_synchronises(emu):
    """The emulated op runs the CUDA host code. validate=False reads nothing on the host. (validate=True
    reads the support's status once on a GPU; on the emulator's CPU tensors sparse_kl_common.cpp reads
    it in place, which no counter sees: the one place where the host code forks on the device.)"""
    s, _ = logits(3, 64, torch.float32)
    indices, logprobs = sparse_support(3, 64, 8)
    with HostSyncs() as syncs:
        _, launches = emu.traffic("sparse_kl_div", s, indices, logprobs, None, 1.0, False, "sum", 1e-3, False,
                                  True, False)
    assert len(launches) == 1 and syncs.calls == []


@pytest.mark.parametrize("op", ["kl_div_logits", "jsd_logits", "grad_scale_"])
def test_cuda_host_code_of_the_dense_ops_never_synchronises(emu, op):
    s, t = logits(3, 64, torch.float32)
    args = {"kl_div_logits": (s, t, None, 2.0, False, "batchmean", True, True),
            "jsd_logits": (s, t, None, 0.5, 2.0, "batchmean", True, True),
            "grad_scale_": (s, torch.tensor([0.5, 1.0, 2.0]))}[op]
    with HostSyncs() as syncs:
        _, launches = emu.traffic(op, *args)
    assert len(launches) == 1 and syncs.calls == []
