"""kl_fused.cache: the teacher top-k store's contract (TeacherCacheWriter, TeacherCache), its formats
(packed ids, manifest, shards), reads in DataLoader workers, and every bad call and bad store."""

import hashlib
import json
import math
import pickle
import random

import pytest
import torch

import kl_fused

pytest.importorskip("safetensors")
from kl_fused.cache import TeacherCache, TeacherCacheWriter, TeacherTopK, check_teacher_vocab  # noqa: E402
from kl_fused.cache._packing import index_bits, make_codec  # noqa: E402

ENCODINGS = [None, "packed"]
LOGPROB_DTYPES = [torch.bfloat16, torch.float16, torch.float32]
INF = float("inf")


def random_topk(length, vocab, k, gen, unused=0.1):
    """(indices int64, logprobs float32) of `length` rows: k distinct ids per row (spread over the whole
    vocabulary) with descending log-probs of total mass 0.9; about `unused` of the slots -inf (their ids
    anything)."""
    first = torch.randint(0, vocab, (length, 1), generator=gen)
    indices = (first + torch.arange(k) * (vocab // k)) % vocab
    logprobs = (3 * torch.randn(length, k, generator=gen)).log_softmax(-1).sort(-1, descending=True).values
    logprobs = logprobs + math.log(0.9)
    dropped = torch.rand(length, k, generator=gen) < unused
    indices = torch.where(dropped, torch.randint(-5, vocab + 5, (length, k), generator=gen), indices)
    return indices, logprobs.masked_fill(dropped, -INF)


def expected(indices, logprobs, dtype):
    """What the store gives back: log-probs in its dtype, an unused slot's id 0."""
    stored = logprobs.to(dtype)
    return torch.where(stored == -INF, 0, indices).to(torch.int32), stored


def write_store(path, sequences, vocab, k, **options):
    with TeacherCacheWriter(path, vocab_size=vocab, k=k, **options) as writer:
        for sequence_id, (indices, logprobs) in sequences.items():
            writer.add_topk(sequence_id, indices, logprobs)
    return TeacherCache(path)


def make_sequences(count, vocab, k, seed, lengths=None):
    gen = torch.Generator().manual_seed(seed)
    ids = random.Random(seed).sample(range(10**12), count)
    lengths = lengths or [int(torch.randint(0, 50, (1,), generator=gen)) for _ in ids]
    return {sequence_id: random_topk(length, vocab, k, gen) for sequence_id, length in zip(ids, lengths)}


@pytest.mark.parametrize("index_bits_option", ENCODINGS)
@pytest.mark.parametrize("dtype", LOGPROB_DTYPES)
def test_every_sequence_reads_back_by_id_in_any_order(tmp_path, index_bits_option, dtype):
    vocab, k = 70001, 7  # 17-bit ids: two low bytes and one bit plane when packed
    sequences = make_sequences(30, vocab, k, seed=1, lengths=list(range(30)))
    cache = write_store(tmp_path / "store", sequences, vocab, k, temperature=2.0, logprob_dtype=dtype,
                        index_bits=index_bits_option, shard_bytes=900, metadata={"teacher": "t", "corpus": "c"})
    assert len(cache.shard_files) > 5, "small shards: sequences spread over many"
    assert len(cache) == 30 and cache.sequence_ids == list(sequences)
    assert (cache.vocab_size, cache.k, cache.temperature, cache.logprob_dtype) == (vocab, k, 2.0, dtype)
    assert cache.metadata == {"teacher": "t", "corpus": "c"}
    assert cache.index_encoding == ("packed" if index_bits_option else "int32")
    assert cache.num_tokens == sum(len(i) for i, _ in sequences.values())
    order = list(sequences)
    random.Random(2).shuffle(order)
    for sequence_id in order:
        want_indices, want_logprobs = expected(*sequences[sequence_id], dtype)
        indices, logprobs = cache[sequence_id]
        assert indices.dtype == torch.int32 and logprobs.dtype == dtype
        assert torch.equal(indices, want_indices) and torch.equal(logprobs, want_logprobs)
        assert sequence_id in cache and cache.length(sequence_id) == len(want_indices)
    assert 12345 not in cache and "a" not in cache
    assert cache.verify() == cache.num_tokens


def test_add_stores_topk_teacher_at_the_writers_temperature(tmp_path):
    vocab, k = 66000, 16
    gen = torch.Generator().manual_seed(3)
    logits = {i: 4 * torch.randn(length, vocab, generator=gen) for i, length in enumerate([5, 0, 9])}
    with TeacherCacheWriter(tmp_path / "s", vocab_size=vocab, k=k, temperature=1.5, index_bits="packed",
                            logprob_dtype=torch.float32) as writer:
        for sequence_id, rows in logits.items():
            writer.add(sequence_id, rows)
            assert sequence_id in writer
    cache = TeacherCache(tmp_path / "s")
    for sequence_id, rows in logits.items():
        indices, logprobs = kl_fused.topk_teacher(rows, k, temperature=1.5)
        stored = cache[sequence_id]
        assert torch.equal(stored[0], indices) and torch.equal(stored[1], logprobs)
        # An oracle apart from topk_teacher: the stored ids are the k largest logits.
        assert torch.equal(stored[0].sort(1).values.long(), rows.topk(k, dim=1).indices.sort(1).values)


@pytest.mark.parametrize("vocab, k", [(vocab, k) for vocab in (1, 2, 3, 255, 256, 257, 65536, 65537, 128256,
                                                                  2**24 + 1, 2**31 - 1)
                                      for k in (1, 5, 8, 64) if k <= vocab])
def test_packed_ids_take_ceil_log2_v_bits_and_round_trip(vocab, k):
    codec = make_codec("packed", k, vocab)
    bits = index_bits(vocab)
    assert bits == max(1, math.ceil(math.log2(vocab)))
    gen = torch.Generator().manual_seed(vocab % 1000 + k)
    ids = torch.randint(0, vocab, (40, k), generator=gen, dtype=torch.int64)
    ids[0], ids[1] = vocab - 1, 0
    encoded = codec.encode(ids)
    assert sum(t.shape[1] for t in encoded.values()) == k * (bits // 8) + (bits % 8) * math.ceil(k / 8)
    assert all(t.dtype == torch.uint8 and t.shape[0] == 40 for t in encoded.values())
    assert torch.equal(codec.decode(encoded), ids.to(torch.int32))


def test_bytes_per_token_of_both_encodings(tmp_path):
    """6K + O(1) with int32 ids and bfloat16 log-probs; at V = 128256 (17 bits) packed <= 4.2K + O(1)."""
    vocab, k = 128256, 64
    sequences = make_sequences(4, vocab, k, seed=4, lengths=[400, 300, 200, 100])
    per_token = {}
    for option in ENCODINGS:
        cache = write_store(tmp_path / str(option), sequences, vocab, k, index_bits=option)
        per_token[option] = (cache.bytes_per_token, cache.disk_bytes() / cache.num_tokens)
    assert per_token[None][0] == 6 * k
    assert per_token["packed"][0] == 2 * k + 2 * k + k // 8 <= 4.2 * k
    for payload, on_disk in per_token.values():
        assert payload < on_disk < payload + 2  # headers and manifest: O(1) per token


@pytest.mark.parametrize("index_bits_option", ENCODINGS)
def test_batch_takes_rows_from_offset_and_pads_with_empty_slots(tmp_path, index_bits_option):
    vocab, k = 300, 5
    sequences = make_sequences(6, vocab, k, seed=5, lengths=[0, 1, 3, 10, 17, 25])
    cache = write_store(tmp_path / "s", sequences, vocab, k, index_bits=index_bits_option, shard_bytes=500)
    ids = list(sequences)
    picks = [ids[4], ids[0], ids[2], ids[5], ids[4]]
    for offset, length in [(1, 12), (0, 30), (3, 4), (1, None), (0, None), (30, 2), (1, 0)]:
        indices, logprobs = cache.batch(picks, length=length, offset=offset)
        steps = length if length is not None else max(max(len(sequences[i][0]) - offset, 0) for i in picks)
        assert indices.shape == logprobs.shape == (len(picks), steps, k)
        for row, sequence_id in enumerate(picks):
            want_indices, want_logprobs = expected(*sequences[sequence_id], torch.bfloat16)
            rows = want_indices[offset : offset + steps]
            assert torch.equal(indices[row, : len(rows)], rows)
            assert torch.equal(logprobs[row, : len(rows)], want_logprobs[offset : offset + steps])
            assert (indices[row, len(rows) :] == 0).all() and (logprobs[row, len(rows) :] == -INF).all()
    as_tensor = cache.batch(torch.tensor(picks), length=7)
    as_list = cache.batch(picks, length=7)
    assert all(torch.equal(a, b) for a, b in zip(as_tensor, as_list))
    assert cache.batch([], length=3)[0].shape == (0, 3, k)


def test_reads_are_copies(tmp_path):
    sequences = make_sequences(2, 100, 4, seed=6, lengths=[8, 9])
    cache = write_store(tmp_path / "s", sequences, 100, 4)
    first = list(sequences)[0]
    indices, logprobs = cache[first]
    indices.fill_(7)
    logprobs.fill_(0.0)
    batch_indices, _ = cache.batch([first], length=4)
    batch_indices.fill_(7)
    assert torch.equal(cache[first][0], expected(*sequences[first], torch.bfloat16)[0])


def test_shards_are_plain_safetensors_files(tmp_path):
    """Another safetensors reader loads our shards: the format is the standard one."""
    from safetensors.torch import load_file

    sequences = make_sequences(3, 1000, 8, seed=7, lengths=[5, 6, 7])
    cache = write_store(tmp_path / "s", sequences, 1000, 8, index_bits="packed")
    (name,) = cache.shard_files
    tensors = load_file(tmp_path / "s" / name)
    assert set(tensors) == {"indices_low", "indices_high", "logprobs"}
    codec = make_codec("packed", 8, 1000)
    ids = list(sequences)
    decoded = codec.decode({n: t for n, t in tensors.items() if n != "logprobs"})
    assert torch.equal(decoded[5:11], cache[ids[1]][0])
    assert torch.equal(tensors["logprobs"][11:18], cache[ids[2]][1])


class BatchOf:
    """collate_fn for the DataLoader test: ids -> cache.batch(ids)."""

    def __init__(self, cache):
        self.cache = cache

    def __call__(self, ids):
        return ids, self.cache.batch(ids, length=20)


@pytest.mark.parametrize("opened_before", [False, True])
def test_dataloader_workers_read_the_same_batches(tmp_path, opened_before):
    vocab, k = 5000, 8
    sequences = make_sequences(24, vocab, k, seed=8)
    cache = write_store(tmp_path / "s", sequences, vocab, k, index_bits="packed", shard_bytes=3000)
    if opened_before:  # the forked workers inherit mapped, checked shards
        cache.batch(list(sequences), length=20)
    loader = torch.utils.data.DataLoader(list(sequences), batch_size=5, num_workers=2, collate_fn=BatchOf(cache))
    seen = []
    for ids, topk in loader:
        assert isinstance(topk, TeacherTopK) and topk.vocab_size == vocab
        direct = cache.batch(ids, length=20)
        assert torch.equal(topk.indices, direct.indices) and torch.equal(topk.logprobs, direct.logprobs)
        seen += ids
    assert sorted(seen) == sorted(sequences)


def test_a_pickled_cache_maps_its_shards_again(tmp_path):
    """What a spawned DataLoader worker gets: the parsed store, no mapping."""
    sequences = make_sequences(8, 400, 4, seed=9)
    cache = write_store(tmp_path / "s", sequences, 400, 4, shard_bytes=300)
    cache[list(sequences)[0]]
    copy = pickle.loads(pickle.dumps(cache))
    assert copy.sequence_ids == cache.sequence_ids and copy.metadata == cache.metadata
    for sequence_id in sequences:
        assert all(torch.equal(a, b) for a, b in zip(copy[sequence_id], cache[sequence_id]))


def test_teacher_topk_carries_the_vocab_size_to_the_loss(tmp_path):
    sequences = make_sequences(2, 300, 4, seed=10, lengths=[6, 3])
    cache = write_store(tmp_path / "s", sequences, 300, 4)
    topk = cache.batch(list(sequences), length=5)
    indices, logprobs = topk
    assert topk.vocab_size == 300 and indices is topk.indices and logprobs is topk.logprobs
    assert pickle.loads(pickle.dumps(topk)).vocab_size == 300
    check_teacher_vocab(topk, 300)
    check_teacher_vocab((indices, logprobs), 301)  # a plain tuple carries nothing to check
    with pytest.raises(ValueError, match="vocabulary of 300 tokens.*301"):
        check_teacher_vocab(topk, 301)


# -- bad calls ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("options, error, message", [
    (dict(k=301), ValueError, "k must be in"),
    (dict(k=0), ValueError, "k must be in"),
    (dict(k=2.0), TypeError, "k must be an int"),
    (dict(vocab_size=0), ValueError, "vocab_size must be in"),
    (dict(vocab_size=2**31), ValueError, "vocab_size must be in"),
    (dict(temperature=float("nan")), ValueError, "temperature"),
    (dict(temperature=float("inf")), ValueError, "temperature"),
    (dict(temperature=0.0), ValueError, "temperature"),
    (dict(logprob_dtype=torch.float64), TypeError, "logprob_dtype"),
    (dict(index_bits=17), ValueError, "index_bits"),
    (dict(shard_bytes=0), ValueError, "shard_bytes"),
    (dict(metadata={"a": 1}), TypeError, "metadata"),
    (dict(resume="yes"), TypeError, "resume"),
])
def test_writer_options_are_checked(tmp_path, options, error, message):
    with pytest.raises(error, match=message):
        TeacherCacheWriter(tmp_path / "s", **{"vocab_size": 300, "k": 4, **options})
    assert not (tmp_path / "s").exists(), "a refused writer creates nothing"


def test_bad_sequences_are_refused_and_leave_the_store_unchanged(tmp_path):
    vocab, k = 300, 4
    gen = torch.Generator().manual_seed(11)
    indices, logprobs = random_topk(6, vocab, k, gen, unused=0.0)
    with TeacherCacheWriter(tmp_path / "s", vocab_size=vocab, k=k, shard_bytes=10) as writer:
        writer.add_topk(1, indices, logprobs)  # flushed at once (shard_bytes=10)
        writer.add_topk(2, indices, logprobs)
        for sequence_id in (1, 2):
            with pytest.raises(ValueError, match=f"sequence {sequence_id} is already"):
                writer.add_topk(sequence_id, indices, logprobs)
        cases = [
            ((-1, indices, logprobs), ValueError, r"in \[0, 2\*\*63\)"),
            ((True, indices, logprobs), TypeError, "integer"),
            ((1.0, indices, logprobs), TypeError, "integer"),
            ((3, indices[:, :3], logprobs[:, :3]), ValueError, r"\(L, K = 4\)"),
            ((3, indices, logprobs[:5]), ValueError, "same shape"),
            ((3, indices.float(), logprobs), TypeError, "integer tensor"),
            ((3, indices, logprobs.long()), TypeError, "floating-point"),
            ((3, indices, logprobs.index_fill(0, torch.tensor([4]), float("nan"))), ValueError, "row 4 has a NaN"),
            ((3, indices, logprobs.index_fill(0, torch.tensor([2]), INF)), ValueError, "row 2 has a NaN or \\+inf"),
            ((3, indices.index_fill(0, torch.tensor([3]), vocab), logprobs), ValueError, "row 3 has a token id outside"),
            ((3, indices.index_fill(0, torch.tensor([0]), -1), logprobs), ValueError, "row 0 has a token id outside"),
            ((3, torch.cat([indices[:, :1], indices[:, :3]], 1), logprobs), ValueError, "row 0 has a token id twice"),
        ]
        for args, error, message in cases:
            with pytest.raises(error, match=message):
                writer.add_topk(*args)
            assert 3 not in writer
        with pytest.raises(ValueError, match="300"):
            writer.add(3, torch.randn(2, vocab + 1))
        with pytest.raises(ValueError, match=r"\(L, V\)"):
            writer.add(3, torch.randn(vocab))
        # An unused slot's id is never read: anything goes there, and it is stored as 0.
        wild = indices.clone()
        wild[:, -1] = 10**6
        writer.add_topk(3, wild, logprobs.index_fill(1, torch.tensor([k - 1]), -INF))
    with pytest.raises(ValueError, match="closed"):
        writer.add_topk(4, indices, logprobs)
    cache = TeacherCache(tmp_path / "s")
    assert cache.sequence_ids == [1, 2, 3]
    assert (cache[3][0][:, -1] == 0).all()


def test_existing_stores_need_resume_with_the_same_properties(tmp_path):
    store = tmp_path / "s"
    sequences = make_sequences(3, 300, 4, seed=12)
    write_store(store, sequences, 300, 4, temperature=2.0, metadata={"teacher": "x"})
    with pytest.raises(FileExistsError, match="resume=True"):
        TeacherCacheWriter(store, vocab_size=300, k=4, temperature=2.0)
    for changed, named in ((dict(vocab_size=301), "vocab_size 300"), (dict(k=5), "k 4"),
                           (dict(temperature=1.0), "temperature 2.0"),
                           (dict(logprob_dtype=torch.float32), "logprob_dtype 'bfloat16'"),
                           (dict(index_bits="packed"), "index_encoding 'int32'")):
        options = {**dict(vocab_size=300, k=4, temperature=2.0, resume=True), **changed}
        with pytest.raises(ValueError, match=f"cannot resume.*{named}"):
            TeacherCacheWriter(store, **options)
    with pytest.raises(ValueError, match=r"metadata differs in \['teacher'\]"):
        TeacherCacheWriter(store, vocab_size=300, k=4, temperature=2.0, metadata={"teacher": "y"}, resume=True)
    with TeacherCacheWriter(store, vocab_size=300, k=4, temperature=2.0, resume=True) as writer:
        assert all(i in writer for i in sequences) and len(writer) == 3
        with pytest.raises(RuntimeError, match="another TeacherCacheWriter"):
            TeacherCacheWriter(store, vocab_size=300, k=4, temperature=2.0, resume=True)
        writer.add_topk(5, *random_topk(3, 300, 4, torch.Generator().manual_seed(0)))
    cache = TeacherCache(store)
    assert cache.sequence_ids == [*sequences, 5] and cache.metadata == {"teacher": "x"}
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileExistsError, match="not a directory"):
        TeacherCacheWriter(tmp_path / "file", vocab_size=300, k=4)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(FileExistsError, match="no manifest.json"):
        TeacherCacheWriter(tmp_path / "other", vocab_size=300, k=4, resume=True)


