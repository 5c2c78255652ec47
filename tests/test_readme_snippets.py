"""Every ```python block of README.md runs as written, against small stand-ins for what a reader has (a
tiny Llama student and teacher, their logits and hidden states, labels, a one-rank process group, a
small teacher top-k store) defined here, never by editing the blocks. The signatures in ```text blocks
name functions and keywords that exist, and the blocks that quote examples/ are verbatim parts of them."""

import ast
import inspect
import pathlib
import re
import textwrap

import pytest
import torch

import kl_fused

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
VOCAB, HIDDEN, TEACHER_HIDDEN, BATCH, SEQ = 128, 32, 48, 2, 12


def fenced_blocks(language):
    """(line number, code) of every block fenced as ```language."""
    blocks, lines = [], README.splitlines()
    number = 0
    while number < len(lines):
        if lines[number].strip() == f"```{language}":
            start, body = number + 1, []
            number += 1
            while lines[number].strip() != "```":
                body.append(lines[number])
                number += 1
            blocks.append((start + 1, textwrap.dedent("\n".join(body))))
        number += 1
    return blocks


PYTHON_BLOCKS = fenced_blocks("python")


def tiny_llama(hidden, seed):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
                         tie_word_embeddings=False)
    return LlamaForCausalLM(config)


@pytest.fixture(scope="module")
def models():
    pytest.importorskip("transformers")
    teacher = tiny_llama(TEACHER_HIDDEN, seed=1).requires_grad_(False)
    return tiny_llama(HIDDEN, seed=0), teacher


@pytest.fixture(scope="module")
def process_group():
    """A one-rank gloo group: the vocabulary-parallel blocks run with the whole vocabulary as the shard."""
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    created = not dist.is_initialized()
    if created:
        import tempfile

        store = dist.FileStore(tempfile.mktemp(prefix="kl_fused_readme_"), 1)
        dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    yield dist.new_group([0])
    if created:
        dist.destroy_process_group()


def standins(models, process_group, tmp_path):
    """What the blocks take as given, fresh for every block."""
    student, teacher = models
    gen = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 9:] = 0
    labels = input_ids[:, 1:].masked_fill(attention_mask[:, 1:] == 0, -100)
    with torch.no_grad():
        teacher_logits = teacher(input_ids, attention_mask=attention_mask).logits
    student_logits = student(input_ids, attention_mask=attention_mask).logits
    namespace = {
        "torch": torch, "kl_fused": kl_fused, "student": student, "teacher": teacher, "input_ids": input_ids,
        "attention_mask": attention_mask, "labels": labels, "student_logits": student_logits,
        "teacher_logits": teacher_logits, "step": 0, "T": 2.0,
        "student_hidden": student.model(input_ids, attention_mask=attention_mask).last_hidden_state,
        "cache": [kl_fused.topk_teacher(teacher_logits[:, :-1], k=64, temperature=2.0)],
        # the vocabulary-parallel blocks, on one rank: the shard is the whole vocabulary
        "tp_group": process_group, "dp_group": process_group, "mask": attention_mask.bool(),
        "student_shard": torch.randn(BATCH, SEQ, VOCAB, generator=gen, requires_grad=True),
        "teacher_shard": torch.randn(BATCH, SEQ, VOCAB, generator=gen),
        "hidden": torch.randn(BATCH, SEQ - 1, HIDDEN, generator=gen, requires_grad=True),
        "teacher_hidden": torch.randn(BATCH, SEQ - 1, TEACHER_HIDDEN, generator=gen),
        "lm_head": student.lm_head, "teacher_lm_head": teacher.lm_head,
    }
    return namespace


def _installed():
    import importlib.util

    return {name for name in ("trl", "safetensors") if importlib.util.find_spec(name) is not None}


def write_store(path, teacher, count=8, length=40):
    """A small store as `kl-fused-cache build` would write it, and the token ids of its sequences."""
    from kl_fused.cache import TeacherCacheWriter

    gen = torch.Generator().manual_seed(1)
    token_ids = {}
    with TeacherCacheWriter(path, vocab_size=VOCAB, k=16, temperature=2.0) as writer:
        for sequence in range(count):
            tokens = torch.randint(0, VOCAB, (length,), generator=gen)
            with torch.no_grad():
                logits = teacher(tokens[None]).logits[0]
            writer.add(sequence, torch.cat([logits[:1], logits[:-1]]))  # row i: the distribution of token i
            token_ids[sequence] = tokens.tolist()
    return token_ids


