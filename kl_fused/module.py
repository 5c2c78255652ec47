"""KLDivLogitsLoss: kl_fused.kl_div_logits as an nn.Module."""

import torch

from kl_fused._validate import DIRECTIONS, REDUCTIONS
from kl_fused.api import kl_div_logits


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
