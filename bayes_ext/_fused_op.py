"""Custom ops whose eager calls skip the dispatcher's Python layers.

``@fused_custom_op("bayes_ext::name")`` is ``torch.library.custom_op(name, mutates_args=())`` plus
a fast path: eager calls on plain tensors run the same implementation, setup_context and backward
through a ``torch.autograd.Function``. The custom op's Python dispatch (default filling, redispatch,
its autograd wrapper) costs ~100 us a call on a 2-core CPU, as much as a small layer's whole training
step and, on a GPU, more than the kernels of a mid-sized layer. torch.compile, fake tensors and tensor
subclasses still go through the registered custom op, so opcheck and compiled graphs see one op with
its fake kernel; torch.func transforms go through a new-style twin of it (_func_transforms.py).
"""
import inspect

import torch

from . import _recorded
from ._func_transforms import backward_below_autograd, new_style_function
from ._functorch_state import functorch_active as _functorch_active
from ._saved_inputs import setup_keeping_inputs


_PLAIN_TYPES = (torch.Tensor, torch.nn.Parameter)


def _plain(args) -> bool:
    for a in args:
        if isinstance(a, torch.Tensor) and type(a) not in _PLAIN_TYPES:
            return False
    return True


class FusedOp:
    """A torch.library custom op (``.op``) callable like a function, fast in eager mode."""

    def __init__(self, op, impl):
        self.op, self._impl, self._function, self._transform_function = op, impl, None, None

    def register_fake(self, fn):
        return self.op.register_fake(fn)

    def register_autograd(self, backward, *, setup_context):
        # a recorded backward (create_graph=True) differentiates the forward rebuilt (_recorded.py)
        plain_setup_context = setup_context
        backward, setup_context = _recorded.exact_when_recorded(self._impl, backward, setup_context)
        self.op.register_autograd(backward, setup_context=setup_context)
        impl = self._impl

        # Below autograd, as the custom op's own autograd kernel runs its implementation: the ops
        # inside then skip their (Python) autograd kernels, ~4 us each.
        def forward(ctx, *inputs):  # the old-style signature: no per-call signature binding
            with torch._C._AutoDispatchBelowAutograd():
                output = impl(*inputs)
            setup_keeping_inputs(plain_setup_context, ctx, inputs, output)  # the wrapped setup, unchecked
            return output

        self._function = type(f"{impl.__name__.strip('_')}_function", (torch.autograd.Function,), dict(
            forward=staticmethod(forward), backward=staticmethod(backward_below_autograd(backward))))
        # torch.func transforms refuse the custom op's own autograd wrapper (_func_transforms.py)
        self._transform_function = new_style_function(f"{impl.__name__.strip('_')}_transform_function",
                                                      self.op, backward, setup_context, inspect.signature(impl), impl)

    def __call__(self, *args):
        if self._transform_function is not None and _functorch_active():
            return self._transform_function.apply(*args)
        if self._function is None or torch.compiler.is_compiling() or not _plain(args):
            return self.op(*args)
        if not torch.is_grad_enabled():  # nothing to record: the implementation alone
            with torch._C._AutoDispatchBelowAutograd():
                return self._impl(*args)
        return self._function.apply(*args)


def fused_custom_op(name: str):
    """Decorator: ``name``'s custom op (no mutated arguments) from the decorated implementation."""
    def wrap(impl):
        return FusedOp(torch.library.custom_op(name, mutates_args=())(impl), impl)
    return wrap
