"""The SIMT emulator as the tests use it: emulated op calls, the emulated device's limits, the
schedules, and a record of every launch (kernel instantiation, grid, block, dynamic shared memory).

Every emulated call runs under each schedule of SIMT_SCHEDULES (comma-separated: forward, reverse,
random:SEED; the first is the one the test sees), on its own copy of the inputs, and its outputs and
inputs afterwards must be the same bits under all of them: the kernels claim determinism. After each
call, no byte of an output the call allocated may be one that no kernel wrote. SIMT_FMA=1 runs the
build whose kernels contract a*b + c into fused multiply-adds (build.py).
"""

import contextlib
import json
import os
import pathlib
import re
from dataclasses import dataclass

import pytest
import torch

from simt import build

# An sm_90 device (H100 SXM): 132 SMs, 227 KB of opt-in shared memory per block, 2^31 - 1 blocks.
DEFAULT_LIMITS = {"sm_count": 132, "max_shared_optin": 227 * 1024, "max_grid_x": 2**31 - 1, "cluster_launch": True}
L2_BYTES = 50 * 10**6  # an H100's L2, for the traffic record's model
RESOURCES = pathlib.Path(__file__).resolve().parents[2] / "bench" / "results" / "cuda-resources.md"
CXX_TYPES = {torch.float32: "float", torch.float64: "double", torch.bfloat16: "c10::BFloat16", torch.float16: "c10::Half"}

# Which emulated test file exercises which kernel (by name, without template arguments). Every kernel
# the host code can launch has an owner, and each owner's last test checks that every instantiation
# of its kernels ran in that file (assert_owned_kernels_ran). A new kernel adds one line here.
KERNEL_OWNERS = {
    "kl_rows_kernel": "test_cuda_emulated.py",
    "kl_cluster_rows_kernel": "test_cuda_emulated_cluster.py",
    "kl_hard_cluster_rows_kernel": "test_cuda_emulated_cluster.py",
    "jsd_cluster_rows_kernel": "test_cuda_emulated_cluster.py",
    "jsd_hard_cluster_rows_kernel": "test_cuda_emulated_cluster.py",
    "grad_scale_kernel": "test_cuda_emulated.py",
    "kl_row_states_kernel": "test_cuda_emulated.py",
    "kl_grad_from_stats_kernel": "test_cuda_emulated.py",
    "jsd_rows_kernel": "test_cuda_emulated_jsd.py",
    "sparse_bucket_kernel": "test_cuda_emulated_sparse.py",
    "sparse_renorm_kernel": "test_cuda_emulated_sparse.py",
    "kl_hard_rows_kernel": "test_cuda_emulated_distill.py",
    "jsd_hard_rows_kernel": "test_cuda_emulated_distill.py",
    "sparse_bucket_hard_kernel": "test_cuda_emulated_distill.py",
}
# The schedules a call runs under unless SIMT_SCHEDULES says otherwise.
DEFAULT_SCHEDULES = "forward,random:1"
_LOG_LINE = re.compile(r"^(?P<kernel>.+) grid=(?P<grid>\d+) block=(?P<block>\d+) shared=(?P<shared>\d+)"
                       r"(?: cluster=(?P<cluster>\d+))?$")


@dataclass(frozen=True)
class Launch:
    kernel: str  # "kl_rows_kernel<float, 4, true>"
    grid: int
    block: int
    shared: int
    cluster: int = 1  # blocks per thread-block cluster

    @property
    def name(self):
        return self.kernel.split("<", 1)[0]

    @property
    def template_args(self):
        inner = self.kernel[len(self.name) + 1 : -1] if "<" in self.kernel else ""
        return [arg.strip() for arg in inner.split(",")] if inner else []


@dataclass(frozen=True)
class TensorTraffic:
    name: str                 # "input 0" (the call's tensor arguments, counted from 0), "output 1", "temporary"
    loaded: int               # global bytes read (a byte read twice counts twice)
    stored: int               # global bytes written
    distinct_loaded: int      # bytes read at least once
    distinct_stored: int      # bytes written at least once


