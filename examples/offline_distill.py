"""Offline distillation end to end: the teacher runs once over the corpus, its top-k log-probabilities
per token go into a store, and a student trains from the store without the teacher in memory.

1. A JSONL corpus is written, and a small random-initialised Llama teacher, fitted briefly to it
   (so that it has something to teach), is saved with a word-level tokenizer to a local directory
   (nothing is downloaded).
2. `kl-fused-cache build` runs the teacher over the corpus and stores its top-k per token.
3. A smaller student trains from a DataLoader (2 workers) over kl_fused.cache.TeacherCache, with
   hard cross-entropy on the labels plus the sparse KL to the stored teacher; the loss falls.

    python examples/offline_distill.py [--steps 40] [--k 16] [--workdir DIR] [--packed]
"""

import argparse
import json
import os
import random
import shlex
import tempfile

import torch
from torch.utils.data import DataLoader

import kl_fused
from kl_fused.cache import TeacherCache
from kl_fused.cache.cli import main as kl_fused_cache

SUBJECTS = ["the cat", "a dog", "my friend", "the teacher", "a student", "the bird", "our neighbour"]
VERBS = ["sees", "likes", "follows", "finds", "helps", "watches"]
OBJECTS = ["the ball", "a book", "the garden", "a small house", "the river", "an old tree"]
ENDINGS = ["today", "every morning", "in the rain", "after lunch", "again and again"]
SPECIAL = ["[PAD]", "[UNK]", "[BOS]"]
IGNORE_INDEX = -100


def write_corpus(path, lines, seed=0):
    """A JSONL file of `lines` records {"text": ...}: short sentences of a tiny grammar."""
    rng = random.Random(seed)
    with open(path, "w") as out:
        for _ in range(lines):
            sentences = [f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)} {rng.choice(ENDINGS)} ."
                         for _ in range(rng.randint(1, 3))]
            out.write(json.dumps({"text": " ".join(sentences)}) + "\n")


def save_tokenizer(directory):
    """A word-level tokenizer of the grammar's words, saved as a transformers tokenizer; returns it."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = sorted({word for phrase in SUBJECTS + VERBS + OBJECTS + ENDINGS for word in phrase.split()} | {"."})
    vocab = {token: number for number, token in enumerate(SPECIAL + words)}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.post_processor = processors.TemplateProcessing(single="[BOS] $A", special_tokens=[("[BOS]", 2)])
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="[PAD]", unk_token="[UNK]",
                                      bos_token="[BOS]")
    wrapped.save_pretrained(directory)
    return wrapped


def llama(vocab_size, hidden, layers, seed):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=256, tie_word_embeddings=False, initializer_range=0.1)
    return LlamaForCausalLM(config)


def read_corpus(path, tokenizer, max_length):
    """{line number: token ids} of the JSONL corpus, tokenized as `kl-fused-cache build` does."""
    tokens = {}
    with open(path) as lines:
        for number, line in enumerate(lines):
            if line.strip():
                tokens[number] = tokenizer(json.loads(line)["text"], truncation=True, max_length=max_length)["input_ids"]
    return tokens


def fit(model, tokens, steps, batch_size=16, seed=0):
    """A short language-model fit on the corpus (plain PyTorch)."""
    gen = torch.Generator().manual_seed(seed)
    sequences = list(tokens.values())
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(steps):
        chosen = [sequences[i] for i in torch.randint(len(sequences), (batch_size,), generator=gen).tolist()]
        longest = max(len(ids) for ids in chosen)
        input_ids = torch.zeros(batch_size, longest, dtype=torch.long)
        labels = torch.full((batch_size, longest), IGNORE_INDEX, dtype=torch.long)
        for row, ids in enumerate(chosen):
            input_ids[row, : len(ids)] = labels[row, : len(ids)] = torch.tensor(ids)
        model(input_ids=input_ids, attention_mask=(labels != IGNORE_INDEX).long(), labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def save_teacher(directory, corpus, max_length, steps=30, seed=0):
    """A random-initialised Llama teacher, fitted for `steps` steps to the corpus, and its tokenizer,
    saved to `directory`; returns the vocabulary size."""
    tokenizer = save_tokenizer(directory)
    teacher = llama(len(tokenizer), hidden=64, layers=2, seed=seed)
    fit(teacher, read_corpus(corpus, tokenizer, max_length), steps, seed=seed).save_pretrained(directory)
    return len(tokenizer)


class Batches:
    """The DataLoader's collate_fn, run in its workers: a list of sequence ids -> the step's batch.

    Tokens come from the corpus (tokenized as the store was); the teacher's top-k from the store,
    rows 1 .. S of each sequence (offset=1), which pair with labels = tokens 1 .. S and the student's
    logits at positions 0 .. S - 1."""

    def __init__(self, cache, tokens, length, pad_id):
        self.cache, self.tokens, self.length, self.pad_id = cache, tokens, length, pad_id

    def __call__(self, sequence_ids):
        count, steps = len(sequence_ids), self.length
        input_ids = torch.full((count, steps), self.pad_id, dtype=torch.long)
        labels = torch.full((count, steps), IGNORE_INDEX, dtype=torch.long)
        for row, sequence_id in enumerate(sequence_ids):
            tokens = torch.tensor(self.tokens[sequence_id][: steps + 1])
            input_ids[row, : len(tokens) - 1] = tokens[:-1]
            labels[row, : len(tokens) - 1] = tokens[1:]
        return {"input_ids": input_ids, "attention_mask": (labels != IGNORE_INDEX).long(), "labels": labels,
                "teacher_topk": self.cache.batch(sequence_ids, length=steps, offset=1)}


def distillation_loss(student, batch, *, temperature, hard_weight, soft_weight=1.0):
    """One step's loss: hard_weight * CE(student, labels) + soft_weight * KL(stored teacher || student)
    over the labelled tokens, and its two parts (detached) for the log.

    kl_fused.linear_distillation_loss computes both terms from the student's last hidden states and its
    output layer, a chunk of rows at a time, without building the logits; the bucket tail of the sparse
    KL; the teacher's top-k carry the store's vocabulary, which the loss checks against the student's."""
    hidden = student.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    return kl_fused.linear_distillation_loss(hidden, student.lm_head.weight, teacher_topk=batch["teacher_topk"],
                                             labels=batch["labels"], hard_weight=hard_weight, soft_weight=soft_weight,
                                             temperature=temperature, tail="bucket", return_parts=True)


