"""`kl-fused-cache build`: run a teacher (a Hugging Face causal LM saved in a local directory: nothing
is downloaded) over a JSONL corpus once, and store its top-k per token with TeacherCacheWriter.

Sequence ids are the corpus' line numbers (0-based; blank lines are skipped, their numbers unused).
Each text is tokenized with the tokenizer saved in the model directory, truncated to --max-length.
Row i of a stored sequence is the teacher's distribution of token i, that is its top-k at position
i - 1; row 0 has no slots (nothing precedes the first token), which `TeacherCache.batch(offset=1)`
drops. So a sequence of L tokens has L rows, and the rows pair with the tokens as labels.
"""

import hashlib
import json
import os
import sys
import time

import torch

from kl_fused.cache.writer import TeacherCacheWriter
from kl_fused.sparse import topk_teacher

ROWS = "row i: the teacher's top-k distribution of token i (its logits at position i - 1); row 0: no slots"


def _import_build_dependencies():
    try:
        import transformers
        from tqdm import tqdm
    except ImportError as error:
        raise ImportError(f"kl-fused-cache build needs {error.name}: pip install kl_fused[cache]") from error
    return transformers, tqdm


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as data:
        for block in iter(lambda: data.read(2**20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_texts(path, text_field):
    """(line number, text) of every non-blank line; ValueError naming the line otherwise."""
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as error:
                raise ValueError(f"{path}, line {number + 1}: not JSON ({error})") from None
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                raise ValueError(f"{path}, line {number + 1}: no string field {text_field!r}")
            yield number, record[text_field]


def load_teacher(model_dir, device, dtype):
    """(model, tokenizer) from a local directory, in eval mode on `device`."""
    transformers, _ = _import_build_dependencies()
    if not os.path.isfile(os.path.join(model_dir, "config.json")):
        raise ValueError(f"--model {model_dir} is not a local model directory (no config.json); "
                         "kl-fused-cache build downloads nothing")
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True,
                                                              dtype=dtype if dtype != "auto" else "auto")
    return model.to(device).eval(), tokenizer


def _pad_id(tokenizer):
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return candidate


def store_batch(writer, model, batch, pad_id, device):
    """Run the teacher on a batch of (id, token ids), right-padded, and add each sequence's rows."""
    longest = max(len(tokens) for _, tokens in batch)
    if longest == 0:  # texts that tokenize to nothing: stored with no rows
        for sequence_id, _ in batch:
            writer.add_topk(sequence_id, torch.zeros(0, writer.k, dtype=torch.int32), torch.zeros(0, writer.k))
        return
    input_ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), longest), dtype=torch.long)
    for row, (_, tokens) in enumerate(batch):
        input_ids[row, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        attention_mask[row, : len(tokens)] = 1
    with torch.no_grad():
        logits = model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
    if logits.shape[-1] != writer.vocab_size:
        raise ValueError(f"the teacher's logits have {logits.shape[-1]} columns, the store's vocab_size is "
                         f"{writer.vocab_size}")
    for row, (sequence_id, tokens) in enumerate(batch):
        length = len(tokens)
        indices = torch.zeros(length, writer.k, dtype=torch.int32)
        logprobs = torch.full((length, writer.k), float("-inf"), dtype=torch.float32)
        if length > 1:
            top_indices, top_logprobs = topk_teacher(logits[row, : length - 1], writer.k,
                                                     temperature=writer.temperature)
            indices[1:], logprobs[1:] = top_indices.cpu(), top_logprobs.float().cpu()
        writer.add_topk(sequence_id, indices, logprobs)


def build(args):
    """Build (or, with args.resume, continue) the store args.out; returns the exit code."""
    _, tqdm = _import_build_dependencies()
    model_dir = os.path.abspath(args.model)
    model, tokenizer = load_teacher(model_dir, args.device, args.dtype)
    vocab_size = model.config.vocab_size
    output = model.get_output_embeddings()
    if output is not None and getattr(output, "weight", None) is not None:
        vocab_size = output.weight.shape[0]
    metadata = {
        "teacher": model_dir, "tokenizer": model_dir, "data": os.path.abspath(args.data),
        "data_sha256": file_sha256(args.data), "text_field": args.text_field, "max_length": str(args.max_length),
        "rows": ROWS,
    }
    total = sum(1 for _ in read_texts(args.data, args.text_field))
    pad_id = _pad_id(tokenizer)
    with TeacherCacheWriter(args.out, vocab_size=vocab_size, k=args.k, temperature=args.temperature,
                            logprob_dtype=args.logprob_dtype, index_bits=args.index_bits,
                            shard_bytes=args.shard_mb * 2**20, metadata=metadata, resume=args.resume) as writer:
        already = sum(1 for number, _ in read_texts(args.data, args.text_field) if number in writer)
        bar = tqdm(total=total, initial=already, unit="seq", desc="teacher top-k", disable=args.quiet,
                   file=sys.stderr)
        tokens, start, batch = 0, time.perf_counter(), []

        def run(batch):
            nonlocal tokens
            store_batch(writer, model, batch, pad_id, args.device)
            tokens += sum(len(ids) for _, ids in batch)
            bar.update(len(batch))
            bar.set_postfix_str(f"{tokens / (time.perf_counter() - start):,.0f} tok/s")

        for number, text in read_texts(args.data, args.text_field):
            if number not in writer:
                batch.append((number, tokenizer(text, truncation=True, max_length=args.max_length)["input_ids"]))
            if len(batch) == args.batch_size:
                run(batch)
                batch = []
        if batch:
            run(batch)
        bar.close()
    elapsed = time.perf_counter() - start
    print(f"stored {tokens} new tokens in {elapsed:.1f} s ({tokens / max(elapsed, 1e-9):,.0f} tok/s) at {args.out}"
          + (f"; {already} sequences were already there" if already else ""))
    return 0
