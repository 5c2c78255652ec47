"""Counts the calls that, on a CUDA tensor, copy data to the host and wait for the stream: the host
synchronisations of a code path, seen on any device (the tests run on the CPU, where these calls
cost nothing but are the same calls).

    with HostSyncs() as syncs:
        loss = kl_fused.kl_div_logits(s, t); loss.backward()
    assert syncs.calls == []

Two sources: a TorchFunctionMode sees the Python code's explicit copies to the host (.cpu(),
.tolist(), .numpy(), .to("cpu") of a tensor elsewhere); the profiler sees every ATen op the
dispatcher runs, also inside the C++ host code of an op, and reports those that read device data
on the host (.item(), bool(), int(), float() all become _local_scalar_dense; nonzero; equal).
"""

import torch
from torch.overrides import TorchFunctionMode

_COPIES = {torch.Tensor.cpu: "cpu", torch.Tensor.tolist: "tolist", torch.Tensor.numpy: "numpy"}
_READS = {"aten::_local_scalar_dense": "item", "aten::nonzero": "nonzero", "aten::equal": "equal"}


def _to_host(func, args, kwargs):
    """Tensor.to(...) of a tensor that is not on the CPU, towards the CPU. (A .to(device) of the
    collectives' buffers stays on the GPU with NCCL; with gloo it is the transport's own copy.)"""
    if func is not torch.Tensor.to or not isinstance(args[0], torch.Tensor) or args[0].device.type == "cpu":
        return False
    targets = [a for a in list(args[1:]) + [kwargs.get("device")] if isinstance(a, (str, torch.device))]
    return any(torch.device(t).type == "cpu" for t in targets)


class _Copies(TorchFunctionMode):
    def __init__(self, calls):
        super().__init__()
        self.calls = calls

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _COPIES:
            self.calls.append(_COPIES[func])
        elif _to_host(func, args, kwargs):
            self.calls.append("to(cpu)")
        return func(*args, **kwargs)


class HostSyncs:
    def __init__(self):
        self.calls = []  # names of the host reads seen: copies in call order, then the reads
        self._copies = _Copies(self.calls)
        self._profile = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU])

    def __enter__(self):
        self._profile.__enter__()
        self._copies.__enter__()
        return self

    def __exit__(self, *exc):
        self._copies.__exit__(*exc)
        self._profile.__exit__(*exc)
        if exc[0] is None:
            self.calls += [_READS[e.name] for e in self._profile.events() if e.name in _READS]
        return False
