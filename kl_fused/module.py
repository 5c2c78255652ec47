"""The losses as nn.Modules: KLDivLogitsLoss (kl_div_logits), JSDLogitsLoss (jsd_logits), LinearKLDivLoss
(linear_kl_div), DistillationLoss (distillation_loss) and LinearDistillationLoss (linear_distillation_loss).
Options are checked when the module is built, with the functions' checks."""

import torch

from kl_fused._distill_args import check_options
from kl_fused._validate import check_beta, check_direction, check_reduction, check_temperature
from kl_fused.api import kl_div_logits
from kl_fused.distill import distillation_loss
from kl_fused.jsd import jsd_logits
from kl_fused.linear import check_linear_options, linear_distillation_loss, linear_kl_div


class KLDivLogitsLoss(torch.nn.Module):
    """Distillation loss on logits; see kl_fused.kl_div_logits for the contract."""

    def __init__(self, temperature=1.0, reduction="batchmean", direction="forward"):
        super().__init__()
        check_reduction(reduction)
        check_direction(direction)
        check_temperature(temperature)
        self.temperature = float(temperature)
        self.reduction = reduction
        self.direction = direction

    def forward(self, student_logits, teacher_logits, mask=None):
        return kl_div_logits(
            student_logits,
            teacher_logits,
            temperature=self.temperature,
            reduction=self.reduction,
            direction=self.direction,
            mask=mask,
        )

    def extra_repr(self):
        return f"temperature={self.temperature}, reduction={self.reduction!r}, direction={self.direction!r}"


class JSDLogitsLoss(torch.nn.Module):
    """Generalized Jensen-Shannon divergence on logits (GKD); see kl_fused.jsd_logits for the contract."""

    def __init__(self, beta=0.5, temperature=1.0, reduction="batchmean"):
        super().__init__()
        check_beta(beta)
        check_temperature(temperature)
        check_reduction(reduction)
        self.beta = float(beta)
        self.temperature = float(temperature)
        self.reduction = reduction

    def forward(self, student_logits, teacher_logits, mask=None):
        return jsd_logits(
            student_logits,
            teacher_logits,
            beta=self.beta,
            temperature=self.temperature,
            reduction=self.reduction,
            mask=mask,
        )

    def extra_repr(self):
        return f"beta={self.beta}, temperature={self.temperature}, reduction={self.reduction!r}"


class LinearKLDivLoss(KLDivLogitsLoss):
    """Distillation loss from hidden states and the output layer; see kl_fused.linear_kl_div. The
    logit post-processing of the two models (scales, softcaps) and chunk_rows are options of the module."""

    def __init__(self, temperature=1.0, reduction="batchmean", direction="forward", *, chunk_rows=None,
                 student_logit_scale=1.0, teacher_logit_scale=1.0, student_softcap=None, teacher_softcap=None):
        super().__init__(temperature=temperature, reduction=reduction, direction=direction)
        check_linear_options(chunk_rows, student_logit_scale, teacher_logit_scale, student_softcap, teacher_softcap)
        self.options = dict(chunk_rows=chunk_rows, student_logit_scale=student_logit_scale,
                            teacher_logit_scale=teacher_logit_scale, student_softcap=student_softcap,
                            teacher_softcap=teacher_softcap)

    def forward(self, student_hidden, student_weight, teacher_logits=None, *, teacher_hidden=None, teacher_weight=None,
                student_bias=None, teacher_bias=None, mask=None):
        return linear_kl_div(
            student_hidden, student_weight, teacher_logits, teacher_hidden=teacher_hidden, teacher_weight=teacher_weight,
            student_bias=student_bias, teacher_bias=teacher_bias, temperature=self.temperature,
            reduction=self.reduction, direction=self.direction, mask=mask, **self.options)

    def extra_repr(self):
        return ", ".join([super().extra_repr()] + [f"{name}={value!r}" for name, value in self.options.items()])

class DistillationLoss(torch.nn.Module):
    """The distillation step's loss on logits; see kl_fused.distillation_loss for the contract. Every
    keyword of the function except the tensors is an option of the module."""

    def __init__(self, *, divergence="forward_kl", beta=0.5, tail="bucket", temperature=1.0, soft_weight=1.0,
                 hard_weight=0.0, ignore_index=-100, label_smoothing=0.0, reduction="batchmean", return_parts=False,
                 validate=True):
        super().__init__()
        check_options(divergence, beta, tail, temperature, soft_weight, hard_weight, ignore_index, label_smoothing,
                      reduction, validate)
        if not isinstance(return_parts, bool):
            raise TypeError(f"return_parts must be a bool, got {type(return_parts).__name__}")
        self.options = dict(divergence=divergence, beta=beta, tail=tail, temperature=temperature,
                            soft_weight=soft_weight, hard_weight=hard_weight, ignore_index=ignore_index,
                            label_smoothing=label_smoothing, reduction=reduction, return_parts=return_parts,
                            validate=validate)

    def forward(self, student_logits, teacher_logits=None, *, teacher_topk=None, labels=None, mask=None,
                num_items_in_batch=None):
        return distillation_loss(student_logits, teacher_logits, teacher_topk=teacher_topk, labels=labels, mask=mask,
                                 num_items_in_batch=num_items_in_batch, **self.options)

    def extra_repr(self):
        return ", ".join(f"{name}={value!r}" for name, value in self.options.items())


class LinearDistillationLoss(DistillationLoss):
    """The distillation step's loss from hidden states and output layers; see
    kl_fused.linear_distillation_loss. chunk_rows and the two models' logit scales and softcaps are
    options of the module too."""

    def __init__(self, *, chunk_rows=None, student_logit_scale=1.0, teacher_logit_scale=1.0, student_softcap=None,
                 teacher_softcap=None, **options):
        super().__init__(**options)
        check_linear_options(chunk_rows, student_logit_scale, teacher_logit_scale, student_softcap, teacher_softcap)
        self.options.update(chunk_rows=chunk_rows, student_logit_scale=student_logit_scale,
                            teacher_logit_scale=teacher_logit_scale, student_softcap=student_softcap,
                            teacher_softcap=teacher_softcap)

    def forward(self, student_hidden, student_weight, teacher_logits=None, *, teacher_hidden=None, teacher_weight=None,
                teacher_topk=None, labels=None, student_bias=None, teacher_bias=None, mask=None,
                num_items_in_batch=None):
        return linear_distillation_loss(
            student_hidden, student_weight, teacher_logits, teacher_hidden=teacher_hidden,
            teacher_weight=teacher_weight, teacher_topk=teacher_topk, labels=labels, student_bias=student_bias,
            teacher_bias=teacher_bias, mask=mask, num_items_in_batch=num_items_in_batch, **self.options)
