"""Which torch.func transforms are running around a call (shared by _func_transforms.py and
_recorded.py)."""
import torch


def functorch_active() -> bool:
    """A torch.func transform (grad, vmap, ...) is running around this call."""
    active = getattr(torch._C, "_are_functorch_transforms_active", None)
    return bool(active and active())


def backward_differentiated_again() -> bool:
    """Whether a backward running in grad mode will itself be differentiated. Outside torch.func
    that is what grad mode there means (create_graph=True). torch.func runs every backward in grad
    mode so that transforms compose: there, only when more than one grad-like transform is active
    (grad of grad, ...); a lone grad or vjp (also under vmap: per-sample gradients) is first-order."""
    if not functorch_active():
        return True
    try:
        from torch._C._functorch import TransformType
        from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
    except ImportError:  # (another torch's layout: assume the worst, the exact path)
        return True
    grad_like = (TransformType.Grad, TransformType.Jvp)
    return sum(1 for i in retrieve_all_functorch_interpreters() if i.key() in grad_like) > 1
