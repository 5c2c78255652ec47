"""Distil a small Llama-architecture student from a larger teacher with the Hugging Face Trainer and
kl_fused's fused linear distillation loss: one call takes both models' final hidden states and lm_head
weights and the labels, and computes the whole step -- the soft divergence from the teacher and the hard
cross-entropy on the labels -- so that neither model's (tokens x vocab) logits are ever built.

Both models come from `transformers` configs (nothing is downloaded). The teacher is first fitted
briefly to a fixed synthetic corpus (a repeating, noisy token pattern), so that it has something to
teach; then the student is trained on `soft_weight * D(teacher, student) + hard_weight * CE(labels)`
(forward KL or generalized JSD at temperature T, padding labelled -100), with the Trainer's
num_items_in_batch as the batchmean's count (gradient accumulation), and the loss falls step by step:

    python examples/distill_hf.py [--steps 40] [--loss kl|jsd] [--beta 0.5] [--hard-weight 0.5]
"""

import argparse
import tempfile

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments, TrainerCallback

import kl_fused

VOCAB = 512
SEQ_LEN = 32
CORPUS_SIZE = 256


def synthetic_corpus(seed=0):
    """Sequences of a noisy arithmetic pattern (next = (a * previous + b) mod V, sometimes random),
    each with some right padding: {input_ids, attention_mask} tensors."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.empty(CORPUS_SIZE, SEQ_LEN, dtype=torch.long)
    ids[:, 0] = torch.randint(0, VOCAB, (CORPUS_SIZE,), generator=gen)
    step = torch.randint(1, 8, (CORPUS_SIZE,), generator=gen)
    for position in range(1, SEQ_LEN):
        noise = torch.rand(CORPUS_SIZE, generator=gen) < 0.1
        following = (ids[:, position - 1] * 3 + step) % VOCAB
        ids[:, position] = torch.where(noise, torch.randint(0, VOCAB, (CORPUS_SIZE,), generator=gen), following)
    lengths = torch.randint(SEQ_LEN // 2, SEQ_LEN + 1, (CORPUS_SIZE,), generator=gen)
    attention_mask = (torch.arange(SEQ_LEN)[None, :] < lengths[:, None]).long()
    ids = ids.masked_fill(attention_mask == 0, 0)  # pad token 0
    labels = ids.masked_fill(attention_mask == 0, -100)  # as a causal LM takes them: unshifted, padding -100
    return [{"input_ids": i, "attention_mask": m, "labels": y} for i, m, y in zip(ids, attention_mask, labels)]


def llama(hidden, layers, heads, seed):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=SEQ_LEN,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config)


def fit_teacher(teacher, corpus, steps=60):
    """A short language-model fit of the teacher on the corpus (plain PyTorch), so that its
    distributions carry the pattern."""
    optimizer = torch.optim.AdamW(teacher.parameters(), lr=3e-3)
    batch = torch.stack([row["input_ids"] for row in corpus])
    mask = torch.stack([row["attention_mask"] for row in corpus])
    labels = batch.masked_fill(mask == 0, -100)
    teacher.train()
    for step in range(steps):
        rows = slice((step * 32) % CORPUS_SIZE, (step * 32) % CORPUS_SIZE + 32)
        loss = teacher(input_ids=batch[rows], attention_mask=mask[rows], labels=labels[rows]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


class DistillationTrainer(Trainer):
    """The Trainer with kl_fused's fused linear distillation loss in place of the language-model loss."""

    def __init__(self, *args, teacher, loss="kl", beta=0.5, temperature=2.0, hard_weight=0.5, **kwargs):
        super().__init__(*args, **kwargs)
        self.teacher, self.loss_name, self.beta, self.temperature = teacher, loss, beta, temperature
        self.hard_weight = hard_weight
        self.num_items_seen = []  # what the Trainer passed as num_items_in_batch, per step

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        input_ids, attention_mask = inputs["input_ids"], inputs["attention_mask"]
        # The final hidden states (after the last norm), which the lm_head would turn into logits.
        student_hidden = model.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        with torch.no_grad():
            teacher_hidden = self.teacher.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        # Position i predicts token i + 1: the last position does not count, padding is labelled -100 (the
        # shift is the caller's). Rows labelled -100 count for neither term and are never read.
        self.num_items_seen.append(num_items_in_batch)
        loss = kl_fused.linear_distillation_loss(
            student_hidden[:, :-1], model.lm_head.weight, teacher_hidden=teacher_hidden[:, :-1],
            teacher_weight=self.teacher.lm_head.weight, labels=inputs["labels"][:, 1:],
            divergence="jsd" if self.loss_name == "jsd" else "forward_kl", beta=self.beta,
            temperature=self.temperature, soft_weight=1.0, hard_weight=self.hard_weight,
            num_items_in_batch=num_items_in_batch)
        return (loss, None) if return_outputs else loss