def test_bad_reads_are_refused(tmp_path):
    sequences = make_sequences(3, 300, 4, seed=13)
    cache = write_store(tmp_path / "s", sequences, 300, 4)
    with pytest.raises(KeyError, match="424242"):
        cache[424242]
    with pytest.raises(KeyError):
        cache[2**70]
    with pytest.raises(KeyError, match="424242"):
        cache.batch([list(sequences)[0], 424242], length=3)
    with pytest.raises(TypeError, match="integer"):
        cache["x"]
    with pytest.raises(TypeError, match="integer"):
        cache.batch(torch.tensor([1.0]))
    for options in (dict(length=-1), dict(offset=-1), dict(offset=1.5), dict(length=True)):
        with pytest.raises(ValueError, match="non-negative int"):
            cache.batch(list(sequences), **options)
    with pytest.raises(FileNotFoundError, match="no teacher cache"):
        TeacherCache(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        TeacherCache(tmp_path)


# -- bad stores ----------------------------------------------------------------------------------------

@pytest.fixture
def two_shard_store(tmp_path):
    """A store of two shards: sequences 0-2 in the first, 3-5 in the second."""
    sequences = {i: random_topk(10, 300, 4, torch.Generator().manual_seed(i)) for i in range(6)}
    shard_bytes = 3 * 10 * 6 * 4  # three sequences of 10 tokens
    cache = write_store(tmp_path / "s", sequences, 300, 4, shard_bytes=shard_bytes)
    assert len(cache.shard_files) == 2
    return tmp_path / "s", cache.shard_files


def rewrite_manifest(store, change):
    path = store / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


@pytest.mark.parametrize("damage", ["truncate", "flip", "remove", "symlink"])
def test_a_damaged_shard_is_named_on_first_read_and_by_verify(two_shard_store, damage, tmp_path):
    store, (first, second) = two_shard_store
    path = store / second
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[:-7])
    elif damage == "flip":
        path.write_bytes(data[:-3] + bytes([data[-3] ^ 1]) + data[-2:])
    elif damage == "remove":
        path.unlink()
    else:
        (tmp_path / "elsewhere").write_bytes(data)
        path.unlink()
        path.symlink_to(tmp_path / "elsewhere")
    message = {"truncate": "truncated", "flip": "checksum mismatch", "remove": "missing",
               "symlink": "symbolic links|not a regular file|Too many levels"}[damage]
    cache = TeacherCache(store)  # opening reads the manifest only
    assert cache[0][0].shape == (10, 4) and cache.batch([1, 2], length=4)[0].shape == (2, 4, 4)
    with pytest.raises(ValueError, match=f"shard {second}: .*({message})"):
        cache[4]
    with pytest.raises(ValueError, match=f"shard {second}"):
        cache.batch([0, 5], length=3)
    with pytest.raises(ValueError, match=f"1 bad shard.*\n  shard {second}"):
        cache.verify()


