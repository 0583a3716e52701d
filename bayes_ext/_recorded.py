"""Exact derivatives of any order: backwards that are themselves differentiated, and forward mode.

The kernels' backwards are first-order: what they return carries no derivatives of its own. So
when a backward runs in grad mode (``create_graph=True``: gradient penalties, double backprop,
second-order meta-learning; every torch.func backward, which runs so that transforms compose), a
layer op rebuilds its forward from differentiable PyTorch compositions of its ops
(``DifferentiableOps``: the same Philox noise, as constants) and returns the vjp of that
(``recorded_backward``): exact to every order, at the price of the weight-sized temporaries the
kernels avoid. Forward mode differentiates the same rebuilt forward (``forward_tangents``).
First-order backwards never come here.
"""
import math
import threading
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from . import _fallback
from ._functorch_state import functorch_active
from ._saved_inputs import forward_inputs, holding_saved_tensors, setup_keeping_inputs

HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)
TINY_RHO = _fallback.SOFTPLUS_TINY_RHO  # below it log sigma = rho (the kernels' and the fallback's limit)

_state = threading.local()


def rebuilding() -> bool:
    """A recorded backward is rebuilding its forward on this thread (the ops are DifferentiableOps)."""
    return getattr(_state, "rebuilding", False)


def _sigma_and_log(rho: torch.Tensor):
    sigma = F.softplus(rho)
    tiny = rho < TINY_RHO  # (no log of an underflowed sigma: its gradient would be NaN even unselected)
    log_sigma = torch.where(tiny, rho, torch.log(torch.where(tiny, torch.ones_like(sigma), sigma)))
    return sigma, log_sigma


class DifferentiableOps:
    """An op namespace whose sampling ops are differentiable PyTorch compositions (the noise from the
    namespace's own Philox op, so the same values, and usable inside torch.func transforms); every
    other op is the namespace's own."""

    def __init__(self, namespace):
        self._namespace = namespace

    def __getattr__(self, name: str):
        return getattr(self._namespace, name)

    def _eps(self, like: torch.Tensor, seed: torch.Tensor, offset: int, start: int = 0) -> torch.Tensor:
        return self._namespace.philox_normal(torch.empty_like(like, memory_format=torch.contiguous_format), seed,
                                             offset, start)

    def sample_weight(self, mu, rho, seed, offset, prior_pi, prior_sigma1, prior_sigma2, start=0, noise_only=False):
        eps = self._eps(mu, seed, offset, start)
        sigma, log_sigma = _sigma_and_log(rho)
        noise = sigma * eps
        w = mu + noise
        log_q = (-0.5 * eps.square() - log_sigma).sum() - HALF_LOG_2PI * mu.numel()
        log_p = _fallback.log_prior_terms(w, prior_pi, prior_sigma1, prior_sigma2).sum()
        return (noise if noise_only else w), log_q, log_p

    def sample_kl(self, mu, rho, seed, offset, prior_pi, prior_sigma1, prior_sigma2, start=0):
        return self.sample_weight(mu, rho, seed, offset, prior_pi, prior_sigma1, prior_sigma2, start)[1:]

    def sample_weight_samples(self, mu, rho, seeds, offset, prior_pi, prior_sigma1, prior_sigma2):
        prior = (prior_pi, prior_sigma1, prior_sigma2)
        samples = [self.sample_weight(mu, rho, s, offset, *prior) for s in seeds.unbind(0)]
        return tuple(torch.stack(parts) for parts in zip(*samples))

    def sample_rows(self, mu, rho, indices, seed, offset):
        flat = indices.reshape(-1)
        eps = _fallback._row_eps(mu, flat, seed, offset)
        return (mu[flat] + F.softplus(rho[flat]) * eps).reshape(indices.shape + (mu.shape[1],))

    def gaussian_kl(self, mu, rho, prior_sigma):
        sigma, log_sigma = _sigma_and_log(rho)
        var = prior_sigma * prior_sigma
        return (math.log(prior_sigma) - 0.5 - log_sigma + (sigma.square() + mu.square()) / (2.0 * var)).sum()

    def lrt_weight_forward(self, mu, rho, prior_sigma):
        kl = self.gaussian_kl(mu, rho, prior_sigma) if prior_sigma > 0 else mu.new_zeros(())
        return F.softplus(rho).square(), kl

    def lrt_output_(self, var, mean, seed, offset):
        """y = mean + sqrt(max(var, 0)) eps; var is left as it is (std, the op's other output, is
        not differentiated). Where var <= 0 the derivative is 0, as in the kernels."""
        positive = var > 0
        std = torch.sqrt(torch.where(positive, var, torch.ones_like(var))) * positive
        seeds = seed.reshape(-1)  # N seeds: N equal groups of elements, each on its own stream
        groups = [var] if seeds.numel() == 1 else var.reshape(seeds.numel(), -1).unbind(0)
        eps = torch.cat([self._eps(g, s, offset).reshape(-1) for g, s in zip(groups, seeds.unbind(0))])
        return mean + std * eps.view(var.shape)


