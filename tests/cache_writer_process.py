"""A TeacherCacheWriter run in a forked child process, for the crash tests (tests/test_cache_crash.py).

The child writes sequences 0 .. n - 1 of deterministic data (sequence_topk), skipping those already
stored, and can die at a chosen point: die_before=("replace", 3) calls os._exit at the third
os.replace (the writer's renames: the first manifest, then each shard and the manifest after it), as
a SIGKILL there would; `pace` sleeps between sequences, so that a test can SIGKILL it mid-run. Forked
rather than started afresh: a new interpreter importing torch costs seconds per crash."""

import os
import time
import traceback

import torch

VOCAB, SLOTS = 500, 6


def sequence_topk(sequence_id):
    """(indices, logprobs) of sequence `sequence_id`: 0 to 40 rows of K distinct ids with descending
    log-probs, some rows with unused (-inf) slots."""
    gen = torch.Generator().manual_seed(1000 + sequence_id)
    length = int(torch.randint(0, 41, (1,), generator=gen))
    logits = 3 * torch.randn(length, VOCAB, generator=gen)
    logprobs, indices = logits.log_softmax(-1).topk(SLOTS, dim=-1)
    unused = torch.rand(length, SLOTS, generator=gen) < 0.1
    return indices.to(torch.int32), logprobs.masked_fill(unused, float("-inf"))


def write(store, sequences, shard_bytes, packed=False, resume=False, pace=0.0):
    """Write the sequences not yet in the store; returns the ids added."""
    from kl_fused.cache import TeacherCacheWriter

    added = []
    with TeacherCacheWriter(store, vocab_size=VOCAB, k=SLOTS, index_bits="packed" if packed else None,
                            shard_bytes=shard_bytes, metadata={"test": "crash"}, resume=resume) as writer:
        for sequence_id in range(sequences):
            if sequence_id in writer:
                continue
            writer.add_topk(sequence_id, *sequence_topk(sequence_id))
            added.append(sequence_id)
            time.sleep(pace)
    return added


def _die_at(name, count):
    original = getattr(os, name)
    calls = 0

    def dying(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == count:
            os._exit(137)
        return original(*args, **kwargs)

    setattr(os, name, dying)


def start_writer(*args, die_before=None, **kwargs):
    """Fork a child that runs write(*args, **kwargs) (dying as die_before says); returns its pid."""
    pid = os.fork()
    if pid:
        return pid
    code = 1
    try:
        torch.set_num_threads(1)  # as DataLoader workers do: no OpenMP pool inherited across fork
        if die_before:
            _die_at(*die_before)
        write(*args, **kwargs)
        code = 0
    except BaseException:
        traceback.print_exc()
    finally:
        os._exit(code)
