"""TeacherCache: a teacher top-k store, read-only and memory-mapped, by sequence id in any order.

Opening reads and checks the manifest only. A shard is mapped, its size and sha256 checked against
the manifest and its header against the store's layout, on the first read of one of its sequences
(in each process: DataLoader workers check for themselves); `verify()` checks every shard now, and
its contents too. Reads copy out of the mapping, so what they return is the caller's to modify.
"""

import os

import torch

from kl_fused._teacher_topk import TeacherTopK
from kl_fused.cache._layout import StoreLayout, as_sequence_id, read_manifest
from kl_fused.cache._manifest import LOGPROB_DTYPES, MANIFEST_NAME
from kl_fused.cache._shard import MappedShard

VERIFY_ROWS = 2**16  # rows decoded at a time by verify()


class TeacherCache:
    """A teacher's top-k log-probabilities per token, by sequence id (see TeacherCacheWriter).

        cache = TeacherCache(path)
        indices, logprobs = cache[sequence_id]                      # (L, K) int32, logprob_dtype
        indices, logprobs = cache.batch(ids, length=S, offset=1)    # (B, S, K), padded with -inf slots

    Unused slots hold log-prob -inf (and index 0). Both return a TeacherTopK: the (indices, logprobs)
    tuple, carrying the cache's vocab_size for a loss to check against the student's.
    """

    def __init__(self, path):
        self.path = os.path.abspath(os.fspath(path))
        manifest = read_manifest(self.path)
        shards = manifest["shards"]
        ids = [torch.tensor(s["sequence_ids"], dtype=torch.int64) for s in shards]
        lengths = [torch.tensor(s["lengths"], dtype=torch.int64) for s in shards]
        empty = torch.empty(0, dtype=torch.int64)
        self._set_up(
            header={key: value for key, value in manifest.items() if key != "shards"},
            shard_files=[(s["file"], s["bytes"], s["sha256"], s["tokens"]) for s in shards],
            ids=torch.cat(ids) if ids else empty,
            lengths=torch.cat(lengths) if lengths else empty,
            shard_of=torch.cat([torch.full((len(i),), n, dtype=torch.int64) for n, i in enumerate(ids)]
                               ) if ids else empty,
        )

    def _set_up(self, header, shard_files, ids, lengths, shard_of):
        """header: the manifest less its shards; shard_files: (file, bytes, sha256, tokens) per shard;
        ids, lengths, shard_of: per sequence, in store order (a shard's sequences follow each other)."""
        self._header, self._shard_files = header, shard_files
        self._ids, self._lengths, self._shard_of = ids, lengths, shard_of
        self.vocab_size = header["vocab_size"]
        self.k = header["k"]
        self.temperature = float(header["temperature"])
        self.logprob_dtype = LOGPROB_DTYPES[header["logprob_dtype"]]
        self.index_encoding = header["index_encoding"]
        self.index_bits = header["index_bits"]
        self._layout = StoreLayout.of(header)
        # A sequence's first row within its shard: the lengths before it in the same shard.
        ends = lengths.cumsum(0)
        shard_first = torch.searchsorted(shard_of, shard_of)  # the shard's first sequence (sorted by shard)
        before = torch.cat([torch.zeros(1, dtype=torch.int64), ends])[shard_first]
        self._start = ends - lengths - before
        self._sorted_ids, self._order = ids.sort()
        self._mapped = [None] * len(shard_files)

    # Pickled (spawned DataLoader workers): the parsed store, not the mappings; a new process maps
    # and checks each shard again on its first read.
    def __getstate__(self):
        return {"path": self.path, "header": self._header, "shard_files": self._shard_files, "ids": self._ids,
                "lengths": self._lengths, "shard_of": self._shard_of}

    def __setstate__(self, state):
        self.path = state.pop("path")
        self._set_up(**state)

    def __len__(self):
        return len(self._ids)

    def __contains__(self, sequence_id):
        try:
            return self._positions([as_sequence_id(sequence_id)], missing_ok=True)[0] >= 0
        except TypeError:
            return False

    def __repr__(self):
        return (f"TeacherCache({self.path!r}: {len(self)} sequences, {self.num_tokens} tokens, V={self.vocab_size}, "
                f"K={self.k}, T={self.temperature:g}, {self.index_encoding} indices, {self.logprob_dtype})")

    @property
    def sequence_ids(self):
        """The ids, in the order they were written."""
        return self._ids.tolist()

    @property
    def metadata(self):
        return dict(self._header["metadata"])

    @property
    def num_tokens(self):
        return int(self._lengths.sum())

    @property
    def shard_files(self):
        return [name for name, _, _, _ in self._shard_files]

    @property
    def bytes_per_token(self):
        """Bytes a shard holds per token (ids and log-probs), without headers or manifest."""
        return self._layout.bytes_per_token

    def disk_bytes(self):
        """The store's size on disk: its shards and its manifest."""
        return sum(size for _, size, _, _ in self._shard_files) + os.path.getsize(os.path.join(self.path,
                                                                                           MANIFEST_NAME))

    def length(self, sequence_id):
        """Tokens (rows) of one sequence."""
        return int(self._lengths[self._positions([as_sequence_id(sequence_id)])[0]])

    def _positions(self, sequence_ids, missing_ok=False):
        """Store positions of the ids (a list of ints or an int64 tensor); KeyError for an unknown one."""
        if isinstance(sequence_ids, torch.Tensor):
            wanted = sequence_ids.to(torch.int64)
        else:
            if any(not -(2**63) <= i < 2**63 for i in sequence_ids):
                if missing_ok:
                    return torch.full((len(sequence_ids),), -1, dtype=torch.int64)
                raise KeyError(next(i for i in sequence_ids if not -(2**63) <= i < 2**63))
            wanted = torch.tensor(sequence_ids, dtype=torch.int64)
        stored = self._sorted_ids.shape[0]
        if stored == 0:
            found = torch.zeros(wanted.shape, dtype=torch.bool)
            where = torch.zeros(wanted.shape, dtype=torch.int64)
        else:
            where = torch.searchsorted(self._sorted_ids, wanted).clamp_(max=stored - 1)
            found = self._sorted_ids[where] == wanted
        if not bool(found.all()):
            if missing_ok:
                return torch.where(found, self._order[where], -1)
            raise KeyError(int(wanted[~found][0]))
        return self._order[where]

    def _tensors(self, shard):
        if self._mapped[shard] is None:
            name, size, sha256, tokens = self._shard_files[shard]
            self._mapped[shard] = MappedShard(os.path.join(self.path, name), name, size, sha256,
                                              self._layout.shard_tensors(tokens)).tensors
        return self._mapped[shard]

    def __getitem__(self, sequence_id):
        position = int(self._positions([as_sequence_id(sequence_id)])[0])
        tensors = self._tensors(int(self._shard_of[position]))
        start, length = int(self._start[position]), int(self._lengths[position])
        rows = {name: tensor[start : start + length].clone() for name, tensor in tensors.items()}
        logprobs = rows.pop("logprobs")
        return TeacherTopK(self._layout.codec.decode(rows), logprobs, self.vocab_size)

    def batch(self, sequence_ids, length=None, offset=1):
        """(indices, logprobs), each (B, S, K): rows offset .. offset + S - 1 of each sequence.

        Rows a sequence does not have are padding: log-prob -inf in every slot (index 0), so that a
        sparse loss counts them as empty or, with the labels' -100 there, not at all. offset=1 drops
        row 0: in a store built by `kl-fused-cache build`, row i is the teacher's distribution of
        token i, and row 0 has none (no token precedes it); rows 1 .. S then pair with labels
        input_ids[:, 1:S + 1] and the student's logits at positions 0 .. S - 1. length=None: the
        longest sequence's rows from offset on.
        """
        if isinstance(sequence_ids, torch.Tensor):
            if sequence_ids.dim() != 1 or sequence_ids.is_floating_point() or sequence_ids.dtype == torch.bool:
                raise TypeError(f"sequence_ids must be a 1-D integer tensor or a list of ints, got "
                                f"{tuple(sequence_ids.shape)} {sequence_ids.dtype}")
            ids = sequence_ids.cpu()
        else:
            ids = [as_sequence_id(i) for i in sequence_ids]
        positions = self._positions(ids)
        for name, value in (("offset", offset), ("length", length)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        lengths = self._lengths[positions]
        kept = (lengths - offset).clamp_(min=0)
        steps = int(kept.max()) if length is None and kept.shape[0] else (length or 0)
        count = positions.shape[0]
        out = {name: torch.empty(count * steps, width, dtype=dtype)
               for name, (dtype, width) in self._layout.tensor_widths().items()}
        for row, (position, rows) in enumerate(zip(positions.tolist(), kept.clamp(max=steps).tolist())):
            first, end = row * steps, (row + 1) * steps
            if rows:
                tensors = self._tensors(int(self._shard_of[position]))
                start = int(self._start[position]) + offset
                for name, buffer in out.items():
                    buffer[first : first + rows] = tensors[name][start : start + rows]
            if rows < steps:  # padding: no slots (log-prob -inf, index 0)
                for name, buffer in out.items():
                    buffer[first + rows : end] = float("-inf") if name == "logprobs" else 0
        logprobs = out.pop("logprobs").view(count, steps, self.k)
        indices = self._layout.codec.decode(out).view(count, steps, self.k)
        return TeacherTopK(indices, logprobs, self.vocab_size)

    def verify(self):
        """Check every shard now: size, sha256, header, and contents (every used slot's index in
        [0, V) and not repeated in its row, no NaN or +inf log-prob). ValueError listing every bad
        shard; returns the number of tokens checked."""
        problems = []
        for shard, (name, size, sha256, tokens) in enumerate(self._shard_files):
            try:
                tensors = MappedShard(os.path.join(self.path, name), name, size, sha256,
                                      self._layout.shard_tensors(tokens)).tensors
                self._check_contents(name, tensors, tokens)
            except ValueError as error:
                problems.append(str(error))
        if problems:
            raise ValueError(f"the teacher cache at {self.path} has {len(problems)} bad shard(s):\n  "
                             + "\n  ".join(problems))
        return self.num_tokens

    def _check_contents(self, name, tensors, tokens):
        slots = torch.arange(self.k, dtype=torch.int64)
        for start in range(0, tokens, VERIFY_ROWS):
            rows = {key: tensor[start : start + VERIFY_ROWS].clone() for key, tensor in tensors.items()}
            logprobs = rows.pop("logprobs")
            where = f"shard {name}, token {start}"
            if bool((logprobs.isnan() | (logprobs == float("inf"))).any()):
                raise ValueError(f"{where} onwards: a log-prob is NaN or +inf")
            used = logprobs != float("-inf")
            indices = self._layout.codec.decode(rows).to(torch.int64)
            if bool((((indices < 0) | (indices >= self.vocab_size)) & used).any()):
                raise ValueError(f"{where} onwards: a used slot's token id is outside [0, {self.vocab_size})")
            keyed = torch.where(used, indices, -1 - slots).sort(dim=1).values
            if bool((keyed[:, 1:] == keyed[:, :-1]).any()):
                raise ValueError(f"{where} onwards: a token id appears twice in one row's slots")
