"""The examples run: kl_fused inside a real Hugging Face Trainer loop (examples/distill_hf.py)."""

import importlib.util
import pathlib

import pytest
import torch

from conftest import fused_op_must_run

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"


def load_example(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("loss", ["kl"])
def test_distillation_with_the_hf_trainer_lowers_the_loss_and_trains_head_and_body(loss):
    distill_hf = load_example("distill_hf")
    with fused_op_must_run(torch.ops.kl_fused.chunked_linear_loss.default):
        losses, grad_norms = distill_hf.distil(steps=8, loss=loss, teacher_steps=20, quiet=True)
    assert len(losses) == 8 and len(grad_norms) == 8
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-2:]) < sum(losses[:2]), f"the loss did not fall: {losses}"
    for step, norms in enumerate(grad_norms):
        assert norms["lm_head"] > 0 and norms["body"] > 0, f"step {step}: {norms}"