def _set(path, value):
    def change(manifest):
        target = manifest
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value
    return change


@pytest.mark.parametrize("change, message", [
    (_set(["format"], "other"), "not a kl_fused teacher cache"),
    (_set(["format_version"], 2), "newer than this kl_fused reads"),
    (_set(["format_version"], "1"), "format_version must be"),
    (lambda m: m.pop("k"), r"missing \['k'\]"),
    (_set(["extra"], 1), r"unknown \['extra'\]"),
    (_set(["vocab_size"], "300"), "vocab_size must be an integer"),
    (_set(["vocab_size"], True), "vocab_size must be an integer"),
    (_set(["vocab_size"], 2**31), "vocab_size must be an integer"),
    (_set(["k"], 301), r"k must be an integer in \[1, 300\]"),
    (_set(["temperature"], -1.0), "temperature must be"),
    (_set(["temperature"], "1"), "temperature must be"),
    (_set(["logprob_dtype"], "float64"), "logprob_dtype must be one of"),
    (_set(["index_encoding"], "zip"), "index_encoding must be one of"),
    (_set(["index_bits"], 9), "index_bits must be 32"),
    (_set(["metadata"], {"a": 1}), "metadata must be"),
    (_set(["shards"], {}), "shards must be a list"),
    (_set(["shards", 0, "file"], "../escape.safetensors"), "a name like shard-00000.safetensors"),
    (_set(["shards", 0, "file"], "/tmp/shard-00000.safetensors"), "a name like shard-00000.safetensors"),
    (_set(["shards", 0, "file"], "sub/shard-00000.safetensors"), "a name like shard-00000.safetensors"),
    (_set(["shards", 0, "file"], "shard-00001.safetensors"), "listed twice"),
    (_set(["shards", 0, "sha256"], "ABC"), "sha256 must be"),
    (_set(["shards", 0, "tokens"], 10**15), "cannot fit in"),
    (_set(["shards", 0, "bytes"], 2), r"bytes must be an integer in \[8"),
    (_set(["shards", 0, "lengths"], [10, 10, 11]), "add up to 31, not its 30"),
    (_set(["shards", 0, "lengths"], [10, 30, -10]), "a sequence length must be"),
    (_set(["shards", 0, "lengths"], [10, 20]), "same length"),
    (_set(["shards", 0, "sequence_ids"], [0, 1, 3]), "appears twice"),
    (_set(["shards", 0, "sequence_ids"], [0, 1, -2]), "a sequence id must be"),
    (lambda m: m["shards"][0].pop("sha256"), r"missing \['sha256'\]"),
])
def test_a_bad_manifest_is_refused_with_its_problem_named(two_shard_store, change, message):
    store, _ = two_shard_store
    rewrite_manifest(store, change)
    with pytest.raises(ValueError, match=message):
        TeacherCache(store)


