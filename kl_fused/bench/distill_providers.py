"""What `kl-fused-bench --distill` compares: the distillation step, hard cross-entropy on labels + the
weighted soft forward KL, from logits (LOGITS_PROVIDERS, loss functions of (student, teacher input,
labels)) and from hidden states (LINEAR_PROVIDERS, loss functions of the linear inputs and labels).

A provider `computes` either "step" (soft_weight * KL + hard_weight * CE) or "soft" (the soft term alone:
kl_fused's soft functions, the baseline of the step's cost). The teacher input is the dense teacher's
logits (or hidden states and weight) or its top-k slots (indices, log-probs), as `teacher` says.

Logits: (a) `eager`, F.cross_entropy + F.kl_div on fp32 log-softmaxes (top-k: TRL's server-distillation
forward KL instead of F.kl_div); (b) `compile`, torch.compile of (a); (c) `two-pass`, kl_div_logits (or
sparse_kl_div) + F.cross_entropy; `fused`, kl_fused.distillation_loss; `soft`, the soft function alone.
Linear: the materialised logits h W^T then (a), (b), (c); `linear`, kl_fused.linear_distillation_loss;
`linear-soft`, linear_kl_div (top-k: linear_distillation_loss without labels); (d) `liger`, Liger's
chunked LigerFusedLinearJSDLoss (plain PyTorch, CPU too; dense teacher as hidden states only) and `trl`,
TRL's chunked divergence for the soft term + F.cross_entropy on the student's materialised logits (TRL
has no hard term).
"""

from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable, Optional

import torch
import torch.nn.functional as F

import kl_fused
from kl_fused.bench.peers import import_failure

IGNORE = -100


@dataclass(frozen=True)
class DistillProvider:
    name: str
    description: str
    computes: str  # "step" or "soft"
    build: Callable  # (temperature, hard_weight, soft_weight, teacher form) -> loss function
    unavailable_reason: Callable[[str, torch.device], Optional[str]]  # (teacher form, device) -> why not, or None


def _always(teacher, device):
    return None


def _trl_server():
    from trl.experimental.server_distillation.server_distillation_trainer import ServerDistillationTrainer

    return ServerDistillationTrainer


def _trl_server_unavailable(teacher, device):
    return import_failure(_trl_server, "trl's server distillation") if teacher == "topk" else None


def _cross_entropy(student, labels):
    return F.cross_entropy(student.float().reshape(-1, student.shape[-1]), labels.reshape(-1), ignore_index=IGNORE)


def _soft_eager(student, teacher, labels, temperature, form):
    """The soft term the eager recipe computes: F.kl_div of fp32 log-softmaxes over the labelled rows,
    or TRL's server-distillation forward KL on the top-k slots."""
    log_q = F.log_softmax(student.float() / temperature, dim=-1)
    if form == "topk":
        trainer = _trl_server()
        stand_in = SimpleNamespace(loss_add_tail=True, _reduce_divergence_loss=trainer._reduce_divergence_loss)
        result = {"topk_logprobs": teacher[1], "topk_token_ids": teacher[0]}
        return trainer._compute_server_forward_kl_loss(stand_in, result, log_q, labels)
    keep = labels != IGNORE
    log_p = F.log_softmax(teacher.float() / temperature, dim=-1)
    rows = F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)
    return (rows * keep).sum() / keep.sum().clamp_min(1)


def _eager(T, hw, sw, form):
    return lambda s, t, y: sw * _soft_eager(s, t, y, T, form) + hw * _cross_entropy(s, y)


def _compiled(T, hw, sw, form):
    torch._dynamo.reset()  # one compilation per case
    return torch.compile(_eager(T, hw, sw, form), dynamic=False)


def _soft_fused(s, t, y, T, form):
    if form == "topk":
        return kl_fused.sparse_kl_div(s, t[0], t[1], temperature=T, mask=y != IGNORE)
    return kl_fused.kl_div_logits(s, t, temperature=T, mask=y != IGNORE)


def _two_pass(T, hw, sw, form):
    return lambda s, t, y: sw * _soft_fused(s, t, y, T, form) + hw * _cross_entropy(s, y)


def _fused(T, hw, sw, form):
    def step(s, t, y):
        teacher = dict(teacher_topk=t) if form == "topk" else dict(teacher_logits=t)
        return kl_fused.distillation_loss(s, **teacher, labels=y, temperature=T, soft_weight=sw, hard_weight=hw)

    return step


def _soft(T, hw, sw, form):
    return lambda s, t, y: _soft_fused(s, t, y, T, form)


