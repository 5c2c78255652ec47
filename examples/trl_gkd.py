"""kl_fused inside TRL: a GKDTrainer whose generalized JSD is kl_fused.jsd_logits.

TRL's GKDTrainer computes its loss with the staticmethod `generalized_jsd_loss(student_logits,
teacher_logits, labels, beta, temperature, reduction, num_items_in_batch)`: two full log-softmaxes, a
stacked logsumexp mixture and two kl_divs over (B, T, V). Overriding that one method puts the fused
kernel (gradient computed in the forward, no (B, T, V) fp32 temporaries) under the rest of the trainer
unchanged:

    from examples.trl_gkd import KLFusedGKDTrainer      # or paste the class
    trainer = KLFusedGKDTrainer(model=student, teacher_model=teacher, args=GKDConfig(...), ...)

Same value and gradients as TRL's for labeled batches (tests/test_examples.py). One difference by
design: without labels, TRL's "batchmean" divides by the batch size B, kl_fused's by the B x T tokens.
"""

import torch
from trl.experimental.gkd import GKDTrainer

import kl_fused


class KLFusedGKDTrainer(GKDTrainer):
    @staticmethod
    def generalized_jsd_loss(student_logits, teacher_logits, labels=None, beta=0.5, temperature=1.0,
                             reduction="batchmean", num_items_in_batch=None):
        mask = labels != -100 if labels is not None else None
        if num_items_in_batch is not None:  # gradient accumulation: normalise by the global token count
            total = kl_fused.jsd_logits(student_logits, teacher_logits, beta=beta, temperature=temperature,
                                        reduction="sum", mask=mask)
            if isinstance(num_items_in_batch, torch.Tensor):
                num_items_in_batch = num_items_in_batch.to(total.device)
            return total / num_items_in_batch
        return kl_fused.jsd_logits(student_logits, teacher_logits, beta=beta, temperature=temperature,
                                   reduction=reduction, mask=mask)
