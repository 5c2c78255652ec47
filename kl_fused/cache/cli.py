"""The kl-fused-cache command: build a teacher top-k store, inspect it, verify it.

    kl-fused-cache build --model DIR --data FILE.jsonl --out STORE [--k 64] [--max-length 2048] ...
    kl-fused-cache inspect STORE [--json]
    kl-fused-cache verify STORE
"""

import argparse
import json
import math
import sys

import torch

from kl_fused.cache._manifest import LOGPROB_DTYPES


def _positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _temperature(text):
    value = float(text)
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be finite and > 0, got {text}")
    return value


def build_parser():
    parser = argparse.ArgumentParser(prog="kl-fused-cache", description="A teacher's top-k log-probabilities "
                                     "per token, stored once for offline distillation (kl_fused.cache).")
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="run a local Hugging Face causal LM over a JSONL corpus and store "
                                "its top-k per token")
    build.add_argument("--model", required=True, metavar="DIR", help="a local model directory (config, weights, "
                       "tokenizer), loaded with AutoModelForCausalLM.from_pretrained; nothing is downloaded")
    build.add_argument("--data", required=True, metavar="FILE.jsonl", help="one JSON object per line; the "
                       "sequence id is the line number, from 0")
    build.add_argument("--out", required=True, metavar="STORE", help="the store's directory")
    build.add_argument("--text-field", default="text", help="the field holding the text (default text)")
    build.add_argument("--k", type=_positive_int, default=64, help="slots per token (default 64)")
    build.add_argument("--max-length", type=_positive_int, default=2048, help="tokens per sequence, truncated "
                       "(default 2048)")
    build.add_argument("--batch-size", type=_positive_int, default=8, help="sequences per teacher forward "
                       "(default 8)")
    build.add_argument("--temperature", type=_temperature, default=1.0, help="log-probs of logits / T (default 1)")
    build.add_argument("--index-bits", choices=("int32", "packed"), default="int32",
                       help="token ids as int32 or packed in ceil(log2 V) bits (default int32)")
    build.add_argument("--logprob-dtype", choices=tuple(LOGPROB_DTYPES), default="bfloat16")
    build.add_argument("--shard-mb", type=_positive_int, default=256, help="MiB per shard (default 256)")
    build.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    build.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto",
                       help="the teacher's dtype (default: as saved)")
    build.add_argument("--resume", action="store_true", help="continue an existing store, skipping the "
                       "sequences it has")
    build.add_argument("--quiet", action="store_true", help="no progress bar")
    inspect = commands.add_parser("inspect", help="sequences, tokens, bytes per token, support mass")
    inspect.add_argument("store")
    inspect.add_argument("--json", action="store_true", help="print the report as JSON")
    verify = commands.add_parser("verify", help="check every shard's size, checksum, header and contents")
    verify.add_argument("store")
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    try:
        if args.command == "build":
            from kl_fused.cache.build import build

            args.index_bits = None if args.index_bits == "int32" else "packed"
            args.logprob_dtype = LOGPROB_DTYPES[args.logprob_dtype]
            if args.dtype != "auto":
                args.dtype = getattr(torch, args.dtype)
            return build(args)
        from kl_fused.cache.reader import TeacherCache
        from kl_fused.cache.summary import describe, format_report

        cache = TeacherCache(args.store)
        if args.command == "inspect":
            report = describe(cache)
            print(json.dumps(report, indent=1) if args.json else format_report(report))
            return 0
        tokens = cache.verify()
        print(f"ok: {len(cache.shard_files)} shards, {len(cache)} sequences, {tokens} tokens at {cache.path}")
        return 0
    except (ValueError, FileNotFoundError, FileExistsError, ImportError, RuntimeError) as error:
        print(f"kl-fused-cache {args.command}: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
