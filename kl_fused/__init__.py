"""kl_fused: fused distillation losses on logits (KL divergence, generalized Jensen-Shannon, sparse top-k
teachers, and the whole distillation step with the hard cross-entropy)."""

from kl_fused import distributed, reference
from kl_fused._ops import fused_unavailable_reason, is_fused_available, will_run_fused
from kl_fused.api import kl_div_logits
from kl_fused.distill import LossParts, distillation_loss
from kl_fused.jsd import jsd_logits
from kl_fused.linear import linear_distillation_loss, linear_jsd, linear_kl_div
from kl_fused.module import (DistillationLoss, JSDLogitsLoss, KLDivLogitsLoss, LinearDistillationLoss,
                             LinearKLDivLoss)
from kl_fused.sparse import sparse_kl_div, topk_teacher

__version__ = "0.1.0"
__all__ = ["kl_div_logits", "KLDivLogitsLoss", "jsd_logits", "JSDLogitsLoss", "sparse_kl_div", "topk_teacher",
           "linear_kl_div", "LinearKLDivLoss", "linear_jsd", "distillation_loss", "DistillationLoss",
           "linear_distillation_loss", "LinearDistillationLoss", "LossParts", "is_fused_available", "will_run_fused",
           "fused_unavailable_reason", "reference", "distributed"]
