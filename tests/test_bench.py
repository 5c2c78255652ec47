"""The benchmark CLI runs end to end on a tiny case and writes the records it promises (its figures
themselves live in bench/results/, never in tests)."""

import json

import torch

from kl_fused import bench
from kl_fused.distributed import collective_bytes_per_call


def test_bench_writes_one_checked_record_per_provider(tmp_path):
    out = tmp_path / "records.json"
    code = bench.main(["--cases", "8x1000:float32", "--providers", "fused,eager,reference",
                       "--reps", "2", "--warmup", "1", "--json", str(out)])
    assert code == 0
    records = json.loads(out.read_text())
    records = records["records"] if isinstance(records, dict) else records
    assert sorted(r["provider"] for r in records) == ["eager", "fused", "reference"]
    for record in records:
        assert record["rows"] == 8 and record["vocab"] == 1000 and record["dtype"] == "float32"
        assert record["median_ms"] > 0 and record["torch_version"] == torch.__version__
        assert record["allocator"] == "default"


def test_bench_checks_its_output_paths_before_running(tmp_path, capsys):
    file = tmp_path / "file"
    file.write_text("")
    for flag, path, message in (("--json", "/nonexistent/x.json", "the directory /nonexistent does not exist"),
                                ("--json", str(tmp_path), "is a directory"),
                                ("--plot", str(file / "x.png"), "does not exist")):
        try:
            bench.main(["--cases", "8x1000:float32", "--providers", "fused", "--reps", "1", flag, path])
            raise AssertionError(f"{flag} {path} was accepted")
        except SystemExit as exit:
            assert exit.code == 2
        captured = capsys.readouterr()
        assert message in captured.err and flag in captured.err
        assert "fused kernel available" not in captured.out, "the benchmark started before the path was checked"


def test_bench_keep_freed_memory_reruns_with_the_glibc_settings_and_says_so(tmp_path):
    """--keep-freed-memory re-runs the command under the tunables of allocator.py; every record of
    that run names them, as every record of a default run says "default"."""
    import subprocess
    import sys

    from kl_fused.bench.allocator import KEEP_FREED_MEMORY_ENV

    out = tmp_path / "records.json"
    subprocess.run([sys.executable, "-m", "kl_fused.bench", "--keep-freed-memory", "--cases", "8x1000:float32",
                    "--providers", "fused,eager", "--reps", "2", "--warmup", "1", "--json", str(out)], check=True)
    records = json.loads(out.read_text())
    assert sorted(r["provider"] for r in records) == ["eager", "fused"]
    for record in records:
        assert record["allocator"].startswith("glibc keeping freed memory")
        assert all(f"{name}={value}" in record["allocator"] for name, value in KEEP_FREED_MEMORY_ENV.items())


def test_bench_vocab_parallel_mode(tmp_path):
    out = tmp_path / "vp.json"
    code = bench.main(["--vocab-parallel", "2", "--cases", "16x3001:bfloat16", "--reps", "2", "--warmup", "1",
                       "--json", str(out)])
    assert code == 0
    records = json.loads(out.read_text())
    records = records["records"] if isinstance(records, dict) else records
    single, parallel = records
    assert single["provider"] == "fused" and parallel["provider"] == "vocab-parallel" and parallel["ranks"] == 2
    assert parallel["shard_widths"] == [1501, 1500]
    assert parallel["bytes_sent_per_rank"] == collective_bytes_per_call(16, torch.bfloat16) == 400 + 16 * 20
    assert parallel["relative_difference_vs_fused"] < 1e-4


def test_bench_linear_mode_checks_times_and_measures_memory(tmp_path):
    out = tmp_path / "linear.json"
    code = bench.main(["--linear", "--linear-cases", "48x16x300", "--teacher", "hidden,logits",
                       "--providers", "materialized-eager,materialized-fused,linear,trl", "--reps", "2", "--warmup", "1",
                       "--json", str(out)])
    assert code == 0
    records = json.loads(out.read_text())
    by_teacher = {}
    for record in records:
        by_teacher.setdefault(record["teacher"], set()).add(record["provider"])
        assert (record["rows"], record["hidden"], record["vocab"], record["dtype"]) == (48, 16, 300, "float32")
        assert record["median_ms"] > 0 and record["peak_above_inputs_mib"] is not None
        assert "peak RSS" in record["memory_method"]
    assert by_teacher == {"hidden": {"materialized-eager", "materialized-fused", "linear", "trl"},
                          "logits": {"materialized-eager", "materialized-fused", "linear"}}


def test_bench_package_has_no_import_circle():
    """Modes import the shared core only; the core imports no mode; nothing imports cli.py but the
    package's entry point (on call). A circle would make the import order matter again."""
    import ast
    import pathlib

    package = pathlib.Path(bench.__file__).parent
    edges, modes = {}, set()
    for path in package.glob("*.py"):
        imported = set()
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("kl_fused.bench"):
                if node.module == "kl_fused.bench":
                    imported.update(alias.name for alias in node.names)
                else:
                    imported.add(node.module.split(".")[2])
        edges[path.stem] = imported - {path.stem}
        if any(isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "MODE" for t in node.targets)
               for node in tree.body):
            modes.add(path.stem)
    assert {"kl", "vocab_parallel", "linear", "jsd", "sparse", "cache"} <= modes
    mode_helpers = {name for name in edges if name.endswith("_providers")}
    core = set(edges) - modes - mode_helpers - {"cli", "__init__", "__main__"}
    for name in core:
        assert not edges[name] & (modes | mode_helpers | {"cli"}), f"core module {name} imports {edges[name]}"
    for name in modes:
        assert not edges[name] & ((modes - {name}) | {"cli"}), f"mode {name} imports {edges[name]}"

    def visit(name, path):
        assert name not in path, f"import circle: {' -> '.join(path + [name])}"
        for target in edges.get(name, ()):
            visit(target, path + [name])

    for name in edges:
        if name != "__init__":  # __init__ imports cli inside main(), on call
            visit(name, [])


