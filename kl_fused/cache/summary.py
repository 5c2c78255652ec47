"""What `kl-fused-cache inspect` reports: counts, bytes per token, and how much of each token's
teacher distribution the stored support holds (sum of p over the K slots)."""

import torch

from kl_fused.cache.reader import VERIFY_ROWS

MASS_BINS = 1050  # [0, 1.05): bfloat16 rounding can put a support's mass a little above 1
MASS_QUANTILES = (0.01, 0.1, 0.5, 0.9, 0.99)


def support_mass_summary(cache):
    """Mean, min, max and quantiles (to 0.001) of sum_k exp(logprob_k) over the tokens with a support."""
    histogram = torch.zeros(MASS_BINS, dtype=torch.float64)
    total, count, low, high = 0.0, 0, float("inf"), float("-inf")
    for shard in range(len(cache.shard_files)):
        logprobs = cache._tensors(shard)["logprobs"]
        for start in range(0, len(logprobs), VERIFY_ROWS):
            rows = logprobs[start : start + VERIFY_ROWS].float()
            rows = rows[(rows != float("-inf")).any(1)]
            if not len(rows):
                continue
            mass = rows.exp().sum(1)
            total += float(mass.double().sum())
            count += len(mass)
            low, high = min(low, float(mass.min())), max(high, float(mass.max()))
            histogram += torch.histc(mass.clamp(max=1.05 - 1e-6), bins=MASS_BINS, min=0.0, max=1.05).double()
    if not count:
        return {"tokens_with_support": 0}
    cumulative = histogram.cumsum(0)
    quantiles = {f"p{round(q * 100)}": round(float(torch.searchsorted(cumulative, q * count) + 1) * 1.05 / MASS_BINS, 3)
                 for q in MASS_QUANTILES}
    return {"tokens_with_support": count, "mean": total / count, "min": low, **quantiles, "max": high}


def describe(cache, with_mass=True):
    """The inspect report as a dict (printable as JSON)."""
    tokens = cache.num_tokens
    disk = cache.disk_bytes()
    report = {
        "path": cache.path, "sequences": len(cache), "tokens": tokens, "shards": len(cache.shard_files),
        "vocab_size": cache.vocab_size, "k": cache.k, "temperature": cache.temperature,
        "logprob_dtype": str(cache.logprob_dtype).replace("torch.", ""), "index_encoding": cache.index_encoding,
        "index_bits": cache.index_bits, "disk_bytes": disk,
        "bytes_per_token": disk / tokens if tokens else None,
        "payload_bytes_per_token": cache.bytes_per_token,
        "metadata": cache.metadata,
    }
    if with_mass:
        report["support_mass"] = support_mass_summary(cache)
    return report


def format_report(report):
    lines = [
        f"teacher cache {report['path']}",
        f"  {report['sequences']} sequences, {report['tokens']} tokens, {report['shards']} shards, "
        f"{report['disk_bytes']} bytes on disk",
        f"  vocab {report['vocab_size']}, K {report['k']}, temperature {report['temperature']:g}, log-probs "
        f"{report['logprob_dtype']}, indices {report['index_encoding']} ({report['index_bits']} bits)",
    ]
    if report["bytes_per_token"] is not None:
        lines.append(f"  bytes per token: {report['bytes_per_token']:.1f} on disk, {report['payload_bytes_per_token']} "
                     f"in the shards' tensors ({report['payload_bytes_per_token'] / report['k']:.3f} K)")
    mass = report.get("support_mass")
    if mass and mass["tokens_with_support"]:
        quantiles = ", ".join(f"{key} {mass[key]:.3f}" for key in mass if key.startswith("p"))
        lines.append(f"  support mass sum p per token ({mass['tokens_with_support']} tokens with slots): mean "
                     f"{mass['mean']:.4f}, min {mass['min']:.4f}, {quantiles}, max {mass['max']:.4f}")
    for key, value in report["metadata"].items():
        lines.append(f"  {key}: {value}")
    return "\n".join(lines)