@dataclass(frozen=True)
class LaunchTraffic:
    """What one emulated launch moved (tests/simt/memory_checks.cpp counts it; the L2 figures come
    from its model: an LRU of 128-byte lines per block holding the block's share of L2, fed in
    lock-step order; a model, not a measurement)."""
    kernel: str
    grid: int
    block: int
    shared: int               # dynamic shared memory of the launch, bytes
    cluster: int              # blocks per thread-block cluster (1: none)
    barriers: int             # __syncthreads completed, summed over blocks
    cluster_barriers: int     # cluster barriers completed, summed over clusters
    ex2: int                  # fp32 MUFU ex2.approx calls
    lg2: int                  # fp32 log2f calls
    shared_loaded: int
    shared_stored: int
    reread_bytes: int         # global bytes read again by the launch
    reread_dram_bytes: int    # the model's device-memory bytes for those re-reads
    dram_read_bytes: int      # the model's device-memory read bytes (first reads and lost re-reads)
    l2_share_bytes: int
    tensors: tuple            # TensorTraffic per tensor touched

    @property
    def name(self):
        return self.kernel.split("<", 1)[0]

    def of(self, name):
        """The TensorTraffic of `name`, or one with zeros where the launch did not touch it."""
        found = [t for t in self.tensors if t.name == name]
        return found[0] if found else TensorTraffic(name, 0, 0, 0, 0)

    @property
    def loaded(self):
        return sum(t.loaded for t in self.tensors)

    @property
    def stored(self):
        return sum(t.stored for t in self.tensors)

    @property
    def reread_hit_rate(self):
        """The L2 model's share of re-read bytes served from L2 (1.0 when nothing is re-read)."""
        if self.reread_bytes == 0:
            return 1.0
        return max(0.0, 1.0 - self.reread_dram_bytes / self.reread_bytes)


def _tensor_names(args, result):
    """{first byte's address: name} of a call's tensor arguments and results."""
    names = {}
    inputs = [a for a in args if isinstance(a, torch.Tensor)]
    for i, t in enumerate(inputs):
        if t.numel():
            names.setdefault(t.data_ptr(), f"input {i}")
    for i, t in enumerate(_tensors(result)):
        if t.numel():
            names.setdefault(t.data_ptr(), f"output {i}")
    return names


def _launch_traffic(record, names):
    data = json.loads(record)
    tensors = tuple(TensorTraffic(names.get(r["address"], "temporary"), r["loaded"], r["stored"],
                                  r["distinct_loaded"], r["distinct_stored"]) for r in data["regions"])
    fields = {k: data[k] for k in ("kernel", "grid", "block", "shared", "cluster", "barriers", "cluster_barriers",
                                   "ex2", "lg2", "shared_loaded",
                                   "shared_stored", "reread_bytes", "reread_dram_bytes", "dram_read_bytes",
                                   "l2_share_bytes")}
    return LaunchTraffic(**fields, tensors=tensors)


def parse_schedule(text):
    """"forward", "reverse" or "random:SEED" -> (kind, seed)."""
    kind, _, seed = text.strip().partition(":")
    if kind not in ("forward", "reverse", "random") or (kind == "random") != bool(seed):
        raise ValueError(f"a schedule is forward, reverse or random:SEED, got {text!r}")
    return kind, int(seed or 0)


def _tensors(value):
    """The tensors of an op's result (a tensor, or nested tuples and lists), in order."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for item in value for t in _tensors(item)]
    return []


def _twin(value):
    """A copy of a tensor argument with its own storage and the same offset, sizes and strides (so
    the same alignment and kernel path); other arguments as they are."""
    if not isinstance(value, torch.Tensor):
        return value
    storage = value.untyped_storage().clone()
    return torch.empty(0, dtype=value.dtype).set_(storage, value.storage_offset(), value.size(), value.stride())


def _bits(t):
    return t.detach().reshape(-1).contiguous().view(torch.uint8)


def first_different_bits(a, b):
    """None where a and b hold the same bits, else where they part."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return f"{a.dtype} {tuple(a.shape)} against {b.dtype} {tuple(b.shape)}"
    differ = (_bits(a) != _bits(b)).nonzero()
    if len(differ) == 0:
        return None
    element = differ[0].item() // a.element_size()
    return f"first at element {element} of {a.dtype} {tuple(a.shape)}: {a.reshape(-1)[element]} against {b.reshape(-1)[element]}"


