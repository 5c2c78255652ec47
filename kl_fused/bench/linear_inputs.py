"""What the modes that start from hidden states share (linear.py, distill.py): the random inputs of a
rows x H x V case, and how their peak memory is measured."""

import torch

from kl_fused.bench.options import DTYPES


def make_linear_inputs(rows, hidden, vocab, dtype_name, teacher, device, seed=0):
    """{student_hidden, student_weight (both require grad), teacher_hidden + teacher_weight, or
    teacher_logits}: weights scaled so that logits have a std of about 3, never zeros."""
    dtype = DTYPES[dtype_name]
    device = torch.device(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    sample = torch.float64 if dtype == torch.float64 else torch.float32

    def randn(*shape, scale=1.0):
        return torch.randn(shape, generator=generator, device=device, dtype=sample).mul_(scale).to(dtype)

    inputs = {
        "student_hidden": randn(rows, hidden).requires_grad_(),
        "student_weight": randn(vocab, hidden, scale=3.0 / hidden**0.5).requires_grad_(),
    }
    teacher_hidden = randn(rows, hidden)
    teacher_weight = randn(vocab, hidden, scale=3.0 / hidden**0.5)
    if teacher == "hidden":
        inputs.update(teacher_hidden=teacher_hidden, teacher_weight=teacher_weight)
    else:
        with torch.no_grad():
            inputs["teacher_logits"] = teacher_hidden @ teacher_weight.t()
    return inputs


def memory_method(device):
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated during one step, minus what was allocated before it"
    return "peak RSS (VmHWM) of a fresh process during one step, minus its RSS before the step"
