"""Which GPUs a build of kl_fused._C has CUDA kernels for, and whether a CUDA device of this machine can
run them.

setup.py compiles the kernels for the architectures of TORCH_CUDA_ARCH_LIST (its default:
"8.0;9.0;10.0;12.0+PTX") and records the code nvcc produced in the extension as the string
kl_fused._C.cuda_archs, e.g. "sm_80,sm_90,sm_100,sm_120,compute_120". A cubin sm_XY runs on devices of
compute capability X.Z with Z >= Y (sm_80 on sm_86 and sm_89; sm_90 on no Blackwell); PTX compute_XY is
compiled by the driver for any device of compute capability X.Y or newer. A device with neither would
fail at the first launch with "no kernel image is available"; kl_fused runs its reference there instead
and says why (_ops.fused_path).
"""

import torch


def parse(text):
    """("sm_80", ..., "compute_120") from kl_fused._C.cuda_archs; None where the build does not say."""
    if text is None:
        return None
    return tuple(code for code in text.split(",") if code)


def has_kernel_image(capability, archs):
    """Whether code `archs` (parse's tuple) has a kernel image for a device of compute capability
    (major, minor)."""
    major, minor = capability
    for code in archs:
        kind, _, number = code.partition("_")
        number = int(number)
        if kind == "sm" and number // 10 == major and number % 10 <= minor:
            return True
        if kind == "compute" and number <= 10 * major + minor:
            return True
    return False


def describe(archs):
    cubins = [code for code in archs if code.startswith("sm_")]
    ptx = [code for code in archs if code.startswith("compute_")]
    return ", ".join(cubins) + (f" and PTX {', '.join(ptx)}" if ptx else "")


def device_reason(device, archs):
    """Why CUDA kernels built for `archs` cannot run on the CUDA `device` (a torch.device) of this
    machine, or None where they can. archs None (a build that does not record them): assumed to run."""
    if not torch.cuda.is_available():
        return "no CUDA device is available here (torch.cuda.is_available() is False)"
    index = device.index if device.index is not None else torch.cuda.current_device()
    count = torch.cuda.device_count()
    if index >= count:
        return f"there is no CUDA device {index} here ({count} present)"
    if archs is None:
        return None
    capability = torch.cuda.get_device_capability(index)
    if has_kernel_image(capability, archs):
        return None
    major, minor = capability
    return (f"kl_fused._C has no kernel image for this GPU's architecture sm_{major}{minor} (cuda:{index}): it was "
            f"built for {describe(archs) or 'no GPU'}; rebuild it with TORCH_CUDA_ARCH_LIST including {major}.{minor}")
