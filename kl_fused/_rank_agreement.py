"""One all_gather that makes a vocab-parallel call fail on every rank or on none (kl_fused.distributed).

Each rank sends a fixed record: whether its own arguments passed their checks (with the message when
not) and integer fields describing the call (rows, shard width, dtype, options, and hashes of the
mask, labels and top-k slots, which are O(rows) and the same on every rank in a correct call). A rank
whose arguments are invalid raises its own error; the others raise a ValueError that names that rank
and quotes its message; ranks that disagree on a field all raise a ValueError listing the values.
Nothing else runs a collective before this check, so a bad call never leaves a rank waiting.
"""

import hashlib

import torch
import torch.distributed as dist

MESSAGE_BYTES = 320


def collective_device(group, device):
    """Where this group's collectives run: the tensors' device, or the CPU for a backend without it."""
    backend = str(dist.get_backend(group)).lower()
    if device.type == "cpu" or backend == "nccl" or device.type in backend:
        return device
    return torch.device("cpu")


def content_hash(tensor):
    """A 64-bit hash of a tensor's shape, dtype and values (0 for None), the same in every process.
    Reads the tensor on the host: O(numel) bytes, for O(rows) tensors (masks, labels, top-k slots)."""
    if tensor is None:
        return 0
    data = tensor.detach().reshape(-1).contiguous().cpu()
    raw = data.view(torch.uint8) if data.dtype != torch.bool else data.to(torch.uint8)
    digest = hashlib.blake2b(raw.numpy().tobytes(), digest_size=8)
    digest.update(f"{tuple(tensor.shape)}{tensor.dtype}".encode())
    return int.from_bytes(digest.digest(), "little", signed=True)


def record_bytes(fields):
    """Bytes of one rank's record: the ok flag, the fields, the message."""
    return 8 * (1 + len(fields) + MESSAGE_BYTES // 8)


def refuse_meta(name, tensor, what="tensors"):
    """Raised by a rank whose inputs are meta tensors: the vocab-parallel losses exchange row statistics,
    which meta tensors do not hold (the other ranks then raise through the agreement check)."""
    if tensor.is_meta:
        raise ValueError(f"{name} needs tensors with values (the ranks exchange row statistics), got {what} on "
                         "device 'meta'")


def call_device(tensor):
    """The device a call's agreement runs on: its input's, or the CPU for a meta tensor or an argument that
    is no tensor (whose own check has failed, and whose error the agreement then sends to every rank)."""
    return tensor.device if isinstance(tensor, torch.Tensor) and not tensor.is_meta else torch.device("cpu")


def refuse_create_graph(name):
    """Raised by a backward that gives first-order gradients only, when autograd asks for a graph of
    them (backward runs with grad mode on only under create_graph=True), as the single-process ops do."""
    if torch.is_grad_enabled():
        raise RuntimeError(f"kl_fused.distributed.{name} supports first-order gradients only (backward with "
                           "create_graph=True asks for second-order ones)")


def agree(caller, fields, values, error, device, group, checks, text=None):
    """All-gathers this rank's record and raises the same ValueError on every rank when a rank's
    arguments are invalid or the ranks disagree on a field of `checks` ((field, what it is) pairs, in
    the order they are checked; `describe` turns a value into words). `fields`: the record's field
    names (the same tuple on every rank); `values`: this rank's ints (ignored when `error` is set);
    `text`: what a valid rank sends in the message's place, shown for a check whose describe is None.
    Returns the gathered fields, rank by rank (dicts)."""
    message = b""
    if error is None:
        ints = [int(values[name]) for name in fields]
        ok = 1
        message = (text or "").encode("utf-8")[:MESSAGE_BYTES]
    else:
        ints = [0] * len(fields)
        ok = 0
        message = f"{type(error).__name__}: {error}".encode("utf-8")[:MESSAGE_BYTES]
    text = torch.frombuffer(bytearray(message.ljust(MESSAGE_BYTES, b"\0")), dtype=torch.int64)
    record = torch.cat([torch.tensor([ok] + ints, dtype=torch.int64), text])
    if str(dist.get_backend(group)).lower() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    record = record.to(collective_device(group, device))
    gathered = [torch.empty_like(record) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, record, group=group)
    records = [r.cpu() for r in gathered]
    gathered_fields = [dict(zip(fields, r[1: 1 + len(fields)].tolist())) for r in records]

    texts = [r[1 + len(fields):].numpy().tobytes().rstrip(b"\0").decode("utf-8", "replace") for r in records]
    failed = [rank for rank, r in enumerate(records) if not r[0]]
    if failed:
        if error is not None:
            raise error
        rank = failed[0]
        raise ValueError(f"{caller}: rank {rank} of the group rejected its arguments ({texts[rank]}); "
                         f"ranks that failed: {failed}")
    for name, what, describe in checks:
        values_by_rank = [f[name] for f in gathered_fields]
        if len(set(values_by_rank)) > 1:
            shown = texts if describe is None else [describe(v) for v in values_by_rank]
            raise ValueError(f"{caller}: the ranks of the group disagree on {what} (rank by rank: {shown}); "
                             "every rank must pass the same rows and options")
    return gathered_fields