def test_bench_jsd_mode_checks_and_times_each_beta(tmp_path):
    out = tmp_path / "jsd.json"
    code = bench.main(["--jsd", "--beta", "0,0.3", "--cases", "8x1000:bfloat16", "--providers", "fused,eager",
                       "--reps", "2", "--warmup", "1", "--json", str(out)])
    assert code == 0
    records = json.loads(out.read_text())
    assert sorted((r["provider"], r["beta"]) for r in records) == [("eager", 0.0), ("eager", 0.3), ("fused", 0.0),
                                                                  ("fused", 0.3)]
    assert all(r["pass"] == "fwd+bwd" and r["median_ms"] > 0 and r["speedup_vs_eager"] > 0 for r in records)


def test_bench_sparse_mode(tmp_path):
    out = tmp_path / "sparse.json"
    code = bench.main(["--sparse", "--cases", "6x700:bfloat16", "--slots", "1,16", "--providers", "trl-eager,fused,dense",
                       "--reps", "2", "--warmup", "1", "--json", str(out)])
    assert code == 0
    records = json.loads(out.read_text())
    assert sorted((r["provider"], r["slots"]) for r in records) == [
        ("dense", 1), ("dense", 16), ("fused", 1), ("fused", 16), ("trl-eager", 1), ("trl-eager", 16)]
    for record in records:
        assert record["rows"] == 6 and record["vocab"] == 700 and record["tail"] == "bucket"
        assert record["median_ms"] > 0 and record["torch_version"] == torch.__version__


def test_bench_distill_mode_checks_and_times_every_provider(tmp_path):
    """--distill on tiny logits and linear cases: every provider that runs here (torch.compile's are left
    to the other modes' tests, for time) is checked against the float64 reference (a disagreement makes
    the exit code 1) and timed; the linear memory probe's step runs in-process."""
    from kl_fused.bench import distill

    out = tmp_path / "distill.json"
    providers = "eager,two-pass,fused,soft,materialized-eager,materialized-two-pass,linear,linear-soft,liger,trl"
    code = bench.main(["--distill", "--cases", "24x300:float32", "--distill-linear-cases", "24x8x300",
                       "--teachers", "dense,topk", "--topk-slots", "8", "--temperatures", "2", "--reps", "2",
                       "--warmup", "1", "--providers", providers, "--no-memory", "--json", str(out)])
    assert code == 0
    records = json.loads(out.read_text())
    logits = {(r["provider"], r["teacher"]) for r in records if r["input"] == "logits"}
    assert logits == {(p, t) for p in ("eager", "two-pass", "fused", "soft") for t in ("dense", "topk")}
    linear = {(r["provider"], r["teacher"]) for r in records if r["input"] == "hidden"}
    assert {(p, "dense") for p in ("materialized-eager", "liger", "trl", "linear", "linear-soft")} <= linear
    assert {(p, "topk") for p in ("materialized-two-pass", "linear", "linear-soft")} <= linear
    fused = next(r for r in records if r["provider"] == "fused" and r["teacher"] == "dense")
    assert fused["x_vs_soft"] > 0 and fused["x_vs_two-pass"] > 0 and fused["hard_weight"] == 0.5
    step, tensors = distill.memory_probe_step("linear", 16, 8, 200, "float32", "topk", 2.0, 0.5, 8, "cpu")
    assert step().isfinite() and tensors[0].grad is not None and tensors[1].grad is not None


def test_bench_cache_mode_writes_reads_and_sizes_both_encodings(tmp_path):
    import pytest

    pytest.importorskip("safetensors")
    out = tmp_path / "cache.json"
    code = bench.main(["--cache", "--cache-vocab", "1000", "--cache-k", "8", "--cache-batch", "2x16",
                       "--cache-sequences", "6", "--cache-workers", "1", "--cache-write", "2x8", "--reps", "2",
                       "--warmup", "1", "--cache-dir", str(tmp_path), "--json", str(out)])
    assert code == 0
    records = json.loads(out.read_text())
    writes = {r["provider"]: r for r in records if r["measure"] == "write"}
    assert set(writes) == {"topk_teacher", "writer-int32", "writer-packed"}
    assert writes["topk_teacher"]["overhead_vs_topk"] == 0 and all(r["median_ms"] > 0 for r in writes.values())
    reads = {(r["encoding"], r["workers"]) for r in records if r["measure"] == "read"}
    assert reads == {("int32", 0), ("int32", 1), ("packed", 0), ("packed", 1)}
    assert all(r["tokens_per_s"] > 0 and r["batches_per_epoch"] == 3 for r in records if r["measure"] == "read")
    sizes = {r["encoding"]: r for r in records if r["measure"] == "bytes_per_token"}
    assert sizes["int32"]["payload_bytes_per_token"] == 6 * 8  # int32 ids and bfloat16 log-probs
    assert sizes["packed"]["payload_bytes_per_token"] == 8 + 2 + 16  # 10-bit ids: a byte and two bit planes
    assert all(r["disk_bytes_per_token"] > r["payload_bytes_per_token"] for r in sizes.values())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("kl-fused-cache-bench-")], "stores left behind"