class Emulator:
    def __init__(self):
        if build.requested_mode() == "fma" and not build.host_has_fma():
            pytest.skip("SIMT_FMA=1 runs kernels contracted into fused multiply-adds, and this CPU has no FMA instructions")
        self.mode = build.load()  # "plain" or "fma"
        self.configure(**DEFAULT_LIMITS)
        self.launched = {}  # kernel -> largest block it was launched with
        self.schedules = [parse_schedule(s) for s in os.environ.get("SIMT_SCHEDULES", DEFAULT_SCHEDULES).split(",")]
        self._use(self.schedules[0])

    @staticmethod
    def _use(schedule):
        torch.ops.simt.set_schedule(*schedule)

    @contextlib.contextmanager
    def schedule(self, *texts):
        """Runs the block's calls under these schedules ("forward", "reverse", "random:SEED"; the
        first is the one the caller sees) instead of SIMT_SCHEDULES'."""
        saved = self.schedules
        self.schedules = [parse_schedule(text) for text in texts]
        self._use(self.schedules[0])
        try:
            yield
        finally:
            self.schedules = saved
            self._use(saved[0])

    def configure(self, sm_count, max_shared_optin, max_grid_x, cluster_launch):
        torch.ops.simt.configure(sm_count, max_shared_optin, max_grid_x, cluster_launch)

    @contextlib.contextmanager
    def limits(self, **overrides):
        """Shrinks (or grows) the emulated device's limits inside the block."""
        self.configure(**{**DEFAULT_LIMITS, **overrides})
        try:
            yield
        finally:
            self.configure(**DEFAULT_LIMITS)

    def _scoped(self, fn, tensors):
        torch.ops.simt.take_launch_log()
        torch.ops.simt.begin_call([t for t in tensors if isinstance(t, torch.Tensor)])
        try:
            result = fn()
            torch.ops.simt.check_outputs(_tensors(result))
        finally:
            torch.ops.simt.end_call()
        launches = [Launch(m["kernel"], int(m["grid"]), int(m["block"]), int(m["shared"]), int(m["cluster"] or 1))
                    for m in map(_LOG_LINE.match, torch.ops.simt.take_launch_log())]
        for launch in launches:
            self.launched[launch.kernel] = max(self.launched.get(launch.kernel, 0), launch.block)
        return result, launches

    def _under_every_schedule(self, what, fn, args):
        """fn(*args) under the first schedule, then on copies of args under each other one; the
        results and the arguments afterwards must hold the same bits. Returns the first run's."""
        twins = [[_twin(a) for a in args] for _ in self.schedules[1:]]
        result, launches = self._scoped(lambda: fn(*args), args)
        for schedule, twin in zip(self.schedules[1:], twins):
            self._use(schedule)
            try:
                other, other_launches = self._scoped(lambda: fn(*twin), twin)
            finally:
                self._use(self.schedules[0])
            names = f"schedules {self.schedules[0]} and {schedule}"
            assert other_launches == launches, f"{what}: the launches differ between {names}"
            outputs, other_outputs = _tensors(result), _tensors(other)
            assert len(outputs) == len(other_outputs), f"{what}: the outputs differ between {names}"
            pairs = [(f"output {i}", a, b) for i, (a, b) in enumerate(zip(outputs, other_outputs))]
            pairs += [(f"argument {i}", a, b) for i, (a, b) in enumerate(zip(args, twin)) if isinstance(a, torch.Tensor)]
            for name, a, b in pairs:
                where = first_different_bits(a, b)
                assert where is None, f"{what}: {name} differs between {names}, {where}"
        return result, launches

    def _with_traffic(self, fn, args, l2_bytes, resident_blocks):
        torch.ops.simt.configure_l2_model(l2_bytes, resident_blocks)
        torch.ops.simt.set_schedule("forward", 0)
        torch.ops.simt.take_traffic()
        try:
            result, _ = self._scoped(lambda: fn(*args), args)
        finally:
            self._use(self.schedules[0])
            torch.ops.simt.configure_l2_model(L2_BYTES, 0)
        names = _tensor_names(args, result)
        return result, [_launch_traffic(r, names) for r in torch.ops.simt.take_traffic()]

    def traffic(self, op_name, *args, l2_bytes=None, resident_blocks=0):
        """torch.ops.kl_fused_emulated.<op_name>(*args) once, under the forward schedule, with the
        traffic record: returns (result, [LaunchTraffic]), one per launch in order. The L2 model
        gives each block l2_bytes (default 50 MB) / resident_blocks (0: min(grid, SMs))."""
        op = getattr(torch.ops.kl_fused_emulated, op_name)
        return self._with_traffic(op, args, l2_bytes or L2_BYTES, resident_blocks)

    def probe_traffic(self, name, data, l2_bytes=None, resident_blocks=0):
        """A probe kernel's result and [LaunchTraffic] (see traffic)."""
        return self._with_traffic(lambda d: torch.ops.simt.run_probe(name, d), (data,), l2_bytes or L2_BYTES,
                                  resident_blocks)

    def call(self, op_name, *args):
        """torch.ops.kl_fused_emulated.<op_name>(*args) with its tensor arguments as the memory its
        launches may touch, under every schedule; returns (result, [Launch])."""
        return self._under_every_schedule(op_name, getattr(torch.ops.kl_fused_emulated, op_name), args)

    def probe(self, name, data):
        """One of the emulator's own probe kernels (tests/simt/probe_kernels.cpp) on a (blocks, threads)
        float tensor, under every schedule."""
        return self._under_every_schedule(f"probe {name}", lambda d: torch.ops.simt.run_probe(name, d), (data,))

    @staticmethod
    def launchable_kernels():
        """Every kl_fused kernel instantiation that the host code of csrc/cuda can launch."""
        return sorted(k for k in torch.ops.simt.launchable_kernels() if not k.startswith("probe_"))


