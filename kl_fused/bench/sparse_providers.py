"""What `kl-fused-bench --sparse` compares, each a loss function of (student logits, teacher) where the
teacher is what that provider trains from: K (index, log-prob) slots, or the full logits for `dense`.

(a) `trl-eager` is TRL's own server-distillation forward KL (trl 1.16,
ServerDistillationTrainer._compute_server_forward_kl_loss, beta = 0), called as the trainer calls it
on an fp32 log_softmax of the student; (b) `trl-compile` is torch.compile of (a); (c) `fused` is
kl_fused.sparse_kl_div; (d) `dense` is kl_fused.kl_div_logits on the full teacher logits, for
context (what the same step costs when the teacher's whole row is at hand).
"""

import functools
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable, Optional

import torch
import torch.nn.functional as F

import kl_fused


@dataclass(frozen=True)
class SparseProvider:
    name: str
    description: str
    build: Callable[[float, str], Callable]  # (temperature, tail) -> loss function of (student, teacher)
    dense: bool  # trains from the full teacher logits instead of the K slots
    unavailable_reason: Callable[[torch.device], Optional[str]]


def _always_available(device):
    return None


def _trl_trainer():
    from trl.experimental.server_distillation.server_distillation_trainer import ServerDistillationTrainer

    return ServerDistillationTrainer


def _trl_unavailable_reason(device):
    try:
        _trl_trainer()
    except Exception as error:  # ImportError, or a dependency of trl failing underneath it
        return f"trl's server distillation is not importable ({type(error).__name__}: {error})"
    return None


def _build_trl(temperature, tail):
    trainer = _trl_trainer()
    stand_in = SimpleNamespace(loss_add_tail=tail == "bucket", _reduce_divergence_loss=trainer._reduce_divergence_loss)

    def trl_eager(student, slots):
        indices, logprobs = slots
        student_log_probs = F.log_softmax(student.float() / temperature, dim=-1)
        labels = torch.zeros(student.shape[:-1], dtype=torch.long, device=student.device)  # every token counts
        teacher_result = {"topk_logprobs": logprobs, "topk_token_ids": indices}
        return trainer._compute_server_forward_kl_loss(stand_in, teacher_result, student_log_probs, labels)

    return trl_eager


def _build_trl_compile(temperature, tail):
    # A fresh Dynamo cache per case: one compilation each (TRL's boolean-mask reduction breaks the
    # graph once; the rest compiles).
    torch._dynamo.reset()
    return torch.compile(_build_trl(temperature, tail), dynamic=False)


def _build_fused(temperature, tail):
    def fused(student, slots):
        indices, logprobs = slots
        return kl_fused.sparse_kl_div(student, indices, logprobs, temperature=temperature, tail=tail)

    return fused


def _build_dense(temperature, tail):
    return functools.partial(kl_fused.kl_div_logits, temperature=temperature)


SPARSE_PROVIDERS = {
    provider.name: provider
    for provider in (
        SparseProvider("trl-eager", "TRL 1.16's server-distillation forward KL on an fp32 log_softmax", _build_trl,
                       False, _trl_unavailable_reason),
        SparseProvider("trl-compile", "torch.compile of trl-eager", _build_trl_compile, False, _trl_unavailable_reason),
        SparseProvider("fused", "kl_fused.sparse_kl_div", _build_fused, False, _always_available),
        SparseProvider("dense", "kl_fused.kl_div_logits on the full teacher logits", _build_dense, True,
                       _always_available),
    )
}
