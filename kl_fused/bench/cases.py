"""Cases of the modes that take logits (rows x vocab of one dtype): parsing --cases or the cross
product of --rows/--vocab/--dtype, and the random inputs of a case."""

from dataclasses import dataclass

import torch

from kl_fused.bench.options import DTYPES, choices, comma_list, positive_int


DEFAULT_CASES = {
    "cpu": "512x32000:float32,512x32000:bfloat16,64x128256:bfloat16",
    "cuda": "8192x128256:bfloat16,4096x262144:bfloat16,4096x32000:bfloat16",
}
# The defaults of --rows/--vocab/--dtype when only some of them are given.
CROSS_PRODUCT_DEFAULTS = {"rows": {"cpu": "512", "cuda": "4096"}, "vocab": "32000", "dtype": "bfloat16"}


@dataclass(frozen=True)
class Case:
    rows: int
    vocab: int
    dtype_name: str

    @property
    def dtype(self):
        return DTYPES[self.dtype_name]

    @property
    def input_bytes(self):
        return self.rows * self.vocab * self.dtype.itemsize

    def __str__(self):
        return f"{self.rows}x{self.vocab} {self.dtype_name}"


def parse_case(text):
    shape, _, dtype_name = text.partition(":")
    rows, _, vocab = shape.partition("x")
    if not dtype_name:
        raise ValueError(f"case '{text}' needs a dtype, as in 512x32000:float32")
    if dtype_name not in DTYPES:
        raise ValueError(f"unknown dtype '{dtype_name}' in case '{text}'")
    return Case(positive_int(rows, "rows"), positive_int(vocab, "vocab"), dtype_name)


def cases_from_args(args, device_type):
    """The cases asked for: --cases, else the cross product of --rows/--vocab/--dtype (the ones not
    given from CROSS_PRODUCT_DEFAULTS), else the device's DEFAULT_CASES."""
    cross = (args.rows, args.vocab, args.dtypes)
    if args.cases is not None and any(value is not None for value in cross):
        raise ValueError("--cases cannot be combined with --rows, --vocab or --dtype")
    if args.cases is not None or all(value is None for value in cross):
        return [parse_case(text) for text in comma_list(args.cases or DEFAULT_CASES[device_type])]
    rows = comma_list(args.rows or CROSS_PRODUCT_DEFAULTS["rows"][device_type])
    vocabs = comma_list(args.vocab or CROSS_PRODUCT_DEFAULTS["vocab"])
    dtype_names = choices(args.dtypes or CROSS_PRODUCT_DEFAULTS["dtype"], DTYPES, "dtype")
    return [
        Case(positive_int(r, "rows"), positive_int(v, "vocab"), d) for d in dtype_names for r in rows for v in vocabs
    ]


def make_inputs(case, device, seed=0):
    """Teacher logits 2*randn and student logits correlated with them (also of std 2), never zeros.

    The student is a leaf that requires grad; `fwd` steps use a detached view of it.
    """
    generator = torch.Generator(device=device).manual_seed(seed)
    sample_dtype = torch.float64 if case.dtype == torch.float64 else torch.float32
    shape = (case.rows, case.vocab)
    teacher = torch.randn(shape, generator=generator, device=device, dtype=sample_dtype).mul_(2.0)
    student = torch.randn(shape, generator=generator, device=device, dtype=sample_dtype).mul_(1.2)
    student.add_(teacher, alpha=0.8)
    return student.to(case.dtype).requires_grad_(), teacher.to(case.dtype)


def make_step(loss_fn, student, teacher, with_grad):
    """One timed unit of work on logits; returns the loss."""
    if not with_grad:
        frozen_student = student.detach()
        return lambda: loss_fn(frozen_student, teacher)

    def forward_backward():
        student.grad = None
        loss = loss_fn(student, teacher)
        loss.backward()
        return loss

    return forward_backward
