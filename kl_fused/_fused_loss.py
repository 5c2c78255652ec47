"""The autograd shape every kl_fused loss op shares, written once.

A fused loss op takes its tensors and options and returns ``(loss, *grads)``: the reduced loss and,
for each differentiable input whose flag argument is True, the gradient of that loss with respect
to the input at upstream gradient 1, computed by the same kernel launch as the loss (the row is
on-chip then). Backward only scales those buffers by the upstream gradient, in place and without a
host synchronisation (``grad_scale_`` reads the factor on the device and skips rows whose factor is
1). A second backward through a retained graph finds the buffers already handed out and calls the
op again, with the flags set to the gradients it now needs.

kl_div_logits, jsd_logits and sparse_kl_div all have this shape; each registers with
:func:`register_fused_loss_autograd` and states which arguments are its differentiable inputs and
which are their flags, and its public function calls the op through :func:`fused_loss`, which
takes torch.func transforms and forward-mode AD to the autograd.Function of _func_support.py.
"""

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch._subclasses.functional_tensor import FunctionalTensor

from kl_fused import _func_support


def scale_by_upstream(grad, upstream):
    """grad * upstream per row (upstream: one value, or one per row of the (..., X) grad).

    In eager the buffer is ours alone, so it is scaled in place. A traced graph (torch.compile,
    export, opcheck) is functional anyway, and torch.func's tensors are wrappers: there the same
    arithmetic runs out of place, so that the graph never mutates a tensor its forward returned."""
    if (isinstance(grad, (FakeTensor, FunctionalTensor)) or torch.compiler.is_compiling()
            or _func_support.transforms_active()):
        acc = torch.float64 if grad.dtype == torch.float64 else torch.float32
        factors = upstream.to(acc).reshape(upstream.shape + (1,) * (grad.dim() - upstream.dim()))
        return (grad.to(acc) * factors).to(grad.dtype)
    torch.ops.kl_fused.grad_scale_(grad, upstream)
    return grad


def fused_loss(op_name, *args, outputs=1):
    """The loss of the fused op `op_name` ("kl_fused::kl_div_logits") called with args (with outputs=n,
    its first n outputs: the loss, then the op's trailing non-gradient outputs, e.g. the distillation
    step's parts); the gradients among its outputs are the ones autograd takes over. Under torch.func
    transforms and forward-mode AD the call goes through _func_support's autograd.Function instead of
    torch.library's autograd."""
    if not torch.compiler.is_compiling() and _func_support.transforms_active():
        result = _func_support.apply(op_name, args)
    else:
        result = getattr(torch.ops.kl_fused, op_name.split("::")[-1])(*args)
    return result[0] if outputs == 1 else (result[0],) + tuple(result[len(result) - outputs + 1:])


def register_fused_loss_autograd(op_name, grad_inputs, grad_flags, row_weights_arg=None, public_name=None,
                                 extra_outputs=0):
    """Registers autograd for a fused loss op ``op(*args) -> (loss, *grads, *extras)``.

    grad_inputs[i] is the position in args of the input that grads[i] belongs to, grad_flags[i]
    the position of the bool argument that asks the op for it. Every other argument is treated as
    non-differentiable (masks, indices, options). public_name(args) names the public function that
    calls the op, for messages (default: the op's name). `extra_outputs` trailing outputs (the
    distillation step's unweighted parts, for logging) are non-differentiable results, not gradients.

    Gradients of logits scale per row, so a per-row upstream gradient (reduction "none") scales the
    forward's rows. Gradients that mix rows (a weight's, in the fused linear losses) do not: such an
    op takes the per-row upstream gradient as its argument `row_weights_arg` (None: all ones), and
    a backward whose upstream gradient is not a scalar calls it again with that argument set.
    """
    grad_inputs, grad_flags = tuple(grad_inputs), tuple(grad_flags)
    if len(grad_inputs) != len(grad_flags):
        raise ValueError("grad_inputs and grad_flags must pair up")
    name = op_name.split("::")[-1]
    op = getattr(torch.ops.kl_fused, name)
    public_name = public_name or (lambda args: name)

    n_grads = len(grad_inputs)

    def setup_context(ctx, inputs, output):
        grads = output[1 : 1 + n_grads]
        ctx.mark_non_differentiable(*output[1:])
        # Otherwise autograd hands backward (rows x V) zero tensors for those outputs.
        ctx.set_materialize_grads(False)
        # Kept as attributes, not saved tensors: the first backward takes them over and scales
        # them in place, which a saved tensor's version counter would forbid.
        ctx.fresh_grads = tuple(grad if inputs[flag] else None for grad, flag in zip(grads, grad_flags))
        tensor_positions = tuple(i for i, arg in enumerate(inputs) if isinstance(arg, torch.Tensor))
        ctx.save_for_backward(*(inputs[i] for i in tensor_positions))
        ctx.tensor_positions = tensor_positions
        ctx.other_args = tuple(None if i in tensor_positions else arg for i, arg in enumerate(inputs))

    def input_grads(ctx, grad_loss):
        """The gradients of the op's arguments (None where not needed) under the upstream grad_loss."""
        result = [None] * len(ctx.other_args)
        needed = tuple(ctx.needs_input_grad[i] for i in grad_inputs)
        grads, ctx.fresh_grads = ctx.fresh_grads, None
        if grad_loss is None:  # the loss did not reach the backward's root
            return tuple(result)
        weighted_rows = row_weights_arg is not None and grad_loss.dim() > 0
        if weighted_rows or grads is None or any(need and grad is None for need, grad in zip(needed, grads)):
            # A second backward through a retained graph, a gradient forward did not compute, or
            # per-row upstream weights that the op must apply itself.
            args = list(ctx.other_args)
            for position, tensor in zip(ctx.tensor_positions, ctx.saved_tensors):
                args[position] = tensor
            for flag, need in zip(grad_flags, needed):
                args[flag] = need
            if weighted_rows:
                args[row_weights_arg] = grad_loss.reshape(-1)
            with torch.no_grad():  # constants of the graph (a second derivative raises instead)
                grads = op(*args)[1 : 1 + n_grads]
        for position, need, grad in zip(grad_inputs, needed, grads):
            if need:
                result[position] = grad if weighted_rows else scale_by_upstream(grad, grad_loss)
        return tuple(result)

    def backward(ctx, grad_loss, *_grads_of_grads):
        if torch.is_grad_enabled():  # backward runs with grad mode on only under create_graph=True
            raise RuntimeError(
                _func_support.second_order_message(public_name(ctx.other_args), "backward with create_graph=True"))
        return input_grads(ctx, grad_loss)

    torch.library.register_autograd(op_name, backward, setup_context=setup_context)
    _func_support.register(op_name, op, setup_context, input_grads, grad_inputs, grad_flags,
                           mixes_rows=row_weights_arg is not None, public_name=public_name)
