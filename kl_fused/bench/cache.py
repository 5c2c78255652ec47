"""`kl-fused-bench --cache`: the teacher top-k store (kl_fused.cache), for both index encodings.

    kl-fused-bench --cache [--cache-vocab 128256] [--cache-k 64] [--cache-batch 8x2048]
                           [--cache-sequences 128] [--cache-workers 1,2] [--cache-write 4x256]

- Writer overhead: TeacherCacheWriter.add over W sequences of L teacher logits, closed (the shard
  written, fsync'ed and listed), against kl_fused.topk_teacher alone on the same logits; the two
  interleaved, medians compared. The logits are float32 (--dtype picks another) on --device.
- Read + batch throughput: a store of --cache-sequences sequences of S + 1 tokens of synthetic top-k
  rows, read as TeacherCache.batch(ids, length=S, offset=1) in a shuffled order, B sequences a batch:
  in this process (workers 0), and through a torch DataLoader with each --cache-workers count (forked
  workers, the batches coming back through shared memory, as a training loop gets them). Tokens/s is
  B * S * batches over an epoch's time, after a first epoch that maps and checks the shards. The
  store was just written, so it is in the page cache: this is the store's own cost, not the disk's.
- Bytes per token: the read store's bytes on disk (shards and manifest) over its tokens, and the
  shards' tensors alone.
"""

import os
import shutil
import sys
import tempfile
import time

import torch

from kl_fused.bench.environment import record_environment
from kl_fused.bench.options import DTYPES, Mode, choices, comma_list, positive_int, positive_ints
from kl_fused.bench.report import format_table, write_json
from kl_fused.bench.timing import percentile, summarize, time_interleaved

ENCODINGS = {"int32": None, "packed": "packed"}


def add_arguments(parser):
    parser.add_argument("--cache", action="store_true", help="instead of a loss: the teacher top-k store "
                        "(kl_fused.cache): writer overhead, read throughput, bytes per token")
    parser.add_argument("--cache-vocab", type=int, default=128256, metavar="V", help="--cache: vocabulary")
    parser.add_argument("--cache-k", type=int, default=64, metavar="K", help="--cache: slots per token")
    parser.add_argument("--cache-batch", default="8x2048", metavar="BxS", help="--cache: sequences x tokens read per batch")
    parser.add_argument("--cache-sequences", type=int, default=128, metavar="N", help="--cache: sequences in the read store")
    parser.add_argument("--cache-workers", default="1,2", metavar="LIST", help="--cache: DataLoader worker counts")
    parser.add_argument("--cache-write", default="4x256", metavar="WxL", help="--cache: sequences x tokens of "
                        "teacher logits for the writer overhead")
    parser.add_argument("--cache-dir", metavar="DIR", help="--cache: where the stores are written (default: a "
                        "temporary directory, removed after)")


def _pair(text, what):
    first, _, second = text.partition("x")
    return positive_int(first, what), positive_int(second, what)


def resolve(args):
    if args.providers is not None:
        raise ValueError("--cache has no providers")
    if not 1 <= args.cache_k <= args.cache_vocab < 2**31:
        raise ValueError("--cache-k must be in [1, --cache-vocab] and --cache-vocab below 2**31")
    args.batch, args.steps = _pair(args.cache_batch, "--cache-batch")
    args.write_sequences, args.write_tokens = _pair(args.cache_write, "--cache-write")
    args.workers = positive_ints(args.cache_workers, "--cache-workers")
    if args.cache_sequences < args.batch:
        raise ValueError("--cache-sequences must hold at least one batch")
    names = comma_list(args.dtypes) if args.dtypes else ["float32"]
    if len(names) != 1:
        raise ValueError("--cache takes one --dtype (of the teacher logits)")
    args.logits_dtype = DTYPES[choices(names[0], DTYPES, "dtype")[0]]


