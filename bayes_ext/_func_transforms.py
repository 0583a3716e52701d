"""torch.func transforms (grad, vjp, jacrev, vmap of grad, ...) through bayes_ext's ops.

torch.library's ``register_autograd`` wraps a backward in an old-style ``autograd.Function``, which
functorch refuses while a transform is active ("it must override the setup_context staticmethod";
pytorch/pytorch#170834, still so in torch 2.13). So every bayes_ext op with a registered backward
also gets a new-style twin made of the same ``setup_context`` and ``backward`` (a custom op's
``setup_context(ctx, inputs, output)`` is already the new-style signature), and while a transform
is active the calls go to the twin. ``generate_vmap_rule`` lets vmap run the twin's forward and
backward on batched tensors (the kernels have no batching rule: torch loops over the batch).
The twin's jvp (forward mode: jvp, jacfwd) and its backward when that is differentiated again
(grad of grad, jacrev of jacrev, jacfwd of jacrev: all of them run the backward in grad mode)
differentiate the op's forward rebuilt from differentiable compositions (_recorded.py).

Outside transforms nothing changes: the twin costs nothing until a transform calls it.
"""
import inspect
from typing import Callable, Dict

import torch

from . import _recorded
from ._saved_inputs import holding_saved_tensors


def backward_below_autograd(backward):
    """``backward`` run below autograd (its ops skip their autograd kernels), unless the backward
    itself is being recorded (create_graph=True, a higher-order transform). The saved tensors are
    unpacked first, above the guard: under torch.utils.checkpoint that recomputes the forward,
    whose ops must record autograd (_saved_inputs.py)."""
    def run(ctx, *grads):
        if torch.is_grad_enabled():  # keep whatever graph the backward builds
            with holding_saved_tensors(ctx):
                return backward(ctx, *grads)
        # (holding_saved_tensors inlined: this runs in every first-order backward of a Python op)
        ctx.held_saved_tensors = ctx.saved_tensors
        try:
            with torch._C._AutoDispatchBelowAutograd():
                return backward(ctx, *grads)
        finally:
            ctx.held_saved_tensors = None
    return run


def new_style_function(name: str, call: Callable, backward: Callable, setup_context: Callable,
                       signature: inspect.Signature, rebuild: Callable):
    """An autograd.Function usable under torch.func: forward = ``call`` below autograd, then
    ``setup_context(ctx, inputs, output)`` and ``backward(ctx, *grads)`` as registered for the op;
    forward-mode AD (jvp, jacfwd) differentiates ``rebuild``, the op's forward as differentiable
    compositions (_recorded.py). ``signature`` (the op's) fills in omitted defaulted arguments
    before setup_context sees them."""
    def forward(*inputs):
        with torch._C._AutoDispatchBelowAutograd():
            return call(*inputs)
    forward.__signature__ = signature  # what Function.apply binds the arguments against

    def jvp(ctx, *tangents):
        out = _recorded.forward_tangents(rebuild, ctx.forward_inputs, tangents)
        out = out if isinstance(out, tuple) else (out,)
        # None for the outputs the op marked non-differentiable, as torch requires
        kept = tuple(t if differentiable else None for t, differentiable in zip(out, ctx.differentiable_outputs))
        return kept if len(kept) > 1 else kept[0]
    return type(name, (torch.autograd.Function,), dict(
        forward=staticmethod(forward), setup_context=staticmethod(setup_context),
        backward=staticmethod(backward_below_autograd(backward)), jvp=staticmethod(jvp), generate_vmap_rule=True))


# "namespace::op" -> its new-style twin, for the ops registered through register_autograd below
_TWINS: Dict[str, type] = {}


def register_autograd(qualname: str, backward: Callable, *, setup_context: Callable) -> None:
    """torch.library.register_autograd, exact when the backward is recorded (_recorded.py), plus
    the twin that torch.func transforms call instead."""
    namespace, name = qualname.split("::")
    rebuild = _recorded.differentiable_op(namespace, name)
    backward, setup_context = _recorded.exact_when_recorded(rebuild, backward, setup_context)
    torch.library.register_autograd(qualname, backward, setup_context=setup_context)
    op = getattr(getattr(torch.ops, namespace), name).default
    _TWINS[qualname] = new_style_function(f"{name}_transform_function", op, backward, setup_context,
                                          schema_signature(op._schema), rebuild)


def schema_signature(schema) -> inspect.Signature:
    """An op schema's arguments as a Python signature (names and defaults)."""
    return inspect.Signature([
        inspect.Parameter(a.name, inspect.Parameter.POSITIONAL_OR_KEYWORD,
                          default=a.default_value if a.has_default_value() else inspect.Parameter.empty)
        for a in schema.arguments])


class TransformOps:
    """An op namespace as seen from inside a torch.func transform: ops with a registered backward
    apply their twin; ops that write into their arguments (name ending in ``_``) are their
    pure-PyTorch versions, since vmap cannot run a custom op that mutates a batched tensor (the same
    values: the same math on the same Philox stream); the others are the ops themselves."""

    def __init__(self, namespace_name: str):
        self._namespace_name = namespace_name
        self._namespace = getattr(torch.ops, namespace_name)

    def __getattr__(self, name: str):
        from . import _fallback  # (imports the ops' pure-PyTorch kernels; loaded by then)
        twin = _TWINS.get(f"{self._namespace_name}::{name}")
        if twin is not None:
            op = twin.apply
        elif name.endswith("_") and hasattr(_fallback, name):
            op = getattr(_fallback, name)
        else:
            op = getattr(self._namespace, name)
        setattr(self, name, op)  # cache: the next lookup skips __getattr__
        return op


_TRANSFORM_OPS: Dict[str, TransformOps] = {}


def transform_ops(namespace_name: str) -> TransformOps:
    ops = _TRANSFORM_OPS.get(namespace_name)
    if ops is None:
        ops = _TRANSFORM_OPS[namespace_name] = TransformOps(namespace_name)
    return ops
