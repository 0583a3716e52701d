"""N weight samples of a Bayesian linear layer in one op (the vectorised multi-sample ELBO).

``bayes_ext::linear_reparam_samples(x[N, B.., I], ..., seeds[N])`` computes, for every sample s,
``y[s] = x[s] W_s^T + b_s`` with W_s, b_s drawn from Philox streams (seeds[s], 0) and (seeds[s], 1),
exactly what ``bayes_ext::linear_reparam`` gives for x[s] and seeds[s], plus per-sample log q and
log p. Why one op: N sequential forwards pay the Python, dispatcher and autograd overhead N times,
which dominates small models; here a whole ELBO step has one autograd node per layer.

Memory: each W_s is generated inside the op, used and dropped (one at a time, blocked for large
weights like the single-sample op); backward regenerates it from seeds[s]. So autograd saves only
x (the activations, which grow with N anyway) and the N seeds, never N weights.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _backend, _checks, _recorded
from . import functional as BF
from .functional import ScaleMixture, _row_blocks
from ._fused_op import fused_custom_op
from ._saved_inputs import saved_tensors


# Small weights (N samples together at most STACKED_ELEMENTS elements) take the multi-seed ops:
# one kernel call draws (or differentiates) all N samples and one bmm applies them, instead of N
# calls each. Larger weights go one sample at a time (blocked like the single-sample op), so no
# N-weight temporary is ever large; nothing weight-sized is saved for backward either way.
STACKED_ELEMENTS = 1 << 20


def _stacked(x: Tensor, weight_mu: Tensor, n: int, blocks) -> bool:
    return len(blocks) == 1 and x.dtype == weight_mu.dtype and n * weight_mu.numel() <= STACKED_ELEMENTS


def _whole_layer_op(x: Tensor, ops) -> bool:
    """Whether the stacked layer runs as one compiled op each way (bayes_ext::linear_samples_stacked,
    csrc/cpu/linear_samples_cpu.cpp: the same ops as the Python below, without the Python between
    them). CPU only for now; elsewhere, and on the pure-PyTorch backend, the Python steps run."""
    return x.device.type == "cpu" and ops is torch.ops.bayes_ext


def _sample_matmul(ops, y_s: Tensor, x_s: Tensor, weight_mu: Tensor, weight_rho: Tensor, seed: Tensor, prior,
                   blocks) -> Tuple[Tensor, Tensor]:
    """y_s = x_s W^T for W from (seed, 0), written into y_s (2-D); returns (log_q, log_p) of W."""
    if len(blocks) == 1:
        w, log_q, log_p = ops.sample_weight(weight_mu, weight_rho, seed, 0, *prior)
        torch.mm(x_s, w.t() if w.dtype == x_s.dtype else w.t().to(x_s.dtype), out=y_s)
        return log_q, log_p
    in_features = weight_mu.shape[1]
    log_q = log_p = 0
    for r0, r1 in blocks:  # cache-sized blocks of rows, each with its noise from the whole stream
        w, q, p = ops.sample_weight(weight_mu[r0:r1], weight_rho[r0:r1], seed, 0, *prior, r0 * in_features)
        y_s[:, r0:r1] = x_s.mm(w.t().to(x_s.dtype))
        log_q, log_p = log_q + q, log_p + p
    return log_q, log_p


def _linear_reparam_samples_impl(x: Tensor, weight_mu: Tensor, weight_rho: Tensor, bias_mu: Optional[Tensor],
                            bias_rho: Optional[Tensor], seeds: Tensor, prior_pi: float, prior_sigma1: float,
                            prior_sigma2: float) -> Tuple[Tensor, Tensor, Tensor]:
    ops, prior = _backend.ops(), (prior_pi, prior_sigma1, prior_sigma2)
    if _recorded.rebuilding():
        return _differentiable_samples(ops, x, weight_mu, weight_rho, bias_mu, bias_rho, seeds, prior)
    n = seeds.shape[0]
    out_features, in_features = weight_mu.shape
    weight_mu, weight_rho = weight_mu.contiguous(), weight_rho.contiguous()
    blocks = _row_blocks(weight_mu)
    stacked = _stacked(x, weight_mu, n, blocks)
    with BF.autocast_off(x.device.type):
        if stacked and _whole_layer_op(x, ops):
            return ops.linear_samples_stacked(x, weight_mu, weight_rho, bias_mu, bias_rho, seeds, *prior)
        y = x.new_empty(x.shape[:-1] + (out_features,))  # the output itself, not a view of it
        x3, y3 = x.reshape(n, -1, in_features), y.view(n, -1, out_features)
        if stacked:
            w, log_q, log_p = ops.sample_weight_samples(weight_mu, weight_rho, seeds, 0, *prior)
            torch.bmm(x3, w.transpose(1, 2), out=y3)
            if bias_mu is not None:
                b, log_q_b, log_p_b = ops.sample_weight_samples(bias_mu, bias_rho, seeds, 1, *prior)
                y3.add_(b.unsqueeze(1))
                log_q, log_p = log_q + log_q_b, log_p + log_p_b
            return y, log_q, log_p
        log_q, log_p, log_q_b, log_p_b = [], [], [], []
        whole = len(blocks) == 1 and x.dtype == weight_mu.dtype
        for seed, x_s, y_s in zip(seeds.unbind(0), x3.unbind(0), y3.unbind(0)):
            if whole:  # the common case, inlined: the Python per sample is most of a small layer's cost
                w, q, p = ops.sample_weight(weight_mu, weight_rho, seed, 0, *prior)
                torch.mm(x_s, w.t(), out=y_s)
            else:
                q, p = _sample_matmul(ops, y_s, x_s, weight_mu, weight_rho, seed, prior, blocks)
            log_q.append(q)
            log_p.append(p)
            if bias_mu is not None:
                b, q, p = ops.sample_weight(bias_mu, bias_rho, seed, 1, *prior)
                y_s.add_(b if b.dtype == y.dtype else b.to(y.dtype))
                log_q_b.append(q)
                log_p_b.append(p)
        log_q, log_p = torch.stack(log_q), torch.stack(log_p)
        if bias_mu is not None:  # weight + bias per sample, as the single-sample op adds them
            log_q, log_p = log_q + torch.stack(log_q_b), log_p + torch.stack(log_p_b)
        return y, log_q, log_p


def _differentiable_samples(ops, x: Tensor, weight_mu: Tensor, weight_rho: Tensor, bias_mu: Optional[Tensor],
                            bias_rho: Optional[Tensor], seeds: Tensor, prior) -> Tuple[Tensor, Tensor, Tensor]:
    """The same samples out of place (no out= GEMMs), for a recorded backward to differentiate
    (_recorded.py)."""
    x3 = x.reshape(seeds.shape[0], -1, weight_mu.shape[1])
    w, log_q, log_p = ops.sample_weight_samples(weight_mu, weight_rho, seeds, 0, *prior)
    y = torch.bmm(x3, w.transpose(1, 2).to(x.dtype))
    if bias_mu is not None:
        b, log_q_b, log_p_b = ops.sample_weight_samples(bias_mu, bias_rho, seeds, 1, *prior)
        y = y + b.unsqueeze(1).to(y.dtype)
        log_q, log_p = log_q + log_q_b, log_p + log_p_b
    return y.reshape(x.shape[:-1] + (weight_mu.shape[0],)), log_q, log_p


_linear_reparam_samples = fused_custom_op("bayes_ext::linear_reparam_samples")(
    _linear_reparam_samples_impl)


@_linear_reparam_samples.register_fake
def _(x, weight_mu, weight_rho, bias_mu, bias_rho, seeds, prior_pi, prior_sigma1, prior_sigma2):
    n = seeds.shape[0]
    out = x.new_empty(x.shape[:-1] + (weight_mu.shape[0],))
    return out, weight_mu.new_empty((n,)), weight_mu.new_empty((n,))


def _backward(ctx, grad_out, grad_log_q, grad_log_p):
    x, weight_mu, weight_rho, bias_mu, bias_rho, seeds = saved_tensors(ctx)
    ops, prior = ctx.ops, ctx.prior
    n = seeds.shape[0]
    zeros = weight_mu.new_zeros((n,))
    grad_log_q = zeros if grad_log_q is None else grad_log_q
    grad_log_p = zeros if grad_log_p is None else grad_log_p
    out_features, in_features = weight_mu.shape
    weight_mu, weight_rho = weight_mu.contiguous(), weight_rho.contiguous()
    need_x = ctx.needs_input_grad[0]
    blocks = _row_blocks(weight_mu)
    stacked = _stacked(x, weight_mu, n, blocks)
    w_dtype = weight_mu.dtype
    if grad_out.dtype != x.dtype:
        grad_out = grad_out.to(x.dtype)
    with BF.autocast_off(x.device.type):
        if stacked and _whole_layer_op(x, ops):
            grad_x, grad_mu, grad_rho, grad_bias_mu, grad_bias_rho = ops.linear_samples_stacked_backward(
                grad_out, grad_log_q, grad_log_p, x, weight_mu, weight_rho, bias_mu, bias_rho, seeds, *prior, need_x)
            if bias_mu is None:
                grad_bias_mu = grad_bias_rho = None
            return (grad_x if need_x else None, grad_mu, grad_rho, grad_bias_mu, grad_bias_rho,
                    None, None, None, None)
        x3 = x.reshape(n, -1, in_features)
        grad_out3 = grad_out.reshape(n, -1, out_features)
        if stacked:
            grad_w = torch.bmm(grad_out3.transpose(1, 2), x3)
            grad_mu, grad_rho, w = ops.sample_weight_samples_backward(grad_w, grad_log_q, grad_log_p, weight_mu,
                                                                      weight_rho, seeds, 0, *prior, need_x)
            grad_x = torch.bmm(grad_out3, w).reshape(x.shape) if need_x else None
            grad_bias_mu = grad_bias_rho = None
            if bias_mu is not None:
                grad_bias_mu, grad_bias_rho, _ = ops.sample_weight_samples_backward(
                    grad_out3.sum(1), grad_log_q, grad_log_p, bias_mu, bias_rho, seeds, 1, *prior, False)
            return grad_x, grad_mu, grad_rho, grad_bias_mu, grad_bias_rho, None, None, None, None
        grad_log_q, grad_log_p = grad_log_q.unbind(0), grad_log_p.unbind(0)
        grad_x = torch.empty_like(x3) if need_x else None
        grad_x_list = grad_x.unbind(0) if need_x else [None] * n
        grad_out3_t = grad_out3.transpose(1, 2).unbind(0)
        totals = None  # [grad_mu, grad_rho(, grad_bias_mu, grad_bias_rho)], summed over the samples
        for s, (seed, x_s, g_s, gx_s) in enumerate(zip(seeds.unbind(0), x3.unbind(0), grad_out3.unbind(0),
                                                        grad_x_list)):
            g_q, g_p = grad_log_q[s], grad_log_p[s]
            if len(blocks) == 1:
                grad_w = torch.mm(grad_out3_t[s], x_s)
                g_mu, g_rho, w = ops.sample_weight_backward(grad_w if grad_w.dtype == w_dtype else grad_w.to(w_dtype),
                                                            g_q, g_p, weight_mu, weight_rho, seed, 0, *prior, need_x)
                if need_x:
                    torch.mm(g_s, w if w.dtype == x.dtype else w.to(x.dtype), out=gx_s)
            else:  # blocks of rows: no weight-sized temporary at all
                g_mu, g_rho = torch.empty_like(weight_mu), torch.empty_like(weight_rho)
                if need_x:
                    gx_s.zero_()
                for r0, r1 in blocks:
                    grad_w = g_s[:, r0:r1].t().mm(x_s).to(w_dtype)
                    w = ops.sample_weight_backward_into(g_mu[r0:r1], g_rho[r0:r1], grad_w, g_q, g_p, weight_mu[r0:r1],
                                                        weight_rho[r0:r1], seed, 0, *prior, need_x, r0 * in_features)
                    if need_x:
                        gx_s.addmm_(g_s[:, r0:r1], w.to(x.dtype))
            grads = [g_mu, g_rho]
            if bias_mu is not None:
                grads += ops.sample_weight_backward(g_s.sum(0, dtype=w_dtype), g_q, g_p, bias_mu, bias_rho, seed, 1,
                                                    *prior, False)[:2]
            if totals is None:
                totals = grads
            else:
                torch._foreach_add_(totals, grads)
        if grad_x is not None:
            grad_x = grad_x.reshape(x.shape)
        if bias_mu is None:
            totals += [None, None]
    return (grad_x, *totals, None, None, None, None)


# x and N seeds are the only new memory: every W_s is rebuilt from seeds[s] in backward
_linear_reparam_samples.register_autograd(_backward, setup_context=BF.linear_op_setup_context)


def check_seeds(seeds, like: Tensor, sample_nbr: Optional[int] = None) -> None:
    """seeds: a 1-D int64 tensor of N >= 1 values, on the CPU or the parameters' device."""
    _checks.check_tensor(seeds, "seeds")
    if seeds.dtype != torch.int64:
        raise TypeError(f"seeds must be an int64 tensor, got {seeds.dtype}")
    if seeds.dim() != 1 or seeds.shape[0] < 1:
        raise ValueError(f"seeds must be a 1-D tensor of N >= 1 seeds (one per sample), got shape {tuple(seeds.shape)}")
    if sample_nbr is not None and seeds.shape[0] != sample_nbr:
        raise ValueError(f"seeds must hold one seed per sample: x has {sample_nbr} samples in dim 0, "
                         f"got {seeds.shape[0]} seeds")
    if seeds.device.type != "cpu" and seeds.device != like.device:
        raise ValueError(f"seeds must be on the CPU or on the device of weight_mu ({like.device}), got {seeds.device}")


