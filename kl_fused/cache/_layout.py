"""What a store's properties (K, V, log-prob dtype, index encoding) imply for its shards: the tensors
per token, their dtypes and widths, and the bytes per token; and reading the manifest from disk."""

import os
import stat

import torch

from kl_fused.cache._manifest import LOGPROB_DTYPES, MANIFEST_NAME, MAX_MANIFEST_BYTES, parse_manifest
from kl_fused.cache._packing import make_codec, payload_bytes_per_token


class StoreLayout:
    def __init__(self, vocab_size, k, logprob_dtype, index_encoding):
        self.vocab_size, self.k, self.logprob_dtype = vocab_size, k, logprob_dtype
        self.codec = make_codec(index_encoding, k, vocab_size)
        self.bytes_per_token = payload_bytes_per_token(self.codec, logprob_dtype)

    @classmethod
    def of(cls, manifest):
        return cls(manifest["vocab_size"], manifest["k"], LOGPROB_DTYPES[manifest["logprob_dtype"]],
                   manifest["index_encoding"])

    def tensor_widths(self):
        """{name: (dtype, width)} of one token's row in each of a shard's tensors."""
        return {**self.codec.tensors, "logprobs": (self.logprob_dtype, self.k)}

    def shard_tensors(self, tokens):
        return {name: (dtype, (tokens, width)) for name, (dtype, width) in self.tensor_widths().items()}


def read_manifest(directory):
    """The checked manifest of the store in `directory` (FileNotFoundError if there is none)."""
    path = os.path.join(directory, MANIFEST_NAME)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"no teacher cache at {directory}: not a directory")
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"no teacher cache at {directory}: it has no {MANIFEST_NAME}") from None
    if not stat.S_ISREG(info.st_mode):
        raise ValueError(f"{path} is not a regular file")
    if info.st_size > MAX_MANIFEST_BYTES:
        raise ValueError(f"{path} is {info.st_size} bytes, more than a manifest may be ({MAX_MANIFEST_BYTES})")
    with open(path, "rb") as manifest_file:
        data = manifest_file.read(MAX_MANIFEST_BYTES + 1)
    try:
        return parse_manifest(data, lambda manifest: StoreLayout.of(manifest).bytes_per_token)
    except ValueError as error:
        raise ValueError(f"{path}: {error}") from None


def as_sequence_id(sequence_id):
    """A Python int from an int-like id (not bool), else TypeError."""
    if isinstance(sequence_id, bool) or isinstance(sequence_id, torch.Tensor) and sequence_id.dim() != 0:
        raise TypeError(f"a sequence id must be an integer, got {sequence_id!r}")
    try:
        return int(sequence_id.__index__())
    except (AttributeError, TypeError, RuntimeError):
        raise TypeError(f"a sequence id must be an integer, got {type(sequence_id).__name__}") from None