@pytest.mark.parametrize("text, message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "must be a JSON object"),
    ('{"format": "kl_fused.teacher_cache", "format": "x"}', "duplicate key"),
    ('{"temperature": NaN}', "NaN is not valid JSON"),
    ("\xff", "not valid JSON"),
])
def test_a_manifest_that_is_not_json_is_refused(two_shard_store, text, message):
    store, _ = two_shard_store
    (store / "manifest.json").write_bytes(text.encode("latin-1"))
    with pytest.raises(ValueError, match=message):
        TeacherCache(store)


def _forge_shard(store, name, header, data=b""):
    """Replace a shard with these header and data bytes, and make the manifest agree on its size and
    checksum (what an attacker who rewrites both would do): only the header checks stand between."""
    encoded = json.dumps(header).encode()
    encoded += b" " * (-len(encoded) % 8)
    raw = len(encoded).to_bytes(8, "little") + encoded + data
    (store / name).write_bytes(raw)

    def agree(manifest):
        for shard in manifest["shards"]:
            if shard["file"] == name:
                shard["bytes"], shard["sha256"] = len(raw), hashlib.sha256(raw).hexdigest()
    rewrite_manifest(store, agree)


def _tensors(indices_shape=(30, 4), logprobs_shape=(30, 4), **changes):
    header = {"indices": {"dtype": "I32", "shape": list(indices_shape), "data_offsets": [0, 480]},
              "logprobs": {"dtype": "BF16", "shape": list(logprobs_shape), "data_offsets": [480, 720]}}
    for key, value in changes.items():
        name, field = key.split("__")
        header[name][field] = value
    return header