def draw_seeds(n: int, generator: Optional[torch.Generator] = None) -> Tensor:
    """n seeds as n successive ``functional.draw_seed()`` calls would give them (one randint call);
    from the CUDA generator inside CUDA graph capture, as ``draw_seed``."""
    if generator is None and BF._capturing_cuda_graph():
        return torch.randint(0, BF.SEED_HIGH, (n,), dtype=torch.int64, device="cuda")
    return torch.randint(0, BF.SEED_HIGH, (n,), dtype=torch.int64, generator=generator)


def bayesian_linear_samples(x: Tensor, weight_mu: Tensor, weight_rho: Tensor, bias_mu: Optional[Tensor] = None,
                            bias_rho: Optional[Tensor] = None, seeds: Optional[Tensor] = None,
                            prior: ScaleMixture = (1.0, 0.1, 0.4)) -> Tuple[Tensor, Tensor, Tensor]:
    """N samples of ``functional.bayesian_linear`` at once: x is (N, B.., I), seeds (N,) int64.

    Returns (y (N, B.., O), log_q (N,), log_p (N,)); sample s equals
    ``bayesian_linear(x[s], ..., seed=seeds[s])``. Backward regenerates each W_s from its seed, so
    only x and the seeds are saved. ``seeds=None`` draws N fresh ones.
    """
    BF.check_linear_params(weight_mu, weight_rho, bias_mu, bias_rho)
    BF.check_input(x, weight_mu, weight_mu.shape[1])
    if x.dim() < 2:
        raise ValueError(f"input must be (N, ..., in_features) with the samples in dim 0, got shape {tuple(x.shape)}")
    seeds = draw_seeds(x.shape[0]) if seeds is None else seeds
    check_seeds(seeds, weight_mu, x.shape[0])
    pi, sigma1, sigma2 = _checks.prior_values(prior)
    return linear_samples_unchecked(x, weight_mu, weight_rho, bias_mu, bias_rho, seeds, (pi, sigma1, sigma2))


