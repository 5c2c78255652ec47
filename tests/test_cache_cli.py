"""The kl-fused-cache command (build, inspect, verify) on a tiny local Llama teacher and word-level
tokenizer (examples/offline_distill.py makes them; nothing is downloaded), and the packaging of the
cache extra: `import kl_fused` needs only torch."""

import json
import math
import os
import pathlib
import re
import runpy
import subprocess
import sys
import tomllib

import pytest
import torch

pytest.importorskip("safetensors")
pytest.importorskip("transformers")
from kl_fused.cache import TeacherCache  # noqa: E402
from kl_fused.cache.cli import main  # noqa: E402
from test_examples import load_example  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
MAX_LENGTH, K = 12, 6


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """(model directory, corpus) of a random-initialised teacher."""
    example = load_example("offline_distill")
    workdir = tmp_path_factory.mktemp("teacher")
    corpus = workdir / "corpus.jsonl"
    example.write_corpus(corpus, lines=14)
    with open(corpus, "a") as out:  # a blank line (skipped, its number unused), an empty text, one more record
        out.write("\n" + json.dumps({"text": ""}) + "\n" + json.dumps({"text": "the cat sees a book ."}) + "\n")
    example.save_teacher(workdir / "model", corpus, MAX_LENGTH, steps=0)
    return workdir / "model", corpus


def build(teacher, store, *extra):
    model_dir, corpus = teacher
    return main(["build", "--model", str(model_dir), "--data", str(corpus), "--out", str(store), "--k", str(K),
                 "--max-length", str(MAX_LENGTH), "--batch-size", "4", "--device", "cpu", "--quiet", *extra])


@pytest.fixture(scope="module")
def store(teacher, tmp_path_factory):
    path = tmp_path_factory.mktemp("store") / "store"
    assert build(teacher, path, "--temperature", "2", "--index-bits", "packed", "--logprob-dtype", "float32") == 0
    return path


def test_build_stores_the_teachers_topk_of_each_token_by_line_number(teacher, store):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, corpus = teacher
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    lines = corpus.read_text().splitlines()
    cache = TeacherCache(store)
    assert cache.sequence_ids == [n for n, line in enumerate(lines) if line.strip()] and 14 not in cache
    assert (cache.k, cache.temperature, cache.index_encoding, cache.vocab_size) == (K, 2.0, "packed", len(tokenizer))
    assert cache.metadata["data"] == str(corpus) and cache.metadata["max_length"] == str(MAX_LENGTH)
    assert cache.length(15) == 1  # the empty text: its [BOS] alone, a row with no slots
    for sequence_id in (0, 5, 15, 16):
        tokens = tokenizer(json.loads(lines[sequence_id])["text"], truncation=True, max_length=MAX_LENGTH)["input_ids"]
        with torch.no_grad():  # alone, unpadded: the batch's padding must not have changed anything
            logprobs = (model(input_ids=torch.tensor([tokens])).logits[0].double() / 2).log_softmax(-1)
        indices, stored = cache[sequence_id]
        assert len(indices) == len(tokens) and (stored[0] == -float("inf")).all()
        for row in range(1, len(tokens)):  # row i: the teacher's distribution of token i, at position i - 1
            torch.testing.assert_close(stored[row].double(), logprobs[row - 1, indices[row].long()],
                                       atol=1e-5, rtol=0)
            rest = logprobs[row - 1].clone()
            rest[indices[row].long()] = -float("inf")
            assert stored[row].min() >= rest.max() - 1e-5, "the stored slots are the k largest"