@pytest.mark.parametrize("header, data_bytes, message", [
    (_tensors(), 720, None),  # the forgery itself is well-formed: the control case reads
    (_tensors(indices__data_offsets=[0, 10**9]), 720, "outside the file"),
    (_tensors(indices__dtype="I64"), 720, "dtype 'I64'"),
    (_tensors(indices_shape=(31, 4)), 720, r"shape \[31, 4\]"),
    (_tensors(logprobs__data_offsets=[479, 719]), 720, "not aligned"),
    (_tensors(logprobs__data_offsets=[480, 700]), 720, "bytes for a"),
    ({"indices": _tensors()["indices"]}, 720, "holds the tensors"),
    ({**_tensors(), "__metadata__": {"a": 1}}, 720, "__metadata__"),
    ({**_tensors(), "indices": {"dtype": "I32"}}, 720, "must have the keys"),
])
def test_a_forged_shard_header_is_refused_before_any_tensor_is_made(two_shard_store, header, data_bytes, message):
    store, (first, _) = two_shard_store
    gen = torch.Generator().manual_seed(0)
    data = torch.randint(0, 300, (30, 4), generator=gen, dtype=torch.int32).numpy().tobytes()
    data += torch.randn(30, 4, generator=gen).to(torch.bfloat16).view(torch.int16).numpy().tobytes()
    _forge_shard(store, first, header, data[:data_bytes])
    cache = TeacherCache(store)
    if message is None:
        assert cache[0][0].shape == (10, 4)
        return
    with pytest.raises(ValueError, match=f"shard {first}: .*{message}"):
        cache[0]