class RecordGradients(TrainerCallback):
    """Records the gradient norms of the student's lm_head and of its first layer's attention at
    every step (before the optimizer consumes them), and the loss the Trainer logs."""

    def __init__(self, student):
        self.student = student
        self.grad_norms = []
        self.losses = []

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        body = self.student.model.layers[0].self_attn.q_proj.weight
        norms = {"lm_head": self.student.lm_head.weight.grad, "body": body.grad}
        self.grad_norms.append({name: (g.norm().item() if g is not None else 0.0) for name, g in norms.items()})

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(logs["loss"])


def collate(rows):
    return {key: torch.stack([row[key] for row in rows]) for key in rows[0]}


def fitted_teacher(seed=0, teacher_steps=60):
    """The teacher, fitted to the corpus of `seed` for `teacher_steps` steps."""
    return fit_teacher(llama(hidden=128, layers=2, heads=4, seed=seed + 1), synthetic_corpus(seed), teacher_steps)


def distil(steps=40, loss="kl", beta=0.5, temperature=2.0, seed=0, quiet=False, teacher_steps=60, hard_weight=0.5,
           record=None, teacher=None):
    """Fits the teacher (unless `teacher`, one fitted_teacher(seed) returned, is given), distils the student
    for `steps` steps; returns (losses per step, gradient norms per step). `record` (a dict), when given,
    receives the Trainer's num_items_in_batch per step."""
    corpus = synthetic_corpus(seed)
    teacher = teacher if teacher is not None else fitted_teacher(seed, teacher_steps)
    student = llama(hidden=64, layers=1, heads=2, seed=seed + 2)
    recorder = RecordGradients(student)
    with tempfile.TemporaryDirectory() as output_dir:
        args = TrainingArguments(output_dir=output_dir, max_steps=steps, per_device_train_batch_size=16,
                                 learning_rate=3e-3, lr_scheduler_type="constant", logging_steps=1, report_to=[],
                                 use_cpu=True, save_strategy="no", disable_tqdm=quiet, seed=seed,
                                 remove_unused_columns=False)
        trainer = DistillationTrainer(model=student, args=args, train_dataset=corpus, data_collator=collate,
                                      callbacks=[recorder], teacher=teacher, loss=loss, beta=beta, temperature=temperature,
                                      hard_weight=hard_weight)
        trainer.train()
    if record is not None:
        record["num_items_in_batch"] = trainer.num_items_seen
    return recorder.losses, recorder.grad_norms


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--loss", choices=("kl", "jsd"), default="kl")
    parser.add_argument("--beta", type=float, default=0.5, help="JSD coefficient (with --loss jsd)")
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--hard-weight", type=float, default=0.5, help="weight of the cross-entropy on the labels")
    args = parser.parse_args(argv)
    losses, _ = distil(args.steps, args.loss, args.beta, args.temperature, quiet=True, hard_weight=args.hard_weight)
    for step, value in enumerate(losses, start=1):
        print(f"step {step:3d}  distillation loss {value:.4f}")
    print(f"loss fell from {losses[0]:.4f} to {losses[-1]:.4f} over {len(losses)} steps")


if __name__ == "__main__":
    main()
