"""Whether a torch.func transform is running around a call (the layers, _backend and _fused_op
ask; its own module so that _func_transforms and _recorded need not import each other)."""
import torch


_ACTIVE = getattr(torch._C, "_are_functorch_transforms_active", None)  # (looked up once: a hot path asks)


def functorch_active() -> bool:
    """A torch.func transform (grad, vmap, ...) is running around this eager call. Never while
    torch.compile traces: dynamo handles the transforms itself, and before torch 2.5 it cannot trace
    this query (a graph break)."""
    return _ACTIVE is not None and not torch.compiler.is_compiling() and _ACTIVE()

