"""Whether a torch.func transform is running around a call (the layers, _backend and _fused_op
ask; its own module so that _func_transforms and _recorded need not import each other)."""
import torch


def functorch_active() -> bool:
    """A torch.func transform (grad, vmap, ...) is running around this call."""
    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    return bool(active and active())

