"""kl_fused: a fused KL-divergence loss on logits for knowledge distillation."""

from kl_fused import distributed, reference
from kl_fused._ops import fused_unavailable_reason, is_fused_available
from kl_fused.api import kl_div_logits
from kl_fused.module import KLDivLogitsLoss
from kl_fused.sparse import sparse_kl_div, topk_teacher

__version__ = "0.1.0"
__all__ = ["kl_div_logits", "sparse_kl_div", "topk_teacher", "KLDivLogitsLoss", "is_fused_available", "fused_unavailable_reason", "reference", "distributed"]
