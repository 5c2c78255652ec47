"""How a shard stores each token's K token ids: as int32, or packed in b = ceil(log2 V) bits each.

Packed, an id of b = 8m + r bits (m whole bytes, r < 8 bits more) is kept as
- ``indices_low``: its m low bytes, little-endian, K m bytes per token;
- ``indices_high``: its r high bits as r bit planes of ceil(K/8) bytes per token; bit j % 8 of byte
  j // 8 of plane t is bit 8m + t of id j.
That is exactly b bits per id (17 at V = 128256: 2 bytes + one plane, 136 bytes per token at K = 64
against 256 as int32), and it unpacks with a few whole-tensor operations: the low bytes are a dtype
view and a mask, each plane one lookup of a 256-entry table of 8 ids' bits (a row gather of 32
bytes) and an OR. (A plain bit stream of b-bit fields needs a per-byte gather, 5-10x slower in torch.)

Every encoding is a codec: the tensors it writes per token (name, dtype, row width), encode and decode.
"""

import sys

import torch

INT32 = "int32"
PACKED = "packed"
ENCODINGS = (INT32, PACKED)
MAX_VOCAB = 2**31 - 1  # ids come back as int32


def index_bits(vocab_size):
    """Bits per packed id: ceil(log2 V), at least 1 (17 for V = 128256)."""
    return max(1, (int(vocab_size) - 1).bit_length())


class Int32Codec:
    name = INT32

    def __init__(self, k, vocab_size):
        self.k = k
        self.bits = 32
        self.tensors = {"indices": (torch.int32, k)}

    def encode(self, indices):
        return {"indices": indices.to(torch.int32).contiguous()}

    def decode(self, tensors):
        return tensors["indices"]


class PackedCodec:
    name = PACKED

    def __init__(self, k, vocab_size):
        if sys.byteorder != "little":
            raise RuntimeError("packed token ids are read and written on little-endian hosts only")
        self.k = k
        self.bits = index_bits(vocab_size)
        self.low_bytes, self.planes = divmod(self.bits, 8)
        self.groups = (k + 7) // 8  # bytes per bit plane
        self.tensors = {}
        if self.low_bytes:
            self.tensors["indices_low"] = (torch.uint8, k * self.low_bytes)
        if self.planes:
            self.tensors["indices_high"] = (torch.uint8, self.planes * self.groups)
        bit_of_slot = torch.arange(8, dtype=torch.int32)
        table = (torch.arange(256, dtype=torch.int32)[:, None] >> bit_of_slot) & 1  # (256, 8): a byte's bits
        self._tables = [table << (8 * self.low_bytes + t) for t in range(self.planes)]

    def encode(self, indices):
        rows = indices.shape[0]
        ids = indices.to(torch.int32)
        out = {}
        if self.low_bytes:
            little_endian = ids.view(torch.uint8).view(rows, self.k, 4)
            out["indices_low"] = little_endian[:, :, : self.low_bytes].reshape(rows, self.k * self.low_bytes)
        if self.planes:
            slot_shifts = torch.arange(8, dtype=torch.uint8)
            bits = torch.zeros(rows, self.groups * 8, dtype=torch.uint8)
            planes = []
            for t in range(self.planes):
                bits[:, : self.k] = (ids >> (8 * self.low_bytes + t)) & 1
                # Eight bytes, byte j holding bit j alone: their sum (= OR), folded inside one int64 word.
                word = (bits.view(rows, self.groups, 8) << slot_shifts).view(torch.int64).view(rows, self.groups)
                word = word + (word >> 32)
                word = word + (word >> 16)
                word = word + (word >> 8)
                planes.append((word & 0xFF).to(torch.uint8))
            out["indices_high"] = torch.cat(planes, dim=1)
        return out

    def decode(self, tensors):
        """{name: (N, width) uint8, contiguous} -> (N, K) int32."""
        if self.low_bytes:
            low = tensors["indices_low"]
            rows = low.shape[0]
            if self.low_bytes == 1:
                ids = low.to(torch.int32)
            elif self.low_bytes == 2:
                ids = low.view(torch.int16).to(torch.int32).bitwise_and_(0xFFFF)
            else:
                low = low.view(rows, self.k, self.low_bytes)
                ids = low[:, :, 0].to(torch.int32)
                for byte in range(1, self.low_bytes):
                    ids.bitwise_or_(low[:, :, byte].to(torch.int32) << (8 * byte))
        if self.planes:
            high = tensors["indices_high"]
            rows = high.shape[0]
            if not self.low_bytes:
                ids = torch.zeros(rows, self.k, dtype=torch.int32)
            for t, table in enumerate(self._tables):
                plane = high[:, t * self.groups : (t + 1) * self.groups].reshape(-1).to(torch.int64)
                ids.bitwise_or_(table.index_select(0, plane).view(rows, self.groups * 8)[:, : self.k])
        return ids


CODECS = {INT32: Int32Codec, PACKED: PackedCodec}


def make_codec(encoding, k, vocab_size):
    return CODECS[encoding](k, vocab_size)


def payload_bytes_per_token(codec, logprob_dtype):
    """Bytes a shard holds per token: the ids' tensors plus K log-probs."""
    index_bytes = sum(dtype.itemsize * width for dtype, width in codec.tensors.values())
    return index_bytes + codec.k * logprob_dtype.itemsize