LOGITS_PROVIDERS = {p.name: p for p in (
    DistillProvider("eager", "F.cross_entropy + F.kl_div of fp32 log-softmaxes (top-k: TRL's server KL) (a)", "step",
                    _eager, _trl_server_unavailable),
    DistillProvider("compile", "torch.compile of (a) (b)", "step", _compiled, _trl_server_unavailable),
    DistillProvider("two-pass", "kl_div_logits / sparse_kl_div + F.cross_entropy (c)", "step", _two_pass, _always),
    DistillProvider("fused", "kl_fused.distillation_loss", "step", _fused, _always),
    DistillProvider("soft", "the soft term alone: kl_div_logits / sparse_kl_div", "soft", _soft, _always),
)}


# ---------------------------------------------------------------------------------------------- linear


def _teacher_logits(inputs):
    with torch.no_grad():
        return inputs["teacher_hidden"] @ inputs["teacher_weight"].t()


def _teacher_input(inputs, form):
    return inputs["teacher_topk"] if form == "topk" else _teacher_logits(inputs)


def _materialized(build):
    def builder(T, hw, sw, form):
        fn = build(T, hw, sw, form)
        return lambda inputs, y: fn(inputs["student_hidden"] @ inputs["student_weight"].t(), _teacher_input(inputs, form),
                                    y)

    return builder


def _compiled_materialized(T, hw, sw, form):
    torch._dynamo.reset()
    return torch.compile(_materialized(_eager)(T, hw, sw, form), dynamic=False)


def _teacher_kwargs(inputs, form):
    if form == "topk":
        return dict(teacher_topk=inputs["teacher_topk"])
    return dict(teacher_hidden=inputs["teacher_hidden"], teacher_weight=inputs["teacher_weight"])


def _linear(T, hw, sw, form):
    return lambda inputs, y: kl_fused.linear_distillation_loss(
        inputs["student_hidden"], inputs["student_weight"], **_teacher_kwargs(inputs, form), labels=y, temperature=T,
        soft_weight=sw, hard_weight=hw)


def _linear_soft(T, hw, sw, form):
    if form == "topk":
        return lambda inputs, y: kl_fused.linear_distillation_loss(
            inputs["student_hidden"], inputs["student_weight"], **_teacher_kwargs(inputs, form), mask=y != IGNORE,
            temperature=T)
    return lambda inputs, y: kl_fused.linear_kl_div(inputs["student_hidden"], inputs["student_weight"],
                                                    **_teacher_kwargs(inputs, form), mask=y != IGNORE, temperature=T)


def _liger_class():
    from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

    return LigerFusedLinearJSDLoss


def _liger(T, hw, sw, form):
    # beta = 0: forward KL; Liger's defaults otherwise (its chunk accumulation torch.compile'd).
    loss_fn = _liger_class()(weight_hard_loss=hw, weight_soft_loss=sw, beta=0.0, temperature=T)
    return lambda inputs, y: loss_fn(inputs["student_hidden"], inputs["student_weight"], inputs["teacher_hidden"],
                                     inputs["teacher_weight"], y)


def _liger_unavailable(teacher, device):
    if teacher != "dense":
        return "Liger's chunked loss takes the teacher as hidden states only"
    return import_failure(_liger_class, "liger_kernel (the test extra installs it)")


def _trl_chunked():
    from trl.trainer.distillation_trainer import _chunked_divergence_loss

    return _chunked_divergence_loss


def _trl(T, hw, sw, form):
    def step(inputs, y):
        h, w = inputs["student_hidden"], inputs["student_weight"]
        loss, _, _ = _trl_chunked()(h, inputs["teacher_hidden"], w, inputs["teacher_weight"], (y != IGNORE).long(),
                                    beta=0.0, temperature=T)
        return sw * loss + hw * _cross_entropy(h @ w.t(), y)

    return step


def _trl_unavailable(teacher, device):
    if teacher != "dense":
        return "TRL's chunked divergence takes the teacher as hidden states only"
    return import_failure(_trl_chunked, "trl")


LINEAR_PROVIDERS = {p.name: p for p in (
    DistillProvider("materialized-eager", "logits h W^T, then (a)", "step", _materialized(_eager),
                    _trl_server_unavailable),
    DistillProvider("materialized-compile", "torch.compile of logits + (a) (b)", "step", _compiled_materialized,
                    _trl_server_unavailable),
    DistillProvider("materialized-two-pass", "logits h W^T, then (c)", "step", _materialized(_two_pass), _always),
    DistillProvider("linear", "kl_fused.linear_distillation_loss", "step", _linear, _always),
    DistillProvider("linear-soft", "the soft term alone: linear_kl_div (top-k: without labels)", "soft", _linear_soft,
                    _always),
    DistillProvider("liger", "Liger 0.8.5 LigerFusedLinearJSDLoss, beta 0 (d)", "step", _liger, _liger_unavailable),
    DistillProvider("trl", "TRL 1.16 chunked divergence (soft) + F.cross_entropy on h W^T (d)", "step", _trl,
                    _trl_unavailable),
)}