def synthetic_topk(length, vocab, k, gen):
    """`length` rows of k distinct ids spread over the vocabulary, descending log-probs of mass 0.9."""
    first = torch.randint(0, vocab, (length, 1), generator=gen)
    indices = (first + torch.arange(k) * (vocab // k)) % vocab
    logprobs = (3 * torch.randn(length, k, generator=gen)).log_softmax(-1).sort(-1, descending=True).values
    return indices, logprobs + torch.log(torch.tensor(0.9))


def bench_writer(args, directory, environment):
    """Records of topk_teacher alone and of the writer per encoding, interleaved; overhead vs topk."""
    from kl_fused import topk_teacher
    from kl_fused.cache import TeacherCacheWriter

    gen = torch.Generator().manual_seed(0)
    logits = [(3 * torch.randn(args.write_tokens, args.cache_vocab, generator=gen)).to(args.device, args.logits_dtype)
              for _ in range(args.write_sequences)]
    runs = 0

    def topk_only():
        for rows in logits:
            topk_teacher(rows, args.cache_k)[1].to(torch.bfloat16).cpu()

    def writer(index_bits):
        def run():
            nonlocal runs
            runs += 1
            with TeacherCacheWriter(os.path.join(directory, f"write-{runs}"), vocab_size=args.cache_vocab,
                                    k=args.cache_k, index_bits=index_bits) as w:
                for sequence_id, rows in enumerate(logits):
                    w.add(sequence_id, rows)
        return run

    steps = {"topk_teacher": topk_only, **{f"writer-{name}": writer(bits) for name, bits in ENCODINGS.items()}}
    samples = time_interleaved(steps, args.warmup, args.reps, args.device)
    base = percentile(samples["topk_teacher"], 0.5)
    tokens = args.write_sequences * args.write_tokens
    return [{
        "measure": "write", "provider": name, "encoding": name.partition("-")[2] or None,
        "sequences": args.write_sequences, "tokens": tokens, "vocab": args.cache_vocab, "k": args.cache_k,
        "logits_dtype": str(args.logits_dtype).replace("torch.", ""), **summarize(times),
        "tokens_per_s": tokens / percentile(times, 0.5) * 1e3,
        "overhead_vs_topk": percentile(times, 0.5) / base - 1, **record_environment(environment),
    } for name, times in samples.items()]


class _Batches(torch.utils.data.Dataset):
    """Batch i of the epoch: cache.batch of its ids (run in the DataLoader's workers)."""

    def __init__(self, cache, batches, steps):
        self.cache, self.batches, self.steps = cache, batches, steps

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, index):
        return self.cache.batch(self.batches[index], length=self.steps, offset=1)


def _unchanged(batch):
    return batch


def _epoch_seconds(batches_of, reps, warmup):
    times = []
    for rep in range(warmup + reps):
        start = time.perf_counter()
        count = sum(1 for _ in batches_of())
        if rep >= warmup:
            times.append(time.perf_counter() - start)
    return times, count


def bench_reads(args, directory, environment):
    """Per encoding: bytes per token, and read + batch tokens/s in-process and with each worker count."""
    from kl_fused.cache import TeacherCache, TeacherCacheWriter

    records = []
    for name, index_bits in ENCODINGS.items():
        path = os.path.join(directory, f"read-{name}")
        gen = torch.Generator().manual_seed(1)
        with TeacherCacheWriter(path, vocab_size=args.cache_vocab, k=args.cache_k, index_bits=index_bits) as w:
            for sequence_id in range(args.cache_sequences):
                w.add_topk(sequence_id, *synthetic_topk(args.steps + 1, args.cache_vocab, args.cache_k, gen))
        cache = TeacherCache(path)
        order = torch.randperm(args.cache_sequences, generator=gen).tolist()
        batches = [order[i : i + args.batch] for i in range(0, len(order) - args.batch + 1, args.batch)]
        records.append({"measure": "bytes_per_token", "encoding": name, "vocab": args.cache_vocab, "k": args.cache_k,
                        "index_bits": cache.index_bits, "payload_bytes_per_token": cache.bytes_per_token,
                        "disk_bytes_per_token": cache.disk_bytes() / cache.num_tokens,
                        "payload_per_k": cache.bytes_per_token / args.cache_k, **record_environment(environment)})
        for workers in [0, *args.workers]:
            if workers:
                loader = torch.utils.data.DataLoader(_Batches(cache, batches, args.steps), batch_size=None,
                                                     num_workers=workers, collate_fn=_unchanged,
                                                     persistent_workers=True, prefetch_factor=2)
                times, count = _epoch_seconds(lambda: iter(loader), args.reps, max(args.warmup, 1))
                del loader
            else:
                dataset = _Batches(TeacherCache(path), batches, args.steps)
                times, count = _epoch_seconds(lambda: (dataset[i] for i in range(len(dataset))), args.reps,
                                              max(args.warmup, 1))
            tokens = count * args.batch * args.steps
            rates = sorted(tokens / t for t in times)
            records.append({"measure": "read", "encoding": name, "workers": workers, "batch": args.batch,
                            "steps": args.steps, "vocab": args.cache_vocab, "k": args.cache_k,
                            "batches_per_epoch": count, "tokens_per_s": percentile(rates, 0.5),
                            "tokens_per_s_p10": percentile(rates, 0.1), "tokens_per_s_p90": percentile(rates, 0.9),
                            "tokens_per_s_per_worker": percentile(rates, 0.5) / max(workers, 1),
                            **record_environment(environment)})
    return records


def results_table(records):
    lines = [["measure", "encoding", "workers", "value", "detail"]]
    for r in records:
        if r["measure"] == "write":
            lines.append(["write", r["encoding"] or "-", "-", f"{r['median_ms']:.1f} ms",
                          f"{r['tokens']} tokens, {r['tokens_per_s']:,.0f} tok/s, "
                          + ("(baseline)" if r["provider"] == "topk_teacher" else f"{r['overhead_vs_topk']:+.1%} over topk_teacher")])
        elif r["measure"] == "read":
            lines.append(["read+batch", r["encoding"], str(r["workers"]), f"{r['tokens_per_s']:,.0f} tok/s",
                          f"{r['tokens_per_s_per_worker']:,.0f} per worker, p10-p90 "
                          f"{r['tokens_per_s_p10']:,.0f}-{r['tokens_per_s_p90']:,.0f}"])
        else:
            lines.append(["bytes/token", r["encoding"], "-", f"{r['disk_bytes_per_token']:.1f}",
                          f"on disk; {r['payload_bytes_per_token']} in the tensors = {r['payload_per_k']:.3f} K "
                          f"({r['index_bits']}-bit ids)"])
    return format_table(lines, left_aligned=3)


def run(args, environment):
    try:
        import kl_fused.cache  # noqa: F401
    except ImportError as error:
        print(f"ERROR: {error}", file=sys.stderr)
        return 1
    print(f"teacher top-k store: V={args.cache_vocab}, K={args.cache_k}; write {args.write_sequences} x "
          f"{args.write_tokens} {str(args.logits_dtype).replace('torch.', '')} logits on {args.device}; read {args.batch} x {args.steps} batches "
          f"from {args.cache_sequences} sequences; warmup {args.warmup}, reps {args.reps}; load average "
          f"{os.getloadavg()[0]:.1f}")
    directory = tempfile.mkdtemp(prefix="kl-fused-cache-bench-", dir=args.cache_dir)
    try:
        print("[1/2] writer overhead ...", file=sys.stderr, flush=True)
        records = bench_writer(args, directory, environment)
        print("[2/2] reads ...", file=sys.stderr, flush=True)
        records += bench_reads(args, directory, environment)
    finally:
        shutil.rmtree(directory, ignore_errors=True)
    load = os.getloadavg()[0]
    for record in records:
        record["load_average"] = load
    print(results_table(records))
    if args.json:
        write_json(args.json, records)
    return 0


MODE = Mode(
    name="cache",
    add_arguments=add_arguments,
    selected=lambda args: args.cache,
    resolve=resolve,
    run=run,
    providers={},
)
