"""The implementations the --jsd mode compares, each a loss function of (student, teacher) logits
for one beta: the generalized JSD of GKD, batchmean over rows, as TRL's GKDTrainer defines it
(beta = 0 forward KL, beta = 1 reverse KL, m = beta p + (1 - beta) q with p the teacher)."""

import functools
import os
from dataclasses import dataclass
from typing import Callable, Optional

import torch

import kl_fused
from kl_fused.bench.peers import cuda_peer_failure, fp32_log_probs, import_failure

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Provider:
    name: str
    description: str
    build: Callable[[float, float], LossFn]  # (beta, temperature) -> loss function of (student, teacher)
    unavailable_reason: Callable[[torch.device], Optional[str]]


def _trl_loss():
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from trl.experimental.gkd import GKDTrainer

    return GKDTrainer.generalized_jsd_loss


def _trl_unavailable_reason(device):
    return import_failure(_trl_loss, "trl")


def _always_available(device):
    return None


def _build_fused(beta, temperature):
    return functools.partial(kl_fused.jsd_logits, beta=beta, temperature=temperature)


def _build_eager(beta, temperature):
    trl_loss = _trl_loss()

    def eager(student, teacher):
        # In fp32, as the KL mode's eager provider: TRL computes in the input dtype, and bf16
        # log-softmaxes miss the float64 reference by more than the agreement check allows.
        return trl_loss(student.float(), teacher.float(), beta=beta, temperature=temperature)

    return eager


def _build_compile(beta, temperature):
    torch._dynamo.reset()  # one compilation per case, beta and pass (see kl_providers.py)
    return torch.compile(_build_eager(beta, temperature), dynamic=False)


def _liger_jsd_class():
    from liger_kernel.transformers.jsd import LigerJSD

    return LigerJSD


def _liger_unavailable_reason(device):
    return cuda_peer_failure(device, _liger_jsd_class, "liger_kernel")


def _build_liger(beta, temperature):
    if beta in (0.0, 1.0):
        raise ValueError("LigerJSD takes 0 < beta < 1")
    liger_jsd = _liger_jsd_class()(beta=beta)

    def liger(student, teacher):
        return liger_jsd(*fp32_log_probs(student, teacher, temperature))

    return liger


PROVIDERS = {
    provider.name: provider
    for provider in (
        Provider("fused", "kl_fused.jsd_logits", _build_fused, _always_available),
        Provider("eager", "TRL 1.16 GKDTrainer.generalized_jsd_loss on fp32 logits", _build_eager, _trl_unavailable_reason),
        Provider("compile", "torch.compile of the same TRL function", _build_compile, _trl_unavailable_reason),
        Provider("liger", "LigerJSD of two fp32 log_softmax", _build_liger, _liger_unavailable_reason),
    )
}