def linear_samples_unchecked(x, weight_mu, weight_rho, bias_mu, bias_rho, seeds, prior):
    """bayesian_linear_samples for arguments already checked (a layer's own parameters and seeds)."""
    low_precision = BF.autocast_dtype(x)
    if low_precision is not None:
        x = x.to(low_precision)
    seeds = seeds.contiguous()
    if _eager_whole_layer(x, weight_mu, weight_rho, bias_mu, bias_rho, seeds):
        # the compiled op with its autograd in C++ (csrc/cpu/linear_samples_cpu.cpp); the overload
        # itself, not the packet: a packet call resolves the overload on every call
        return torch.ops.bayes_ext.linear_samples_stacked.default(x, weight_mu, weight_rho, bias_mu, bias_rho, seeds,
                                                                  *prior)
    # eager calls take the fused op's autograd.Function fast path (see _fused_op.py)
    return _linear_reparam_samples(x, weight_mu, weight_rho, bias_mu, bias_rho, seeds, *prior)


def linear_samples_grouped(x, weight_mu, weight_rho, bias_mu, bias_rho, seeds, prior):
    """linear_samples_unchecked for x (N*B, ..., I), sample s on rows [s*B, (s+1)*B) of dim 0; y
    (N*B, ..., O) likewise. The vectorised ELBO's layers see their input so: the compiled op takes
    it as it is (and reads strided seeds in place), the other paths view it as (N, B, ..., I).
    x is checked here (as a layer input), or by the compiled op itself."""
    if BF.autocast_dtype(x) is None and _eager_whole_layer(x, weight_mu, weight_rho, bias_mu, bias_rho, seeds):
        return torch.ops.bayes_ext.linear_samples_stacked.default(x, weight_mu, weight_rho, bias_mu, bias_rho, seeds,
                                                                  *prior)
    BF.check_input(x, weight_mu, weight_mu.shape[1])
    n = seeds.shape[0]
    y, log_q, log_p = linear_samples_unchecked(x.reshape((n, x.shape[0] // n) + x.shape[1:]), weight_mu, weight_rho,
                                               bias_mu, bias_rho, seeds, prior)
    return y.flatten(0, 1), log_q, log_p


def _eager_whole_layer(x, weight_mu, weight_rho, bias_mu, bias_rho, seeds) -> bool:
    """bayes_ext::linear_samples_stacked with its C++ autograd applies: an eager compiled CPU call
    (BF.eager_compiled_call) of a small layer."""
    # one block of rows is _stacked's first condition, asked without building the blocks' list
    return (x.dtype == weight_mu.dtype and seeds.shape[0] * weight_mu.numel() <= STACKED_ELEMENTS
            and BF._block_rows(weight_mu) == weight_mu.shape[0]
            and BF.eager_compiled_call(x, (x, weight_mu, weight_rho, bias_mu, bias_rho, seeds)))
