"""The environment every record carries: device, its name, torch and kl_fused versions, threads,
the allocator setting (allocator.py), date."""

import platform
from datetime import datetime, timezone

import torch

import kl_fused
from kl_fused.bench.allocator import allocator_description

# Keys of describe_environment() copied into every record (next to device and device_name).
ENVIRONMENT_KEYS = ("torch_version", "kl_fused_version", "fused_available", "threads", "allocator", "date")


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe_environment(device):
    return {
        "device": str(device),
        "device_name": device_name(device),
        "torch_version": torch.__version__,
        "kl_fused_version": kl_fused.__version__,
        "fused_available": kl_fused.is_fused_available(device),
        "threads": torch.get_num_threads(),
        "allocator": allocator_description(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def record_environment(environment):
    """The environment fields of one record."""
    return {
        "device": environment["device"],
        "device_name": environment["device_name"],
        **{key: environment[key] for key in ENVIRONMENT_KEYS},
    }
