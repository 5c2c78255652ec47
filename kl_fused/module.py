"""The losses as nn.Modules: KLDivLogitsLoss (kl_fused.kl_div_logits) and JSDLogitsLoss
(kl_fused.jsd_logits). Options are checked when the module is built, with the functions' checks."""

import torch

from kl_fused._validate import check_beta, check_direction, check_reduction, check_temperature
from kl_fused.api import kl_div_logits
from kl_fused.jsd import jsd_logits


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