def pack_of(dtype):
    """Elements per 16-byte access of the vector path."""
    return 16 // torch.empty((), dtype=dtype).element_size()


def emulated_kl(emu, student, teacher, *, mask=None, temperature=1.0, direction="forward", reduction="sum",
                student_grad=True, teacher_grad=True):
    """kl_div_logits' CUDA implementation under `emu`: (loss, grad_student, grad_teacher, launches)."""
    (loss, grad_s, grad_t), launches = emu.call(
        "kl_div_logits", student, teacher, mask, float(temperature), direction == "reverse", reduction,
        student_grad, teacher_grad)
    return loss, grad_s, grad_t, launches


def emulated_jsd(emu, student, teacher, *, beta=0.5, mask=None, temperature=1.0, reduction="sum",
                 student_grad=True, teacher_grad=True):
    """jsd_logits' CUDA implementation under `emu`: (loss, grad_student, grad_teacher, launches)."""
    (loss, grad_s, grad_t), launches = emu.call(
        "jsd_logits", student, teacher, mask, float(beta), float(temperature), reduction, student_grad, teacher_grad)
    return loss, grad_s, grad_t, launches


def only_launch(launches, name):
    """The single launch of a call, which must be of kernel `name`."""
    assert [launch.name for launch in launches] == [name], f"expected one {name} launch, got {launches}"
    return launches[0]


def recorded_resources():
    """{(arch, kernel): (registers, max threads per block)} from bench/results/cuda-resources.md."""
    rows = {}
    for line in RESOURCES.read_text().splitlines():
        cells = [cell.strip().strip("`") for cell in line.strip().strip("|").split("|")]
        if len(cells) >= 4 and re.fullmatch(r"sm_\d+", cells[0]):
            rows[(cells[0], cells[1])] = (int(cells[2]), int(cells[3]))
    return rows


def assert_owned_kernels_ran(emu, test_file):
    """Every kernel instantiation the host code can launch has an owner in KERNEL_OWNERS and is in
    the resource audit; those owned by `test_file` ran in `emu` (the file's emulator: run the whole
    file), and their largest block fits the launch bounds and register file of the compiled code."""
    launchable = emu.launchable_kernels()
    assert launchable, "the emulator found no launchable kernels"
    unowned = sorted({k.split("<", 1)[0] for k in launchable} - set(KERNEL_OWNERS))
    assert not unowned, f"kernels no emulated test file owns (add them to KERNEL_OWNERS): {unowned}"
    owned = [k for k in launchable if KERNEL_OWNERS[k.split("<", 1)[0]] == test_file]
    assert owned, f"{test_file} owns no kernels"
    missing = [kernel for kernel in owned if kernel not in emu.launched]
    assert not missing, f"never launched by {test_file}: {missing}"
    resources = recorded_resources()
    audited = sorted({kernel for _, kernel in resources})
    assert audited == launchable, "the compiled kernels (resource audit) and the host's launchable ones differ"
    for (arch, kernel), (registers, max_threads) in resources.items():
        if kernel not in owned:
            continue
        block = emu.launched[kernel]
        assert block <= max_threads, f"{kernel} launched with {block} threads, above its launch bounds {max_threads}"
        assert registers * block <= 65536, f"{arch} {kernel}: {registers} registers x {block} threads > 64K"