def test_inspect_reports_counts_bytes_and_support_mass(store, capsys):
    assert main(["inspect", str(store), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    cache = TeacherCache(store)
    assert report["sequences"] == len(cache) == 16 and report["tokens"] == cache.num_tokens
    bits = math.ceil(math.log2(cache.vocab_size))  # packed ids: whole bytes, then bit planes of ceil(K / 8) bytes
    assert report["payload_bytes_per_token"] == K * (bits // 8) + (bits % 8) * math.ceil(K / 8) + 4 * K
    assert report["disk_bytes"] / report["tokens"] == report["bytes_per_token"] > report["payload_bytes_per_token"]
    masses = torch.cat([cache[i][1].double().exp().sum(1) for i in cache.sequence_ids])
    masses = masses[masses > 0]  # row 0 of each sequence has no slots
    mass = report["support_mass"]
    assert mass["tokens_with_support"] == len(masses)
    assert mass["mean"] == pytest.approx(float(masses.mean()), rel=1e-5)
    assert mass["min"] == pytest.approx(float(masses.min()), rel=1e-5)
    assert abs(mass["p50"] - float(masses.quantile(0.5))) <= 0.003
    assert main(["inspect", str(store)]) == 0
    text = capsys.readouterr().out
    assert "16 sequences" in text and "support mass" in text and "data_sha256" in text


def test_build_resumes_and_refuses_what_it_cannot_continue(teacher, store, tmp_path, capsys):
    before = (store / "manifest.json").read_bytes()
    assert build(teacher, store, "--temperature", "2", "--index-bits", "packed", "--logprob-dtype", "float32",
                 "--resume") == 0
    assert "stored 0 new tokens" in capsys.readouterr().out
    assert (store / "manifest.json").read_bytes() == before
    assert build(teacher, store, "--temperature", "2", "--index-bits", "packed", "--logprob-dtype", "float32") == 1
    assert "resume=True" in capsys.readouterr().err
    assert build(teacher, store, "--index-bits", "packed", "--logprob-dtype", "float32", "--resume") == 1
    assert "temperature 2.0 (this writer: 1.0)" in capsys.readouterr().err
    model_dir, corpus = teacher
    changed = tmp_path / "changed.jsonl"
    changed.write_text(corpus.read_text() + json.dumps({"text": "a dog ."}) + "\n")
    assert build((model_dir, changed), store, "--temperature", "2", "--index-bits", "packed", "--logprob-dtype",
                 "float32", "--resume") == 1
    assert "metadata differs in ['data', 'data_sha256']" in capsys.readouterr().err


def test_build_errors_name_the_problem(teacher, tmp_path, capsys):
    model_dir, corpus = teacher
    assert build((tmp_path, corpus), tmp_path / "s1") == 1
    assert "not a local model directory" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "a dog ."}\n{"body": "x"}\n')
    assert build((model_dir, bad), tmp_path / "s2") == 1
    assert "line 2: no string field 'text'" in capsys.readouterr().err
    assert main(["verify", str(tmp_path / "nowhere")]) == 1
    assert "no teacher cache" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["build", "--model", str(model_dir), "--data", str(corpus), "--out", "x", "--k", "0"])


def test_verify_command_names_a_damaged_shard(store, tmp_path, capsys, monkeypatch):
    assert main(["verify", str(store)]) == 0
    assert "ok: 1 shards, 16 sequences" in capsys.readouterr().out
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    for name in os.listdir(store):
        if not name.startswith("."):
            (damaged / name).write_bytes((store / name).read_bytes())
    shard = damaged / "shard-00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0x10
    shard.write_bytes(bytes(data))
    # As `python -m kl_fused.cache verify` runs it.
    monkeypatch.setattr(sys, "argv", ["kl_fused.cache", "verify", str(damaged)])
    with pytest.raises(SystemExit) as exit_:
        runpy.run_module("kl_fused.cache", run_name="__main__")
    assert exit_.value.code == 1
    assert "shard shard-00000.safetensors: checksum mismatch" in capsys.readouterr().err


def test_import_kl_fused_needs_only_torch_and_the_cache_names_its_extra(tmp_path):
    """In a process where safetensors, tqdm and transformers cannot be imported."""
    script = f"""
import sys
blocked = {{"safetensors", "tqdm", "transformers", "tokenizers"}}

class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in blocked:
            raise ImportError(f"No module named {{name!r}} (blocked)", name=name)

sys.meta_path.insert(0, Block())
import torch
import kl_fused
kl_fused.topk_teacher(torch.randn(3, 10), 2)
assert not blocked & set(sys.modules), blocked & set(sys.modules)
try:
    import kl_fused.cache
except ImportError as error:
    assert "pip install kl_fused[cache]" in str(error), error
else:
    raise AssertionError("kl_fused.cache imported without safetensors")
blocked.discard("safetensors")
from kl_fused.cache import TeacherCache, TeacherCacheWriter
from kl_fused.cache.cli import main
assert main(["build", "--model", ".", "--data", "x.jsonl", "--out", {str(tmp_path / "s")!r}]) == 1
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
    assert re.search(r"kl-fused-cache build needs (transformers|tqdm): pip install kl_fused\[cache\]", result.stderr)


def test_the_command_and_the_extra_are_declared():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert project["project"]["scripts"]["kl-fused-cache"] == "kl_fused.cache.cli:main"
    assert "kl_fused.cache" in project["tool"]["setuptools"]["packages"]
    cache_extra = " ".join(project["project"]["optional-dependencies"]["cache"])
    assert all(name in cache_extra for name in ("safetensors", "tqdm", "transformers"))
    assert project["project"]["dependencies"] == ["torch>=2.4"]
    makefile = (ROOT / "Makefile").read_text()
    assert "TEST_EXTRAS ?= test cache" in makefile
