"""One shard file, memory-mapped and checked before any tensor is made from it.

A shard is a safetensors file: 8 bytes (little-endian header length n), n bytes of JSON header naming
each tensor's dtype, shape and byte range in the data that follows. It is read here without the
safetensors package (whose loaders copy): the file is opened without following links, its size
compared with the manifest's, mapped read-only, its sha256 compared with the manifest's, then the
header parsed and checked field by field against the tensors the store expects (names, dtypes, shapes,
ranges inside the file, alignment), and only then are the tensors made, as views of the mapping.
Nothing is copied or allocated by size before these checks; every problem is a ValueError naming the
shard. The mapping is shared copy-on-write with forked DataLoader workers.
"""

import hashlib
import json
import mmap
import os
import stat
import warnings

import torch

from kl_fused.cache._manifest import MAX_SHARD_HEADER_BYTES, reject_duplicate_keys

SAFETENSORS_DTYPES = {"I32": torch.int32, "U8": torch.uint8, "BF16": torch.bfloat16, "F16": torch.float16,
                      "F32": torch.float32}
DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
TENSOR_KEYS = {"dtype", "shape", "data_offsets"}


def _open_regular_file(path):
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0)
    fd = os.open(path, flags)
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        raise ValueError("not a regular file")
    return fd, info.st_size


def _check_header(header, data_bytes, expected):
    """{name: (offset, dtype, shape)} of the tensors, checked against expected {name: (dtype, shape)}."""
    if not isinstance(header, dict):
        raise ValueError("its header is not a JSON object")
    header = dict(header)
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise ValueError("its header's __metadata__ is not an object of strings")
    if set(header) != set(expected):
        raise ValueError(f"it holds the tensors {sorted(header)}, the store expects {sorted(expected)}")
    layout = {}
    for name, (dtype, shape) in expected.items():
        entry = header[name]
        if not isinstance(entry, dict) or set(entry) != TENSOR_KEYS:
            raise ValueError(f"tensor {name}: its header entry must have the keys {sorted(TENSOR_KEYS)}")
        if entry["dtype"] != DTYPE_NAMES[dtype]:
            raise ValueError(f"tensor {name}: dtype {entry['dtype']!r}, the store expects {DTYPE_NAMES[dtype]}")
        if entry["shape"] != list(shape):
            raise ValueError(f"tensor {name}: shape {entry['shape']!r}, the manifest implies {list(shape)}")
        offsets = entry["data_offsets"]
        if (not isinstance(offsets, list) or len(offsets) != 2 or any(type(o) is not int for o in offsets)
                or not 0 <= offsets[0] <= offsets[1] <= data_bytes):
            raise ValueError(f"tensor {name}: data_offsets {offsets!r} outside the file's {data_bytes} data bytes")
        size = dtype.itemsize
        for extent in shape:
            size *= extent
        if offsets[1] - offsets[0] != size:
            raise ValueError(f"tensor {name}: {offsets[1] - offsets[0]} bytes for a {list(shape)} {dtype} tensor")
        layout[name] = (offsets[0], dtype, shape)
    return layout


class MappedShard:
    """The tensors of one checked shard, as read-only views of its memory map."""

    def __init__(self, path, name, expected_bytes, expected_sha256, expected_tensors):
        self.name = name
        try:
            self.tensors = self._map(path, expected_bytes, expected_sha256, expected_tensors)
        except FileNotFoundError:
            raise ValueError(f"shard {name}: the file is missing") from None
        except (OSError, ValueError) as error:
            raise ValueError(f"shard {name}: {error}") from None

    def _map(self, path, expected_bytes, expected_sha256, expected_tensors):
        fd, size = _open_regular_file(path)
        try:
            if size != expected_bytes:
                raise ValueError(f"{size} bytes on disk, the manifest says {expected_bytes}: truncated or altered")
            mapping = mmap.mmap(fd, size, access=mmap.ACCESS_READ)
        finally:
            os.close(fd)
        digest = hashlib.sha256(mapping).hexdigest()
        if digest != expected_sha256:
            raise ValueError(f"checksum mismatch (sha256 {digest}, the manifest says {expected_sha256}): "
                             "the file was altered")
        header_bytes = int.from_bytes(mapping[:8], "little")
        if not 2 <= header_bytes <= min(size - 8, MAX_SHARD_HEADER_BYTES):
            raise ValueError(f"its header length {header_bytes} does not fit the file")
        try:
            header = json.loads(bytes(mapping[8 : 8 + header_bytes]).decode("utf-8"),
                                object_pairs_hook=reject_duplicate_keys)
        except (UnicodeDecodeError, ValueError) as error:
            raise ValueError(f"its header is not valid JSON: {error}") from None
        data_start = 8 + header_bytes
        layout = _check_header(header, size - data_start, expected_tensors)
        for name, (offset, dtype, _) in layout.items():
            if (data_start + offset) % dtype.itemsize:
                raise ValueError(f"tensor {name} is not aligned to its {dtype.itemsize}-byte elements")
        with warnings.catch_warnings():  # read-only on purpose: tensors are only ever copied out of it
            warnings.filterwarnings("ignore", message="The given buffer is not writable")
            whole = torch.frombuffer(mapping, dtype=torch.uint8)
        tensors = {}
        for name, (offset, dtype, shape) in layout.items():
            begin = data_start + offset
            end = begin + dtype.itemsize * shape[0] * shape[1]
            tensors[name] = whole[begin:end].view(dtype).view(shape)
        return tensors
