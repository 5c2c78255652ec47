"""Which GPUs a build covers (kl_fused/_cuda_archs.py, setup.py's default TORCH_CUDA_ARCH_LIST) and what
happens on the others: is_fused_available reports what was built, will_run_fused whether a call runs
the kernel, and a CUDA device without a kernel image takes the reference with a warning that says why.
There is no GPU here: the device (its presence and compute capability) and the build are faked."""

import warnings

import pytest
import torch

import kl_fused
from kl_fused import _cuda_archs, _ops, _warn_once

import cuda_resources

DEFAULT_CODES = cuda_resources.BUILT_CODES


@pytest.mark.parametrize("capability, covered", [
    ((8, 0), True), ((8, 6), True), ((8, 9), True),     # A100; RTX 30xx, A10; RTX 40xx, L4, L40 (sm_80 cubin)
    ((9, 0), True),                                     # H100, H200
    ((10, 0), True), ((10, 3), True),                   # B200, GB200; B300 (sm_100 cubin)
    ((12, 0), True), ((12, 1), True),                   # RTX 50xx, RTX PRO 6000; DGX Spark (sm_120 cubin)
    ((13, 0), True),                                    # a future GPU: the driver compiles the compute_120 PTX
    ((7, 5), False), ((11, 0), False),                  # T4 (Turing); Thor: no cubin, older than the PTX
])
def test_the_default_build_covers_ampere_hopper_and_blackwell(capability, covered):
    assert DEFAULT_CODES == ("sm_80", "sm_90", "sm_100", "sm_120", "compute_120")
    assert _cuda_archs.has_kernel_image(capability, DEFAULT_CODES) == covered


def test_kernel_image_rules():
    assert _cuda_archs.has_kernel_image((8, 6), ("sm_80",)) and not _cuda_archs.has_kernel_image((8, 0), ("sm_86",))
    assert not _cuda_archs.has_kernel_image((10, 0), ("sm_80", "sm_90")), "the old default: no Blackwell kernel"
    assert _cuda_archs.has_kernel_image((10, 0), ("sm_80", "compute_90")) and not _cuda_archs.has_kernel_image(
        (8, 9), ("compute_90",))
    assert _cuda_archs.parse("") == () and _cuda_archs.parse(None) is None
    assert _cuda_archs.parse("sm_80,compute_90") == ("sm_80", "compute_90")


def test_the_extension_records_what_it_was_built_for():
    recorded = _ops._C.cuda_archs
    if "cuda" in _ops.FUSED_DEVICE_TYPES:
        assert _cuda_archs.parse(recorded), "a CUDA build names its architectures"
    else:
        assert recorded == "", "a CPU-only build has no GPU code"


@pytest.fixture
def cuda_build(monkeypatch):
    """A build with CUDA kernels for every op, for the default architectures."""
    for op in list(_ops._DEVICE_TYPES):
        monkeypatch.setitem(_ops._DEVICE_TYPES, op, _ops._DEVICE_TYPES[op] | {"cuda"})
    monkeypatch.setattr(_ops, "BUILT_CUDA_ARCHS", DEFAULT_CODES)
    monkeypatch.setattr(_ops, "SHARD_DEVICE_TYPES", _ops.SHARD_DEVICE_TYPES | {"cuda"})


def fake_gpu(monkeypatch, capability, count=1):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)


def test_built_is_not_runnable_without_a_gpu(cuda_build, monkeypatch):
    fake_gpu(monkeypatch, None, count=0)
    assert kl_fused.is_fused_available("cuda"), "is_fused_available reports what was built (unchanged)"
    assert not kl_fused.will_run_fused("cuda") and not kl_fused.will_run_fused(torch.device("cuda", 0))
    assert "no CUDA device is available" in kl_fused.fused_unavailable_reason("cuda")
    assert kl_fused.will_run_fused(torch.zeros(1)) and kl_fused.will_run_fused("cpu", op="sparse_kl_div")
    assert not kl_fused.will_run_fused(torch.zeros(1, device="meta"))


@pytest.mark.parametrize("op", ["kl_div_logits", "jsd_logits", "sparse_kl_div", "linear_kl_div", "linear_jsd",
                                "distillation_loss", "linear_distillation_loss"])
def test_a_gpu_without_a_kernel_image_takes_the_reference_and_says_why_once(cuda_build, monkeypatch, op):
    fake_gpu(monkeypatch, (7, 5), count=2)
    device = torch.device("cuda", 1)
    assert kl_fused.is_fused_available(device, op) and not kl_fused.will_run_fused(device, op)
    assert not kl_fused.will_run_fused("cuda:2", op), "no such device"
    _warn_once.forget((op, "cuda"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not _ops.fused_path(op, device) and not _ops.fused_path(op, device)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1, messages
    assert (f"no fused kernel for {op} on device 'cuda:1'" in messages[0] and "sm_75" in messages[0]
            and "built for sm_80, sm_90, sm_100, sm_120 and PTX compute_120" in messages[0]
            and "TORCH_CUDA_ARCH_LIST including 7.5" in messages[0]), messages[0]
    assert not _ops.shard_kernels_reason("cpu") and "sm_75" in _ops.shard_kernels_reason(device)


@pytest.mark.parametrize("capability", [(8, 9), (9, 0), (10, 3), (12, 0), (13, 0)])
def test_a_covered_gpu_runs_the_kernels(cuda_build, monkeypatch, capability):
    fake_gpu(monkeypatch, capability)
    assert kl_fused.will_run_fused("cuda") and kl_fused.fused_unavailable_reason("cuda:0") is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _ops.fused_path("kl_div_logits", torch.device("cuda", 0))
