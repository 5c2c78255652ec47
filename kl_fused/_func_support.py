"""torch.func transforms (grad, vjp, jvp) and forward-mode AD (torch.autograd.forward_ad) for the fused
loss ops.

Neither goes through torch.library's autograd: torch.func needs an autograd.Function with a
setup_context, and forward-mode AD a JVP, which torch.library cannot register. So under them
_fused_loss.fused_loss calls the op through the autograd.Function built here for it, from the op's own
context and backward (_fused_loss.py) plus a JVP. The forward already has the gradient of the loss with
respect to each input that carries a tangent (the gradient flags are set for those inputs too), so

    d loss = sum over inputs of <d loss / d input, tangent of input>

summed per row for reduction "none" (each row's gradient is that of its own loss), over everything for
the scalar reductions. The fused linear losses' per-row losses have no such per-row gradients (a
weight's gradient mixes the rows): their JVP with reduction "none" raises. Second-order derivatives
raise, as backward with create_graph=True does; vmap is not supported (torch says so: the Function
has no vmap rule).
"""

import torch
import torch.autograd.forward_ad as forward_ad

# op name ("kl_fused::kl_div_logits") -> its autograd.Function
_FUNCTIONS = {}


def transforms_active():
    """Whether a torch.func transform or a forward-mode AD level is active (reads no tensor)."""
    return torch._C._functorch.peek_interpreter_stack() is not None or forward_ad._current_level >= 0


def second_order_message(public, how):
    return (f"kl_fused.{public} supports first-order gradients only ({how} asks for second-order ones); use "
            f"kl_fused.reference.{public} for those")


def _has_tangent(x):
    return isinstance(x, torch.Tensor) and forward_ad.unpack_dual(x).tangent is not None


def apply(op_name, args):
    """The op's outputs through its autograd.Function, each input with a tangent asking for its gradient."""
    function = _FUNCTIONS[op_name]
    args = list(args)
    for position, flag in zip(function.grad_inputs, function.grad_flags):
        args[flag] = bool(args[flag]) or _has_tangent(args[position])
    return function.apply(*args)


class _FirstOrderOnly(torch.autograd.Function):
    """Identity on a gradient that backward returned under torch.func.grad, whose backward runs
    differentiably: a derivative of it (grad of grad, hessian) raises instead of being a silent 0."""

    @staticmethod
    def forward(grad, message, *inputs):
        return grad.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.message = inputs[1]

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(ctx.message)


def register(op_name, op, setup_context, input_grads, grad_inputs, grad_flags, mixes_rows, public_name):
    """Builds the autograd.Function of a fused loss op (arguments as in register_fused_loss_autograd;
    input_grads(ctx, grad_loss) is its backward without the second-order check)."""

    def forward(*args):
        return op(*args)

    def setup(ctx, inputs, output):
        setup_context(ctx, inputs, output)
        ctx.tangent_grads = ctx.fresh_grads  # backward takes fresh_grads over; the JVP only reads them
        ctx.loss_dim, ctx.loss_dtype, ctx.n_grads = output[0].dim(), output[0].dtype, len(output) - 1

    def backward(ctx, grad_loss, *_grads_of_grads):
        grads = input_grads(ctx, grad_loss)
        if not torch.is_grad_enabled():
            return grads
        message = second_order_message(public_name(ctx.other_args), "a derivative of the gradient")
        inputs = tuple(t for t in ctx.saved_tensors if t.is_floating_point())
        return tuple(g if g is None else _FirstOrderOnly.apply(g, message, *inputs) for g in grads)

    def jvp(ctx, *tangents):
        per_row = ctx.loss_dim > 0
        loss_tangent = None
        for position, grad in zip(grad_inputs, ctx.tangent_grads):
            tangent = tangents[position]
            if tangent is None:
                continue
            if per_row and mixes_rows:
                raise RuntimeError(
                    f"kl_fused.{public_name(ctx.other_args)}: forward-mode AD (torch.func.jvp, "
                    "torch.autograd.forward_ad) of reduction='none' is not supported (a weight's tangent mixes "
                    f"the rows); use a scalar reduction, or kl_fused.reference.{public_name(ctx.other_args)}")
            term = grad.to(ctx.loss_dtype) * tangent.to(ctx.loss_dtype)
            term = term.sum(-1) if per_row else term.sum()
            loss_tangent = term if loss_tangent is None else loss_tangent + term
        return (loss_tangent,) + (None,) * ctx.n_grads

    function = type(op_name.split("::")[-1], (torch.autograd.Function,), {
        "forward": staticmethod(forward),
        "setup_context": staticmethod(setup),
        "backward": staticmethod(backward),
        "jvp": staticmethod(jvp),
    })
    function.grad_inputs, function.grad_flags = grad_inputs, grad_flags
    _FUNCTIONS[op_name] = function