def missing_kl_fused_names(code):
    """Names the block imports from kl_fused that this checkout does not have."""
    missing = []
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("kl_fused"):
            import importlib

            module = importlib.import_module(node.module)
            missing += [f"{node.module}.{a.name}" for a in node.names if not hasattr(module, a.name)]
    return missing


def test_the_readme_has_python_blocks_and_each_parses():
    assert len(PYTHON_BLOCKS) >= 10, len(PYTHON_BLOCKS)
    for line, code in PYTHON_BLOCKS:
        try:
            ast.parse(code)
        except SyntaxError as error:
            pytest.fail(f"README.md line {line}: the ```python block is not Python ({error}); "
                        f"signatures go in ```text blocks")


@pytest.mark.parametrize("line,code", PYTHON_BLOCKS, ids=[f"line{line}" for line, _ in PYTHON_BLOCKS])
def test_readme_block_runs(line, code, models, process_group, tmp_path, monkeypatch):
    missing = missing_kl_fused_names(code)
    if missing:
        pytest.skip(f"README.md line {line} uses {', '.join(missing)}, which this checkout does not have")
    if "GKDTrainer" in code and "trl" not in _installed():
        pytest.skip("trl is not installed (the test extra installs it)")
    namespace = standins(models, process_group, tmp_path)
    if "GKDTrainer" in code:
        from trl.experimental.gkd import GKDTrainer

        namespace["GKDTrainer"] = GKDTrainer
    if "TeacherCache(" in code:
        if "safetensors" not in _installed():
            pytest.skip("safetensors is not installed (the cache extra installs it)")
        monkeypatch.chdir(tmp_path)
        namespace["token_ids"] = write_store(tmp_path / "store", models[1])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        exec(compile(code, f"README.md:{line}", "exec"), namespace)
    finally:
        torch.set_num_threads(threads)
    loss = namespace.get("loss")
    if loss is not None:
        assert torch.isfinite(loss).all(), f"README.md line {line}: loss {loss}"


def test_the_quoted_example_code_is_verbatim_in_the_example_files():
    quoted = {"def compute_loss(self, model, inputs": "distill_hf.py", "class KLFusedGKDTrainer(GKDTrainer):": "trl_gkd.py"}
    for start, name in quoted.items():
        blocks = [code for _, code in PYTHON_BLOCKS if start in code]
        assert blocks, f"README.md no longer quotes {name}"
        file_text = (ROOT / "examples" / name).read_text()
        for code in blocks:
            indented = textwrap.indent(code, " " * _indent_of(file_text, start))
            assert indented in file_text, f"README.md's copy of examples/{name} has drifted from the file"


def _indent_of(text, start):
    line = next(line for line in text.splitlines() if start in line)
    return len(line) - len(line.lstrip())


def _top_level_arguments(text):
    depth, piece, pieces = 0, "", []
    for char in text:
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        if char == "," and depth == 0:
            pieces.append(piece)
            piece = ""
        else:
            piece += char
    return [p.strip() for p in pieces + [piece] if p.strip()]


def _signatures():
    """(name, argument names) of every `kl_fused.NAME(...)` that begins a line of a ```text block."""
    found = []
    for line, block in fenced_blocks("text"):
        for match in re.finditer(r"^kl_fused\.([\w.]+)\(", block, flags=re.M):
            depth, end = 1, match.end()
            while depth:
                depth += {"(": 1, ")": -1}.get(block[end], 0)
                end += 1
            names = [p.split("=")[0].strip() for p in _top_level_arguments(block[match.end():end - 1])]
            found.append((line, match.group(1), [n for n in names if n.isidentifier()]))
    return found


def test_the_signatures_in_the_readme_match_the_code():
    signatures = _signatures()
    assert len(signatures) >= 10, signatures
    for line, name, arguments in signatures:
        target = kl_fused
        for part in name.split("."):
            assert hasattr(target, part), f"README.md line {line}: kl_fused.{name} does not exist"
            target = getattr(target, part)
        parameters = inspect.signature(target).parameters
        if any(p.kind is p.VAR_KEYWORD for p in parameters.values()):
            continue
        unknown = [a for a in arguments if a not in parameters]
        assert not unknown, f"README.md line {line}: kl_fused.{name} has no argument {unknown}"
