"""A TeacherCacheWriter killed at any point leaves a store that opens with every completed shard, and
a writer resumed on it finishes a store that reads back equal to an uninterrupted run's
(tests/cache_writer_process.py runs the writer in a child process)."""

import json
import os
import signal
import time

import pytest
import torch

from cache_writer_process import SLOTS, VOCAB, sequence_topk, start_writer, write

pytest.importorskip("safetensors")
from kl_fused.cache import TeacherCache  # noqa: E402

SEQUENCES = 60
SHARD_BYTES = 2000  # a shard every ~5 sequences


def exit_code(pid):
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def assert_holds_exactly(cache, ids):
    """The store has these sequences, each equal to what was written (bfloat16 log-probs)."""
    assert sorted(cache.sequence_ids) == sorted(ids)
    for sequence_id in ids:
        indices, logprobs = sequence_topk(sequence_id)
        stored_indices, stored_logprobs = cache[sequence_id]
        used = logprobs != float("-inf")
        assert torch.equal(stored_indices, torch.where(used, indices, 0)), sequence_id
        assert torch.equal(stored_logprobs, logprobs.to(torch.bfloat16)), sequence_id


def check_after_crash_then_resume(store, packed):
    """The crashed store holds whole shards only; resuming finishes it; the result equals a clean run."""
    listed = []
    if (store / "manifest.json").exists():
        cache = TeacherCache(store)
        cache.verify()
        listed = cache.sequence_ids
        # Whole shards: the sequences written are a prefix of 0, 1, 2, ...
        assert listed == list(range(len(listed)))
        assert_holds_exactly(cache, listed)
    added = write(store, SEQUENCES, SHARD_BYTES, packed=packed, resume=True)
    assert added == list(range(len(listed), SEQUENCES)), "the resumed writer must add exactly the missing ids"
    assert not [name for name in os.listdir(store) if name.startswith(".tmp-")], "temporary files left behind"
    resumed = TeacherCache(store)
    assert resumed.verify() == resumed.num_tokens
    assert_holds_exactly(resumed, range(SEQUENCES))
    return resumed


@pytest.fixture(scope="module")
def clean_store(tmp_path_factory):
    """An uninterrupted run (in this process)."""
    store = tmp_path_factory.mktemp("clean") / "store"
    write(store, SEQUENCES, SHARD_BYTES)
    return TeacherCache(store)


# The writer's renames: 1 the first manifest; then per shard n: 2n + 2 the shard, 2n + 3 the manifest
# listing it. Its fsyncs: per file written, the file's then the directory's.
@pytest.mark.parametrize("die_before, shards_listed, orphan_shard", [
    (("replace", 1), None, False),  # before any manifest: only a temporary file exists
    (("replace", 2), 0, False),     # the first shard written under its temporary name, not renamed
    (("replace", 5), 1, True),      # the second shard renamed, the manifest listing it not yet
    (("fsync", 11), 2, False),      # the third shard's bytes written, not yet fsync'ed
], ids=["before-first-manifest", "shard-not-renamed", "orphan-shard", "shard-not-fsynced"])
def test_a_writer_dying_at_each_step_leaves_a_store_that_resumes(tmp_path, die_before, shards_listed,
                                                                 orphan_shard, clean_store):
    store = tmp_path / "store"
    packed = orphan_shard
    pid = start_writer(store, SEQUENCES, SHARD_BYTES, packed=packed, die_before=die_before)
    assert exit_code(pid) == 137
    names = os.listdir(store)
    assert any(name.startswith(".tmp-") for name in names)
    if shards_listed is None:
        assert "manifest.json" not in names
    else:
        assert len(TeacherCache(store).shard_files) == shards_listed
        shards = [name for name in names if name.startswith("shard-")]
        assert len(shards) == shards_listed + orphan_shard
    resumed = check_after_crash_then_resume(store, packed)
    for sequence_id in range(SEQUENCES):
        for ours, clean in zip(resumed[sequence_id], clean_store[sequence_id]):
            assert torch.equal(ours, clean)


def test_sigkill_mid_run_then_resume_equals_an_uninterrupted_run(tmp_path, clean_store):
    store = tmp_path / "store"
    pid = start_writer(store, SEQUENCES, SHARD_BYTES, pace=0.02)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # until two shards are listed, then kill wherever it is
        try:
            if len(json.loads((store / "manifest.json").read_text())["shards"]) >= 2:
                break
        except (FileNotFoundError, ValueError):
            pass
        time.sleep(0.01)
    else:
        os.kill(pid, signal.SIGKILL)
        exit_code(pid)
        pytest.fail("the writer listed no second shard within 60 s")
    time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    assert exit_code(pid) == -signal.SIGKILL
    killed = TeacherCache(store)
    assert 2 <= len(killed.shard_files) and len(killed) < SEQUENCES
    resumed = check_after_crash_then_resume(store, packed=False)
    assert resumed.vocab_size == VOCAB and resumed.k == SLOTS and resumed.metadata == {"test": "crash"}
    for sequence_id in range(SEQUENCES):
        for ours, clean in zip(resumed[sequence_id], clean_store[sequence_id]):
            assert torch.equal(ours, clean)