def differentiable_ops(namespace) -> DifferentiableOps:
    ops = getattr(_state, "ops", None)
    if ops is None or ops._namespace is not namespace:
        ops = _state.ops = DifferentiableOps(namespace)
    return ops


def _rebuilt(forward: Callable, inputs: Sequence, positions: Sequence[int]) -> Callable:
    """forward as a function of inputs[positions] (the others fixed), run with DifferentiableOps;
    it returns a tuple."""
    def rebuilt(*varying):
        args = list(inputs)
        for i, t in zip(positions, varying):
            args[i] = t
        previous = rebuilding()
        _state.rebuilding = True
        try:
            out = forward(*args)
        finally:
            _state.rebuilding = previous
        return out if isinstance(out, tuple) else (out,)
    return rebuilt


def recorded_backward(forward: Callable, inputs: Sequence, needs_input_grad: Sequence[bool],
                      grads: Sequence[Optional[torch.Tensor]],
                      differentiable_outputs: Optional[Sequence[bool]] = None):
    """The gradients of ``forward(*inputs)`` (rebuilt with DifferentiableOps) with respect to the
    floating-point inputs that need them, for the incoming ``grads``, as a vjp that every enclosing
    differentiation sees through: torch.autograd with create_graph=True, and torch.func's grad, jvp
    and vmap levels, live or not. None for the other inputs; ``differentiable_outputs`` masks the
    outputs the op marked non-differentiable (their incoming gradient is ignored)."""
    positions = [i for i, (t, need) in enumerate(zip(inputs, needs_input_grad))
                 if need and isinstance(t, torch.Tensor) and t.is_floating_point()]
    result = [None] * len(inputs)
    if not positions:
        return tuple(result)
    outputs, vjp_fn = torch.func.vjp(_rebuilt(forward, inputs, positions), *(inputs[i] for i in positions))
    mask = differentiable_outputs or (True,) * len(outputs)
    cotangents = tuple(g if (g is not None and keep) else torch.zeros_like(o)
                       for o, g, keep in zip(outputs, grads, mask))
    for i, g in zip(positions, vjp_fn(cotangents)):
        result[i] = g
    return tuple(result)


def _unwrap_dead(inputs):
    """The inputs with the wrappers of torch.func levels that have ended replaced by what they
    wrapped (as autograd.Function.apply does with its arguments)."""
    try:
        from torch._functorch.utils import unwrap_dead_wrappers
    except ImportError:  # (another torch's layout)
        return inputs
    return unwrap_dead_wrappers(tuple(inputs))


def exact_when_recorded(forward: Callable, backward: Callable, setup_context: Callable):
    """(backward, setup_context) of an op for register_autograd: the same, except that a recorded
    backward differentiates ``forward`` rebuilt with DifferentiableOps (recorded_backward) instead
    of running the first-order kernels. Eager calls keep their inputs for it as saved tensors
    (_saved_inputs.py); torch.compile, which has no double backward, does not."""
    def setup(ctx, inputs, output):
        if torch.compiler.is_compiling():
            setup_context(ctx, inputs, output)
        else:
            setup_keeping_inputs(setup_context, ctx, inputs, output)
            # for the twins' jvp, which reads no saved tensors and must return None for these outputs
            if functorch_active():
                ctx.forward_inputs = inputs
                marked = getattr(ctx, "non_differentiable", None) or ()  # (what mark_non_differentiable kept)
                outputs = output if isinstance(output, tuple) else (output,)
                ctx.differentiable_outputs = tuple(not any(o is m for m in marked) for o in outputs)

    def exact_backward(ctx, *grads):
        if not torch.is_grad_enabled():
            return backward(ctx, *grads)
        # (unpacking checks that no saved tensor was modified in place since)
        with holding_saved_tensors(ctx):
            inputs = forward_inputs(ctx)
            if inputs is not None:
                # (a torch.func vjp's backward runs after its transform ended, on dead wrappers)
                return recorded_backward(forward, _unwrap_dead(inputs), ctx.needs_input_grad, grads,
                                         getattr(ctx, "differentiable_outputs", None))
            return backward(ctx, *grads)
    return exact_backward, setup


def differentiable_op(namespace_name: str, name: str) -> Callable:
    """Op ``name`` of the namespace as its differentiable composition (the forward a recorded
    backward of that op rebuilds)."""
    def forward(*inputs):
        return getattr(differentiable_ops(getattr(torch.ops, namespace_name)), name)(*inputs)
    return forward


def forward_tangents(forward: Callable, inputs: Sequence, tangents: Sequence[Optional[torch.Tensor]]):
    """The output tangents of ``forward(*inputs)`` (rebuilt with DifferentiableOps) for the inputs'
    ``tangents``: forward-mode AD (torch.func.jvp) of the differentiable compositions."""
    positions = [i for i, (t, tangent) in enumerate(zip(inputs, tangents))
                 if isinstance(t, torch.Tensor) and tangent is not None]
    _, out_tangents = torch.func.jvp(_rebuilt(forward, inputs, positions), tuple(inputs[i] for i in positions),
                                     tuple(tangents[i] for i in positions))
    return out_tangents if len(out_tangents) > 1 else out_tangents[0]