def test_a_huge_header_length_is_refused(two_shard_store):
    store, (first, _) = two_shard_store
    raw = (2**40).to_bytes(8, "little") + b"{}" + b" " * 6
    (store / first).write_bytes(raw)
    rewrite_manifest(store, lambda m: m["shards"][0].update(bytes=len(raw), sha256=hashlib.sha256(raw).hexdigest(),
                                                            tokens=0, lengths=[0, 0, 0]))
    with pytest.raises(ValueError, match="header length"):
        TeacherCache(store)[0]


@pytest.mark.parametrize("bad, message", [("index", "outside"), ("nan", "NaN"), ("twice", "twice")])
def test_verify_checks_contents_that_a_checksum_cannot(two_shard_store, bad, message):
    """A store written by something else, with consistent checksums but bad values."""
    from safetensors.torch import save

    store, (first, _) = two_shard_store
    indices, logprobs = random_topk(30, 300, 4, torch.Generator().manual_seed(1), unused=0.0)
    indices = indices.to(torch.int32)
    if bad == "index":
        indices[17, 2] = 300
    elif bad == "nan":
        logprobs[17, 2] = float("nan")
    else:
        indices[17, 2] = indices[17, 0]
    raw = save({"indices": indices, "logprobs": logprobs.to(torch.bfloat16)})
    (store / first).write_bytes(raw)
    rewrite_manifest(store, lambda m: m["shards"][0].update(bytes=len(raw), sha256=hashlib.sha256(raw).hexdigest()))
    with pytest.raises(ValueError, match=f"shard {first}, token 0 onwards: .*{message}"):
        TeacherCache(store).verify()
