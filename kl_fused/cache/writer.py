"""TeacherCacheWriter: writes a teacher's top-k log-probabilities per token into a store that
TeacherCache reads, crash-safely, resumably.

Sequences are kept in memory until they reach `shard_bytes`; then they become one shard (a
safetensors file, written under a temporary name, fsync'ed, renamed), and the manifest listing it is
replaced atomically after it. A writer killed at any point leaves a store whose manifest lists only
complete shards; the sequences it still held are lost, and a writer reopened with resume=True (same
vocab size, K, temperature and encodings) continues: skip the ids already `in` it.
"""

import hashlib
import os

import torch

from kl_fused._sparse_args import check_temperature
from kl_fused.sparse import topk_teacher
from kl_fused.cache._files import DirectoryLock, LOCK_NAME, is_temporary, write_atomically
from kl_fused.cache._layout import StoreLayout, as_sequence_id, read_manifest
from kl_fused.cache._manifest import (
    MANIFEST_NAME, MAX_SEQUENCE_ID, SHARD_NAME, dumps, new_manifest, shard_name, shard_number)
from kl_fused.cache._packing import INT32, MAX_VOCAB, PACKED

PROPERTIES = ("vocab_size", "k", "temperature", "logprob_dtype", "index_encoding")


def _check_options(vocab_size, k, index_bits, shard_bytes, metadata, resume):
    for name, value in (("vocab_size", vocab_size), ("k", k), ("shard_bytes", shard_bytes)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not 1 <= vocab_size <= MAX_VOCAB:
        raise ValueError(f"vocab_size must be in [1, {MAX_VOCAB}], got {vocab_size}")
    if not 1 <= k <= vocab_size:
        raise ValueError(f"k must be in [1, vocab_size = {vocab_size}], got {k}")
    if index_bits not in (None, PACKED):
        raise ValueError(f"index_bits must be None (int32 indices) or 'packed', got {index_bits!r}")
    if shard_bytes < 1:
        raise ValueError(f"shard_bytes must be positive, got {shard_bytes}")
    if metadata is not None and (not isinstance(metadata, dict)
                                 or not all(isinstance(key, str) and isinstance(value, str)
                                            for key, value in metadata.items())):
        raise TypeError("metadata must be a dict of str -> str")
    if not isinstance(resume, bool):
        raise TypeError(f"resume must be a bool, got {type(resume).__name__}")


class TeacherCacheWriter:
    """Write a teacher top-k store at `path` (a directory).

        with TeacherCacheWriter(path, vocab_size=V, k=64) as w:
            w.add(sequence_id, teacher_logits)          # (L, V): top-k taken here, at the temperature
            w.add_topk(sequence_id, indices, logprobs)  # (L, K) each, already taken

    vocab_size, k: the teacher's vocabulary and slots per token (1 <= k <= V). temperature: the
    log-probs are log_softmax(logits / temperature) (add only; recorded for add_topk). logprob_dtype:
    bfloat16 (default), float16 or float32. index_bits: None stores int32 ids, "packed" ceil(log2 V)
    bits each. shard_bytes: a shard is written when the sequences held reach this size (a sequence is
    never split; one larger than it is a shard of its own). metadata: str -> str kept in the store.
    resume: continue an existing store (else FileExistsError); its properties must match (ValueError);
    metadata=None keeps the store's, a dict must equal it.

    Per token the store keeps K (id, log-prob) slots, a slot with log-prob -inf unused (its id is
    stored as 0). Closing (the end of the `with`, or close()) writes what is held; until then a crash
    loses it.
    """

    def __init__(self, path, *, vocab_size, k, temperature=1.0, logprob_dtype=torch.bfloat16, index_bits=None,
                 shard_bytes=256 * 2**20, metadata=None, resume=False):
        _check_options(vocab_size, k, index_bits, shard_bytes, metadata, resume)
        check_temperature(temperature)
        self.path = os.path.abspath(os.fspath(path))
        wanted = new_manifest(vocab_size, k, temperature, logprob_dtype, PACKED if index_bits else INT32,
                              metadata or {})
        self._layout = StoreLayout.of(wanted)
        self.vocab_size, self.k, self.temperature = vocab_size, k, float(temperature)
        self.logprob_dtype = logprob_dtype
        self.shard_bytes = shard_bytes
        exists = os.path.lexists(os.path.join(self.path, MANIFEST_NAME))
        if exists and not resume:
            raise FileExistsError(f"a teacher cache exists at {self.path}: pass resume=True to continue it")
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise FileExistsError(f"{self.path} exists and is not a directory")
        os.makedirs(self.path, exist_ok=True)
        self._lock = DirectoryLock(self.path)
        try:
            if exists:
                self._manifest = read_manifest(self.path)
                self._check_resumable(wanted, metadata)
            else:
                self._check_empty()
                self._manifest = wanted
                write_atomically(self.path, MANIFEST_NAME, dumps(self._manifest))
            self._remove_leftovers()
        except BaseException:
            self._lock.release()
            raise
        listed = [shard_number(shard["file"]) for shard in self._manifest["shards"]]
        self._next_shard = max(listed, default=-1) + 1
        self._ids = {i for shard in self._manifest["shards"] for i in shard["sequence_ids"]}
        self._held, self._held_tokens = [], 0
        self._closed = False

    def _check_resumable(self, wanted, metadata):
        stored = self._manifest
        differ = [f"{key} {stored[key]!r} (this writer: {wanted[key]!r})" for key in PROPERTIES
                  if stored[key] != wanted[key]]
        if differ:
            raise ValueError(f"cannot resume the teacher cache at {self.path}: it has " + ", ".join(differ))
        if metadata is not None and metadata != stored["metadata"]:
            keys = sorted(k for k in set(metadata) | set(stored["metadata"])
                          if metadata.get(k) != stored["metadata"].get(k))
            raise ValueError(f"cannot resume the teacher cache at {self.path}: its metadata differs in {keys}")

    def _check_empty(self):
        others = [name for name in os.listdir(self.path) if name != LOCK_NAME and not is_temporary(name)]
        if others:
            raise FileExistsError(f"{self.path} holds files ({', '.join(sorted(others)[:3])}, ...) but no "
                                  f"{MANIFEST_NAME}: not a teacher cache")

    def _remove_leftovers(self):
        """Temporary files and shards no manifest lists: what a killed writer left."""
        listed = {shard["file"] for shard in self._manifest["shards"]}
        for name in os.listdir(self.path):
            if is_temporary(name) or (SHARD_NAME.fullmatch(name) and name not in listed):
                os.remove(os.path.join(self.path, name))

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()

    def __contains__(self, sequence_id):
        try:
            return as_sequence_id(sequence_id) in self._ids
        except TypeError:
            return False

    def __len__(self):
        return len(self._ids)

    def _check_new_id(self, sequence_id):
        if self._closed:
            raise ValueError("this TeacherCacheWriter is closed")
        sequence_id = as_sequence_id(sequence_id)
        if not 0 <= sequence_id <= MAX_SEQUENCE_ID:
            raise ValueError(f"a sequence id must be in [0, 2**63), got {sequence_id}")
        if sequence_id in self._ids:
            raise ValueError(f"sequence {sequence_id} is already in the teacher cache at {self.path}")
        return sequence_id

    def add(self, sequence_id, teacher_logits):
        """Store the top-k of (L, V) teacher logits at the writer's temperature (kl_fused.topk_teacher)."""
        self._check_new_id(sequence_id)
        if not isinstance(teacher_logits, torch.Tensor) or teacher_logits.dim() != 2:
            raise ValueError(f"teacher_logits must be an (L, V) tensor, got "
                             f"{getattr(teacher_logits, 'shape', type(teacher_logits).__name__)}")
        if teacher_logits.shape[1] != self.vocab_size:
            raise ValueError(f"teacher_logits have {teacher_logits.shape[1]} columns, the cache's vocab_size is "
                             f"{self.vocab_size}")
        indices, logprobs = topk_teacher(teacher_logits, self.k, temperature=self.temperature)
        self.add_topk(sequence_id, indices, logprobs)

    def add_topk(self, sequence_id, indices, logprobs):
        """Store (L, K) token ids and their log-probabilities (slots with -inf unused)."""
        sequence_id = self._check_new_id(sequence_id)
        for name, x in (("indices", indices), ("logprobs", logprobs)):
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
            if x.dim() != 2 or x.shape[1] != self.k:
                raise ValueError(f"{name} must be (L, K = {self.k}), got {tuple(x.shape)}")
        if indices.shape != logprobs.shape:
            raise ValueError(f"indices and logprobs must have the same shape, got {tuple(indices.shape)} and "
                             f"{tuple(logprobs.shape)}")
        if indices.is_floating_point() or indices.is_complex() or indices.dtype == torch.bool:
            raise TypeError(f"indices must be an integer tensor, got {indices.dtype}")
        if not logprobs.is_floating_point():
            raise TypeError(f"logprobs must be a floating-point tensor, got {logprobs.dtype}")
        indices, logprobs = indices.detach().cpu().to(torch.int64), logprobs.detach().cpu()
        bad = logprobs.isnan() | (logprobs == float("inf"))
        if bool(bad.any()):
            raise ValueError(f"sequence {sequence_id}: row {int(bad.any(1).nonzero()[0])} has a NaN or +inf log-prob")
        stored = logprobs.to(self.logprob_dtype).contiguous()
        used = stored != float("-inf")
        outside = ((indices < 0) | (indices >= self.vocab_size)) & used
        if bool(outside.any()):
            raise ValueError(f"sequence {sequence_id}: row {int(outside.any(1).nonzero()[0])} has a token id outside "
                             f"[0, {self.vocab_size})")
        indices = torch.where(used, indices, 0)
        keyed = torch.where(used, indices, -1 - torch.arange(self.k)).sort(dim=1).values
        repeated = (keyed[:, 1:] == keyed[:, :-1]).any(1)
        if bool(repeated.any()):
            raise ValueError(f"sequence {sequence_id}: row {int(repeated.nonzero()[0])} has a token id twice")
        tensors = {**self._layout.codec.encode(indices), "logprobs": stored}
        self._ids.add(sequence_id)
        self._held.append((sequence_id, len(indices), tensors))
        self._held_tokens += len(indices)
        if self._held_tokens * self._layout.bytes_per_token >= self.shard_bytes:
            self.flush()

    def flush(self):
        """Write the sequences held as one shard, then the manifest that lists it."""
        from safetensors.torch import save

        if not self._held:
            return
        names = self._held[0][2].keys()
        data = save({name: torch.cat([tensors[name] for _, _, tensors in self._held]) for name in names},
                    metadata={"format": "kl_fused.teacher_cache shard"})
        name = shard_name(self._next_shard)
        write_atomically(self.path, name, data)
        self._manifest["shards"].append({
            "file": name, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
            "tokens": self._held_tokens, "sequence_ids": [i for i, _, _ in self._held],
            "lengths": [length for _, length, _ in self._held],
        })
        write_atomically(self.path, MANIFEST_NAME, dumps(self._manifest))
        self._next_shard += 1
        self._held, self._held_tokens = [], 0

    def close(self):
        if self._closed:
            return
        try:
            self.flush()
        finally:
            self._closed = True
            self._lock.release()
