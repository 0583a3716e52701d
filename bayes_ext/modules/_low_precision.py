"""Bayesian layers whose parameters were cast to bf16 / fp16 (``model.half()``,
``model.to(torch.bfloat16)``, ``dtype=torch.float16``), which BLiTZ's layers allow.

The kernels take float32 / float64 posteriors: softplus(rho), the noise and the log q / log p sums
would lose most of their digits in 8 or 11 bits of mantissa. A layer holding low-precision parameters
therefore runs each forward as its float32 self under ``torch.autocast`` with their dtype: the
parameters are upcast (a differentiable copy, so their gradients arrive in their own dtype), the
weights are sampled and the KL summed in float32, the matmul / convolution / recurrence runs in the
low precision, and the output is returned in it. The KL terms stay float32. One seed gives the same
sample as the float32 layer whose parameters are the upcast values.
"""
import functools

import torch
from torch.utils._pytree import tree_map

LOW_PRECISION = (torch.float16, torch.bfloat16)


def upcasts_low_precision(forward):
    """Decorates a Bayesian layer's ``forward``: unchanged for float32 / float64 parameters (one
    dtype lookup, inline: it runs on every call of every layer), the float32 forward under autocast
    for bf16 / fp16 ones (see the module doc). The layer's ``_dtype_probe`` names the parameter
    whose dtype decides (weight_mu; weight_ih_mu for the RNNs)."""
    @functools.wraps(forward)
    def forward_in_any_precision(self, *args, **kwargs):
        mu = self._parameters.get(self._dtype_probe)
        if mu is None:  # parametrize'd or functional_call-swapped: the attribute
            mu = getattr(self, self._dtype_probe, None)
        if mu is not None and mu.dtype in LOW_PRECISION:
            return _forward_in_float32(self, forward, mu.dtype, args, kwargs)
        return forward(self, *args, **kwargs)
    return forward_in_any_precision


def _forward_in_float32(module, forward, dtype, args, kwargs):
    params = module._parameters
    low = {name: p for name, p in params.items() if isinstance(p, torch.Tensor) and p.dtype in LOW_PRECISION}
    device_type = next(iter(low.values())).device.type
    try:
        # nn.Module.__getattr__ returns what _parameters holds: the forward sees the float32 copies
        for name, p in low.items():
            params[name] = p.float()
        with torch.autocast(device_type, dtype=dtype):
            out = forward(module, *args, **kwargs)
    finally:
        params.update(low)
    return tree_map(lambda t: t.to(dtype) if isinstance(t, torch.Tensor) and t.dtype == torch.float32 else t, out)
