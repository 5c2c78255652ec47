"""The examples run: kl_fused inside a real Hugging Face Trainer loop (examples/distill_hf.py), and in
TRL's GKDTrainer in place of its generalized JSD (examples/trl_gkd.py)."""

import importlib.util
import pathlib

import pytest
import torch

from conftest import assert_close, assert_grad_close, fused_op_must_run

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def load_example(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def distill_hf():
    """examples/distill_hf.py and its teacher, fitted once for both losses' tests (it is never trained
    further: the Trainer trains the student only)."""
    module = load_example("distill_hf")
    return module, module.fitted_teacher(seed=0, teacher_steps=20)


@pytest.mark.parametrize("loss", ["kl", "jsd"])
def test_distillation_with_the_hf_trainer_lowers_the_loss_and_trains_head_and_body(distill_hf, loss):
    distill_hf, teacher = distill_hf
    before = [p.detach().clone() for p in teacher.parameters()]
    record = {}
    with fused_op_must_run(torch.ops.kl_fused.chunked_linear_loss.default, torch.ops.kl_fused.distillation_loss.default):
        losses, grad_norms = distill_hf.distil(steps=8, loss=loss, quiet=True, record=record, teacher=teacher)
    assert all(torch.equal(a, b) for a, b in zip(before, teacher.parameters())), "the teacher changed"
    assert len(losses) == 8 and len(grad_norms) == 8
    # The Trainer counted the batch's labels and passed the count on: the loss's batchmean used it.
    counts = record["num_items_in_batch"]
    assert len(counts) == 8 and all(count is not None and int(count) > 0 for count in counts), counts
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-2:]) < sum(losses[:2]), f"the loss did not fall: {losses}"
    for step, norms in enumerate(grad_norms):
        assert norms["lm_head"] > 0 and norms["body"] > 0, f"step {step}: {norms}"


def _tiny_llama(hidden, seed):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=300, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=16,
                         tie_word_embeddings=False, initializer_range=0.2)
    return LlamaForCausalLM(config)


@pytest.mark.parametrize("beta", [0.0, 0.5, 0.9])
@pytest.mark.parametrize("num_items_in_batch", [None, 7])
def test_the_gkd_snippet_gives_trls_loss_and_gradients_inside_trls_compute_loss(beta, num_items_in_batch):
    """TRL's own GKDTrainer.compute_loss (student and teacher forward, causal shift, labels) run once with
    TRL's generalized_jsd_loss and once with the snippet's, on the same models and batch."""
    from types import SimpleNamespace

    from trl.experimental.gkd import GKDTrainer

    trl_gkd = load_example("trl_gkd")
    student, teacher = _tiny_llama(32, seed=1), _tiny_llama(48, seed=2)
    gen = torch.Generator().manual_seed(3)
    input_ids = torch.randint(0, 300, (3, 12), generator=gen)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[2, 9:] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, :4] = -100  # the prompt
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
    results = []
    for trainer_class in (GKDTrainer, trl_gkd.KLFusedGKDTrainer):
        trainer = SimpleNamespace(teacher_model=teacher, beta=beta,
                                  generalized_jsd_loss=trainer_class.generalized_jsd_loss)
        student.zero_grad()
        loss = GKDTrainer.compute_loss(trainer, student, inputs, num_items_in_batch=num_items_in_batch)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in student.named_parameters()}))
    (trl_loss, trl_grads), (fused_loss, fused_grads) = results
    assert_close(fused_loss, trl_loss, 2e-5, 2e-6, "loss")
    for name, grad in trl_grads.items():
        assert_grad_close(fused_grads[name], grad, torch.float32, name)


def test_offline_distillation_builds_a_store_and_the_student_learns_from_it(tmp_path):
    """examples/offline_distill.py: kl-fused-cache build over a JSONL corpus, then a student trained from
    a 2-worker DataLoader over TeacherCache (packed ids); the loss falls."""
    pytest.importorskip("safetensors")
    offline = load_example("offline_distill")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: a second thread only waits, and on a loaded machine it spins
    try:
        with fused_op_must_run(torch.ops.kl_fused.distillation_loss.default):
            losses = offline.run(tmp_path, steps=14, lines=48, length=24, teacher_steps=20, packed=True, quiet=True)
    finally:
        torch.set_num_threads(threads)
    assert len(losses) == 14 and all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-3:]) < 0.8 * sum(losses[:3]), f"the loss did not fall: {losses}"
    # The store's vocabulary guards the loss: a student of another vocabulary is refused.
    from kl_fused.cache import TeacherCache

    cache = TeacherCache(tmp_path / "store")
    assert cache.index_encoding == "packed" and cache.metadata["data"] == str(tmp_path / "corpus.jsonl")
    tokens = {i: [2, 5, 6, 7] for i in cache.sequence_ids}
    batch = offline.Batches(cache, tokens, length=3, pad_id=0)(cache.sequence_ids[:2])
    other = offline.llama(cache.vocab_size + 1, hidden=32, layers=1, seed=0)
    with pytest.raises(ValueError, match=f"vocabulary of {cache.vocab_size} tokens"):
        offline.distillation_loss(other, batch, temperature=1.0, hard_weight=0.5)
