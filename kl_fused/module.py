"""The losses as nn.Modules: KLDivLogitsLoss (kl_div_logits), LinearKLDivLoss (linear_kl_div)."""

import torch

from kl_fused._validate import DIRECTIONS, REDUCTIONS
from kl_fused.api import kl_div_logits
from kl_fused.linear import linear_kl_div


class KLDivLogitsLoss(torch.nn.Module):
    """Distillation loss on logits; see kl_fused.kl_div_logits for the contract."""

    def __init__(self, temperature=1.0, reduction="batchmean", direction="forward"):
        super().__init__()
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
            raise TypeError(f"temperature must be a Python number, got {type(temperature).__name__}")
        if not (temperature > 0 and temperature != float("inf")):
            raise ValueError(f"temperature must be finite and > 0, got {temperature}")
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


class LinearKLDivLoss(KLDivLogitsLoss):
    """Distillation loss from hidden states and the output layer; see kl_fused.linear_kl_div. The
    logit post-processing of the two models (scales, softcaps) and chunk_rows are options of the module."""

    def __init__(self, temperature=1.0, reduction="batchmean", direction="forward", *, chunk_rows=None,
                 student_logit_scale=1.0, teacher_logit_scale=1.0, student_softcap=None, teacher_softcap=None):
        super().__init__(temperature=temperature, reduction=reduction, direction=direction)
        self.options = dict(chunk_rows=chunk_rows, student_logit_scale=student_logit_scale,
                            teacher_logit_scale=teacher_logit_scale, student_softcap=student_softcap,
                            teacher_softcap=teacher_softcap)

    def forward(self, student_hidden, student_weight, teacher_logits=None, *, teacher_hidden=None, teacher_weight=None,
                student_bias=None, teacher_bias=None, mask=None):
        return linear_kl_div(
            student_hidden, student_weight, teacher_logits, teacher_hidden=teacher_hidden, teacher_weight=teacher_weight,
            student_bias=student_bias, teacher_bias=teacher_bias, temperature=self.temperature,
            reduction=self.reduction, direction=self.direction, mask=mask, **self.options)
