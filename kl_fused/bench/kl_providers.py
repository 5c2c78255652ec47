"""The implementations the benchmark compares, each a loss function of (student, teacher) logits.

Every provider computes the same quantity, KL(softmax(t/T) || softmax(s/T)) averaged over rows
(for 2-D input, F.kl_div's batchmean equals kl_fused's). A provider is built once per case and
pass, so that `compile` compiles exactly once for the shapes, dtype and grad mode it is timed on.
"""

import functools
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

import kl_fused
from kl_fused import reference
from kl_fused.bench.peers import cuda_peer_failure, fp32_log_probs

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Provider:
    name: str
    description: str
    build: Callable[[float], LossFn]  # temperature -> loss function of (student, teacher)
    unavailable_reason: Callable[[torch.device], Optional[str]]


def _always_available(device):
    return None


def _build_fused(temperature):
    return functools.partial(kl_fused.kl_div_logits, temperature=temperature)


def _build_reference(temperature):
    return functools.partial(reference.kl_div_logits, temperature=temperature)


def _build_eager(temperature):
    def eager(student, teacher):
        log_q, log_p = fp32_log_probs(student, teacher, temperature)
        return F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")

    return eager


def _build_compile(temperature):
    # A fresh Dynamo cache per case and pass: one compilation each, and no sweep can run into the
    # recompile limit and silently fall back to eager.
    torch._dynamo.reset()
    return torch.compile(_build_reference(temperature), dynamic=False)


def _liger_loss_class():
    from liger_kernel.transformers.kl_div import LigerKLDIVLoss

    return LigerKLDIVLoss


def _liger_unavailable_reason(device):
    return cuda_peer_failure(device, _liger_loss_class, "liger_kernel")


def _build_liger(temperature):
    liger_kl = _liger_loss_class()(reduction="batchmean", log_target=True)

    def liger(student, teacher):
        return liger_kl(*fp32_log_probs(student, teacher, temperature))

    return liger


PROVIDERS = {
    provider.name: provider
    for provider in (
        Provider("fused", "kl_fused.kl_div_logits", _build_fused, _always_available),
        Provider("eager", "F.kl_div of two fp32 F.log_softmax", _build_eager, _always_available),
        Provider("compile", "torch.compile of the reference", _build_compile, _always_available),
        Provider("reference", "kl_fused.reference.kl_div_logits", _build_reference, _always_available),
        Provider("liger", "LigerKLDIVLoss of two fp32 log_softmax", _build_liger, _liger_unavailable_reason),
    )
}
