"""The agreement check every mode runs before timing: each provider's loss and gradients against
a float64 evaluation of the pure-PyTorch reference on the same inputs.

Modes compute the float64 reference over blocks of rows (so that checking a large case does not
need several float64 copies of the whole input) and feed each block's reference gradient and the
providers' matching blocks to an ErrorTracker, which keeps the running maxima on the device
(no host synchronisation per block).
"""

import torch

# dtype: (relative tolerance of the loss, tolerance of a gradient as a fraction of the largest
# |gradient|). `eager`, `compile` and `liger` compute in fp32 even for fp64 input, hence the fp32
# figures there; 16-bit gradients are rounded to 8 (bf16) or 11 (fp16) significant bits.
TOLERANCES = {
    torch.float64: (1e-4, 1e-4),
    torch.float32: (1e-4, 1e-4),
    torch.bfloat16: (1e-3, 2e-2),
    torch.float16: (1e-3, 2e-2),
}
# The float64 reference runs over blocks of rows of at most this many elements of the widest
# per-row tensor (logits).
CHECK_BLOCK_ELEMENTS = 1 << 24


def row_blocks(rows, row_elements):
    """Slices of at most CHECK_BLOCK_ELEMENTS elements covering `rows` rows of `row_elements` each."""
    block_rows = max(1, CHECK_BLOCK_ELEMENTS // row_elements)
    return [slice(start, start + block_rows) for start in range(0, rows, block_rows)]


class ErrorTracker:
    """Running max |reference gradient| and, per provider, max |gradient - reference|, for each
    named gradient (NaN propagates into the maxima, so that a NaN gradient fails)."""

    def __init__(self, device):
        self._zero = torch.zeros((), dtype=torch.float64, device=device)
        self._scale = {}  # gradient name -> max |reference|
        self._error = {}  # (gradient name, provider) -> max |provider - reference|

    def add(self, what, reference, provided):
        """reference: a float64 block of gradient `what`; provided: {provider: the same block}."""
        self._scale[what] = torch.maximum(self._scale.get(what, self._zero), reference.abs().max())
        for name, grad in provided.items():
            key = (what, name)
            error = (grad.double() - reference).abs().max()
            self._error[key] = torch.maximum(self._error.get(key, self._zero), error)

    def results(self):
        """{gradient name: (max |reference|, {provider: max error})} as floats."""
        return {
            what: (scale.item(), {name: error.item() for (w, name), error in self._error.items() if w == what})
            for what, scale in self._scale.items()
        }


def disagreements(losses, reference_loss, grad_results, dtype):
    """{provider: what is wrong} for the providers whose loss or a gradient misses the reference.

    losses: {provider: loss as a float}; grad_results: ErrorTracker.results(); dtype: the
    inputs' dtype, which sets the tolerances. The first problem of each provider is reported.
    """
    loss_rtol, grad_tol = TOLERANCES[dtype]
    problems = {}
    for name, loss in losses.items():
        loss_error = abs(loss - reference_loss) / abs(reference_loss)
        if not loss_error <= loss_rtol:  # `not <=` so that NaN fails
            problems[name] = (
                f"loss {loss:.8g} vs float64 reference {reference_loss:.8g} "
                f"(rel. error {loss_error:.2e} > {loss_rtol:g})"
            )
            continue
        for what, (scale, errors) in grad_results.items():
            if name in errors and not errors[name] <= grad_tol * scale:
                problems[name] = f"{what} grad max error {errors[name]:.3e} > {grad_tol:g} * max|grad| {scale:.3e}"
                break
    return problems
