"""kl_fused inside TRL: a GKDTrainer whose generalized JSD is kl_fused.jsd_logits.

TRL's GKDTrainer computes its loss with the staticmethod `generalized_jsd_loss(student_logits,
teacher_logits, labels, beta, temperature, reduction, num_items_in_batch)`: two full log-softmaxes, a
stacked logsumexp mixture and two kl_divs over (B, T, V). Overriding that one method puts the fused
kernel (gradient computed in the forward, no (B, T, V) fp32 temporaries) under the rest of the trainer
unchanged:

    trainer = KLFusedGKDTrainer(model=student, teacher_model=teacher, args=GKDConfig(...), ...)

(copy the class into your code, or put this directory on sys.path and `from trl_gkd import
KLFusedGKDTrainer`). Same value and gradients as TRL's for labeled batches (tests/test_examples.py). One
difference by design: without labels, TRL's "batchmean" divides by the batch size B, kl_fused's by the
B x T tokens.

Run as a script, it trains a tiny Llama student against a tiny teacher for a few steps with TRL's own
GKDTrainer.compute_loss (teacher forward, causal shift, labels), and on every step evaluates that loss
with TRL's generalized_jsd_loss and with the fused one on the same batch: both values, their times, and
peak memory on a GPU:

    python examples/trl_gkd.py [--steps 5] [--beta 0.5] [--temperature 1.0]
"""

import argparse
import time
from types import SimpleNamespace

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


def tiny_llama(hidden, vocab, seed):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False, initializer_range=0.2)
    return LlamaForCausalLM(config)


def loss_and_gradients(trainer_class, student, teacher, inputs, beta, temperature):
    """TRL's GKDTrainer.compute_loss with `trainer_class`'s generalized_jsd_loss, forward + backward:
    (loss, seconds, peak bytes on a GPU or None). The student's gradients are left in .grad."""
    trainer = SimpleNamespace(teacher_model=teacher, beta=beta, temperature=temperature,
                              generalized_jsd_loss=trainer_class.generalized_jsd_loss)
    cuda = inputs["input_ids"].is_cuda
    student.zero_grad()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    loss = GKDTrainer.compute_loss(trainer, student, inputs)
    loss.backward()
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return loss.item(), seconds, (torch.cuda.max_memory_allocated() - base if cuda else None)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--beta", type=float, default=0.5, help="0: forward KL, 1: reverse KL, between: JSD")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--vocab", type=int, default=4096)
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    fused = kl_fused.will_run_fused(device, "jsd_logits")
    print(f"kl_fused fused kernels on {device}: {fused}"
          + ("" if fused else f" ({kl_fused.fused_unavailable_reason(device, 'jsd_logits')})"))
    student = tiny_llama(32, args.vocab, seed=1).to(device)
    teacher = tiny_llama(48, args.vocab, seed=2).to(device).requires_grad_(False)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(3)
    input_ids = torch.randint(0, args.vocab, (4, 32), generator=gen)
    labels = input_ids.clone()
    labels[:, :8] = -100  # the prompt does not count
    inputs = {"input_ids": input_ids.to(device), "attention_mask": torch.ones_like(input_ids).to(device),
              "labels": labels.to(device)}
    for step in range(1, args.steps + 1):
        trl = loss_and_gradients(GKDTrainer, student, teacher, inputs, args.beta, args.temperature)
        ours = loss_and_gradients(KLFusedGKDTrainer, student, teacher, inputs, args.beta, args.temperature)
        optimizer.step()  # with the fused loss's gradients
        memory = "" if ours[2] is None else f", peak {ours[2] / 2**20:.1f} MiB vs {trl[2] / 2**20:.1f} MiB"
        print(f"step {step}  loss {ours[0]:.5f} (TRL's {trl[0]:.5f})  "
              f"{ours[1] * 1e3:.1f} ms vs TRL's {trl[1] * 1e3:.1f} ms{memory}")
    if device == "cpu":
        print("(peak memory is measured on a GPU; kl-fused-bench --jsd measures the loss alone)")


if __name__ == "__main__":
    main()
