"""The store's manifest: one JSON file naming the store's properties and, per shard, its file, byte
size, sha256, token count and sequences (ids and lengths, in the order their rows follow each other).

    {"format": "kl_fused.teacher_cache", "format_version": 1,
     "vocab_size": 128256, "k": 64, "temperature": 1.0,
     "logprob_dtype": "bfloat16", "index_encoding": "packed", "index_bits": 17,
     "metadata": {"teacher": "...", ...},
     "shards": [{"file": "shard-00000.safetensors", "bytes": 83886312, "sha256": "9f2c...",
                 "tokens": 317750, "sequence_ids": [0, 1, ...], "lengths": [2048, 1733, ...]}, ...]}

The manifest is untrusted input: parse_manifest checks every field's type and range, that the shard
files are plain names inside the store (no path), and that each shard's claimed size can hold its
token count, before anything is sized from it; a problem is a ValueError naming the field.
"""

import json
import math
import re

import torch

from kl_fused.cache._packing import ENCODINGS, MAX_VOCAB, index_bits

FORMAT = "kl_fused.teacher_cache"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
MAX_MANIFEST_BYTES = 2**30
SHARD_NAME = re.compile(r"shard-[0-9]{5,9}\.safetensors")
MAX_SEQUENCE_ID = 2**63 - 1
MAX_SHARD_HEADER_BYTES = 2**20  # the safetensors header of a shard: two or three tensors
LOGPROB_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
KEYS = ("format", "format_version", "vocab_size", "k", "temperature", "logprob_dtype", "index_encoding",
        "index_bits", "metadata", "shards")
SHARD_KEYS = ("file", "bytes", "sha256", "tokens", "sequence_ids", "lengths")


def shard_name(number):
    return f"shard-{number:05d}.safetensors"


def shard_number(name):
    return int(name[len("shard-") : -len(".safetensors")])


def dtype_name(dtype):
    for name, known in LOGPROB_DTYPES.items():
        if known == dtype:
            return name
    raise TypeError(f"logprob_dtype must be one of torch.{', torch.'.join(LOGPROB_DTYPES)}, got {dtype}")


def new_manifest(vocab_size, k, temperature, logprob_dtype, index_encoding, metadata):
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "vocab_size": vocab_size,
        "k": k,
        "temperature": float(temperature),
        "logprob_dtype": dtype_name(logprob_dtype),
        "index_encoding": index_encoding,
        "index_bits": 32 if index_encoding == "int32" else index_bits(vocab_size),
        "metadata": dict(metadata),
        "shards": [],
    }


def dumps(manifest):
    return json.dumps(manifest, separators=(",", ":")).encode() + b"\n"


def reject_duplicate_keys(pairs):
    """json's object_pairs_hook: a JSON object, or ValueError for a key given twice."""
    seen = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"duplicate key {key!r}")
        seen[key] = value
    return seen


def _no_constant(name):
    raise ValueError(f"{name} is not valid JSON")


def _int(value, what, low, high):
    if type(value) is not int or not low <= value <= high:
        raise ValueError(f"{what} must be an integer in [{low}, {high}], got {value!r}")
    return value


def _exact_keys(entry, keys, what):
    if not isinstance(entry, dict):
        raise ValueError(f"{what} must be a JSON object, got {type(entry).__name__}")
    if set(entry) != set(keys):
        missing, unknown = sorted(set(keys) - set(entry)), sorted(set(entry) - set(keys))
        raise ValueError(f"{what} must have the keys {list(keys)}: missing {missing}, unknown {unknown}")


