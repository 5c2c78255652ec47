"""The SIMT emulator as the tests use it: emulated op calls, the emulated device's limits, and a
record of every launch (kernel instantiation, grid, block, dynamic shared memory)."""

import contextlib
import re
from dataclasses import dataclass

import torch

from simt import build

# An sm_90 device (H100 SXM): 132 SMs, 227 KB of opt-in shared memory per block, 2^31 - 1 blocks.
DEFAULT_LIMITS = {"sm_count": 132, "max_shared_optin": 227 * 1024, "max_grid_x": 2**31 - 1}
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
