"""Counts the calls that, on a CUDA tensor, copy to the host and wait for the stream: the host
synchronisations of a code path, seen on any device (the tests run on the CPU, where they cost
nothing but are the same calls).

    with HostSyncs() as syncs:
        loss = kl_fused.kl_div_logits(s, t); loss.backward()
    assert syncs.calls == []
"""

import torch
from torch.overrides import TorchFunctionMode

# Tensor methods and torch functions that read device data on the host.
_READS = {
    torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.cpu, torch.Tensor.numpy, torch.Tensor.__bool__,
    torch.Tensor.__int__, torch.Tensor.__float__, torch.Tensor.__index__, torch.equal, torch.Tensor.equal,
    torch.Tensor.nonzero, torch.nonzero,
}


def _to_host(func, args, kwargs):
    """Tensor.to(...) of a tensor that is not on the CPU towards the CPU. (Tensor.cpu() counts
    always: it is written to read the data on the host. A .to(device) stays on the device where the
    device is a GPU's, as the collectives' buffers of kl_fused.distributed do with NCCL.)"""
    if func is not torch.Tensor.to or not isinstance(args[0], torch.Tensor) or args[0].device.type == "cpu":
        return False
    targets = [a for a in list(args[1:]) + [kwargs.get("device")] if isinstance(a, (str, torch.device))]
    return any(torch.device(t).type == "cpu" for t in targets)


class HostSyncs(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = []  # names of the calls seen, in order

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _READS:
            self.calls.append(getattr(func, "__name__", str(func)))
        elif _to_host(func, args, kwargs):
            self.calls.append("to(cpu)")
        return func(*args, **kwargs)

