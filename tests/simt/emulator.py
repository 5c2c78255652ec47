"""The SIMT emulator as the tests use it: emulated op calls, the emulated device's limits, and a
record of every launch (kernel instantiation, grid, block, dynamic shared memory)."""

import contextlib
import pathlib
import re
from dataclasses import dataclass

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


class Emulator:
    def __init__(self):
        build.load()
        self.configure(**DEFAULT_LIMITS)
        self.launched = {}  # kernel -> largest block it was launched with

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
        finally:
            torch.ops.simt.end_call()
        launches = [Launch(m["kernel"], int(m["grid"]), int(m["block"]), int(m["shared"]))
                    for m in map(_LOG_LINE.match, torch.ops.simt.take_launch_log())]
        for launch in launches:
            self.launched[launch.kernel] = max(self.launched.get(launch.kernel, 0), launch.block)
        return result, launches

    def call(self, op_name, *args):
        """torch.ops.kl_fused_emulated.<op_name>(*args) with its tensor arguments as the memory its
        launches may touch; returns (result, [Launch])."""
        op = getattr(torch.ops.kl_fused_emulated, op_name)
        return self._scoped(lambda: op(*args), args)

    def probe(self, name, data):
        """One of the emulator's own probe kernels (tests/simt/probe_kernels.cpp) on a (blocks, threads) float tensor."""
        return self._scoped(lambda: torch.ops.simt.run_probe(name, data), (data,))

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