def parse_manifest(data, bytes_per_token_of):
    """The checked manifest of `data` (bytes), or ValueError. bytes_per_token_of(manifest) gives a
    shard's payload bytes per token for the store's K, V, dtype and encoding (checked first)."""
    try:
        manifest = json.loads(data.decode("utf-8"), object_pairs_hook=reject_duplicate_keys,
                              parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError) as error:
        raise ValueError(f"the manifest is not valid JSON: {error}") from None
    if not isinstance(manifest, dict):
        raise ValueError(f"the manifest must be a JSON object, got {type(manifest).__name__}")
    if manifest.get("format") != FORMAT:
        raise ValueError(f"not a kl_fused teacher cache manifest (format {manifest.get('format')!r}, "
                         f"expected {FORMAT!r})")
    version = manifest.get("format_version")
    if type(version) is not int or version < 1:
        raise ValueError(f"format_version must be a positive integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise ValueError(f"the store has format version {version}, newer than this kl_fused reads "
                         f"({FORMAT_VERSION}): upgrade kl_fused")
    _exact_keys(manifest, KEYS, "the manifest")
    vocab = _int(manifest["vocab_size"], "vocab_size", 1, MAX_VOCAB)
    _int(manifest["k"], "k", 1, vocab)
    temperature = manifest["temperature"]
    if type(temperature) not in (int, float) or not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if manifest["logprob_dtype"] not in LOGPROB_DTYPES:
        raise ValueError(f"logprob_dtype must be one of {list(LOGPROB_DTYPES)}, got {manifest['logprob_dtype']!r}")
    if manifest["index_encoding"] not in ENCODINGS:
        raise ValueError(f"index_encoding must be one of {list(ENCODINGS)}, got {manifest['index_encoding']!r}")
    expected_bits = 32 if manifest["index_encoding"] == "int32" else index_bits(vocab)
    if manifest["index_bits"] != expected_bits:
        raise ValueError(f"index_bits must be {expected_bits} for {manifest['index_encoding']} indices at "
                         f"vocab_size {vocab}, got {manifest['index_bits']!r}")
    metadata = manifest["metadata"]
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError("metadata must be a JSON object of strings")
    if not isinstance(manifest["shards"], list):
        raise ValueError("shards must be a list")
    bytes_per_token = bytes_per_token_of(manifest)
    files, ids = set(), set()
    for number, shard in enumerate(manifest["shards"]):
        what = f"shard entry {number}"
        _exact_keys(shard, SHARD_KEYS, what)
        name = shard["file"]
        if not isinstance(name, str) or not SHARD_NAME.fullmatch(name):
            raise ValueError(f"{what}: file must be a name like shard-00000.safetensors in the store's "
                             f"directory, got {name!r}")
        if name in files:
            raise ValueError(f"{what}: shard {name} is listed twice")
        files.add(name)
        what = f"shard {name}"
        if not isinstance(shard["sha256"], str) or not re.fullmatch(r"[0-9a-f]{64}", shard["sha256"]):
            raise ValueError(f"{what}: sha256 must be 64 lowercase hex digits")
        size = _int(shard["bytes"], f"{what}: bytes", 8, 2**62)
        tokens = _int(shard["tokens"], f"{what}: tokens", 0, 2**62)
        if tokens * bytes_per_token > size - 8:
            raise ValueError(f"{what}: {tokens} tokens of {bytes_per_token} bytes cannot fit in {size} bytes")
        sequence_ids, lengths = shard["sequence_ids"], shard["lengths"]
        if not isinstance(sequence_ids, list) or not isinstance(lengths, list) or len(sequence_ids) != len(lengths):
            raise ValueError(f"{what}: sequence_ids and lengths must be lists of the same length")
        for sequence_id in sequence_ids:
            _int(sequence_id, f"{what}: a sequence id", 0, MAX_SEQUENCE_ID)
        for length in lengths:
            _int(length, f"{what}: a sequence length", 0, tokens)
        if sum(lengths) != tokens:
            raise ValueError(f"{what}: its sequences' lengths add up to {sum(lengths)}, not its {tokens} tokens")
        before = len(ids)
        ids.update(sequence_ids)
        if len(ids) != before + len(sequence_ids):
            raise ValueError(f"{what}: a sequence id appears twice in the store")
    return manifest