def train(store, corpus, tokenizer, steps, batch_size, length, hard_weight, seed=0, workers=2, log=print):
    """Train a student from the store for `steps` steps; returns the losses, one per step."""
    cache = TeacherCache(store)
    tokens = read_corpus(corpus, tokenizer, length + 1)
    student = llama(cache.vocab_size, hidden=32, layers=1, seed=seed + 1)
    optimizer = torch.optim.AdamW(student.parameters(), lr=3e-3)
    loader = DataLoader(cache.sequence_ids, batch_size=batch_size, shuffle=True, num_workers=workers,
                        collate_fn=Batches(cache, tokens, length, tokenizer.pad_token_id),
                        generator=torch.Generator().manual_seed(seed), persistent_workers=workers > 0)
    losses = []
    while len(losses) < steps:
        for batch in loader:
            loss, soft, hard = distillation_loss(student, batch, temperature=cache.temperature,
                                                 hard_weight=hard_weight)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
            log(f"step {len(losses):3d}  loss {loss.item():.4f}  (soft KL {soft.item():.4f}, hard CE {hard.item():.4f})")
            if len(losses) == steps:
                break
    return losses


def run(workdir, steps=40, k=16, lines=96, batch_size=8, length=48, hard_weight=0.5, packed=False, workers=2,
        teacher_steps=30, quiet=False):
    """The three stages in `workdir`; returns the training losses."""
    log = (lambda *_: None) if quiet else print
    model_dir, corpus, store = (os.path.join(workdir, name) for name in ("teacher", "corpus.jsonl", "store"))
    write_corpus(corpus, lines)
    save_teacher(model_dir, corpus, length + 1, teacher_steps)
    command = ["build", "--model", model_dir, "--data", corpus, "--out", store, "--k", str(k),
               "--max-length", str(length + 1), "--batch-size", "16", "--device", "cpu"]
    command += ["--index-bits", "packed"] if packed else []
    command += ["--quiet"] if quiet else []
    log("$ kl-fused-cache " + shlex.join(command))
    if kl_fused_cache(command) != 0:
        raise RuntimeError("kl-fused-cache build failed")
    if not quiet:
        kl_fused_cache(["inspect", store])
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    losses = train(store, corpus, tokenizer, steps, batch_size, length, hard_weight, workers=workers, log=log)
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    log(f"loss fell from {first:.4f} (mean of the first 5 steps) to {last:.4f} (last 5) over {len(losses)} steps")
    return losses


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--k", type=int, default=16, help="teacher slots per token")
    parser.add_argument("--hard-weight", type=float, default=0.5, help="weight of the cross-entropy on labels")
    parser.add_argument("--packed", action="store_true", help="store token ids in ceil(log2 V) bits")
    parser.add_argument("--workdir", help="where the teacher, corpus and store go (default: a temporary directory)")
    args = parser.parse_args(argv)
    if args.workdir:
        os.makedirs(args.workdir, exist_ok=True)
        run(args.workdir, args.steps, args.k, hard_weight=args.hard_weight, packed=args.packed)
    else:
        with tempfile.TemporaryDirectory() as workdir:
            run(workdir, args.steps, args.k, hard_weight=args.hard_weight, packed=args.packed)


if __name__ == "__main__":
    main()
