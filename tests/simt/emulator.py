"""The SIMT emulator as the tests use it: emulated op calls, the emulated device's limits, the
schedules, and a record of every launch (kernel instantiation, grid, block, dynamic shared memory).

Every emulated call runs under each schedule of SIMT_SCHEDULES (comma-separated: forward, reverse,
random:SEED; the first is the one the test sees), on its own copy of the inputs, and its outputs and
inputs afterwards must be the same bits under all of them: the kernels claim determinism. After each
call, no byte of an output the call allocated may be one that no kernel wrote. SIMT_FMA=1 runs the
build whose kernels contract a*b + c into fused multiply-adds (build.py).
"""

import contextlib
import os
import pathlib
import re
from dataclasses import dataclass

import pytest
import torch

from simt import build

# An sm_90 device (H100 SXM): 132 SMs, 227 KB of opt-in shared memory per block, 2^31 - 1 blocks.
DEFAULT_LIMITS = {"sm_count": 132, "max_shared_optin": 227 * 1024, "max_grid_x": 2**31 - 1}
RESOURCES = pathlib.Path(__file__).resolve().parents[2] / "bench" / "results" / "cuda-resources.md"
CXX_TYPES = {torch.float32: "float", torch.float64: "double", torch.bfloat16: "c10::BFloat16", torch.float16: "c10::Half"}

# Which emulated test file exercises which kernel (by name, without template arguments). Every kernel
# the host code can launch has an owner, and each owner's last test checks that every instantiation
# of its kernels ran in that file (assert_owned_kernels_ran). A new kernel adds one line here.
KERNEL_OWNERS = {
    "kl_rows_kernel": "test_cuda_emulated.py",
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
_LOG_LINE = re.compile(r"^(?P<kernel>.+) grid=(?P<grid>\d+) block=(?P<block>\d+) shared=(?P<shared>\d+)$")


@dataclass(frozen=True)
class Launch:
    kernel: str  # "kl_rows_kernel<float, 4, true>"
    grid: int
    block: int
    shared: int

    @property
    def name(self):
        return self.kernel.split("<", 1)[0]

    @property
    def template_args(self):
        inner = self.kernel[len(self.name) + 1 : -1] if "<" in self.kernel else ""
        return [arg.strip() for arg in inner.split(",")] if inner else []


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

    def configure(self, sm_count, max_shared_optin, max_grid_x):
        torch.ops.simt.configure(sm_count, max_shared_optin, max_grid_x)

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
        launches = [Launch(m["kernel"], int(m["grid"]), int(m["block"]), int(m["shared"]))
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
