"""Lower-variance gradient estimators for a Bayesian linear layer, as fused custom ops.

- ``linear_lrt``: local reparameterisation (Kingma, Salimans, Welling 2015). The pre-activations of
  W ~ N(mu, sigma^2) are Gaussian, so they are sampled instead of W:
  y = x mu^T + b_mu + sqrt(x^2 (sigma^2)^T + sigma_b^2) * eps, eps of the output's shape.
- ``linear_flipout``: Flipout (Wen et al. 2018). One weight perturbation dW = W - mu per forward,
  decorrelated across the batch by random signs: y = x mu^T + b + ((x * S) dW^T) * R.

Both give every example its own noise (lower gradient variance than one W for the batch) and
both backwards are hand-written: they regenerate the noise (eps, the signs, dW) from the seed
instead of saving it, so a training forward keeps only the input and batch-sized tensors.

Philox streams of one forward (seed, offset): 0 the weight, 1 the bias, 2 the LRT output noise,
3 Flipout's input signs S, 4 its output signs R.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _backend, _checks
from . import functional as BF
from ._functorch_state import functorch_active
from ._fused_op import fused_custom_op
from ._saved_inputs import saved_tensors
from .functional_samples import check_seeds

ScaleMixture = Tuple[float, float, float]  # (pi, sigma1, sigma2)
LRT_NOISE_OFFSET = BF.LRT_NOISE_OFFSET  # 2
SIGN_IN_OFFSET = 3
SIGN_OUT_OFFSET = 4


# ---- shared pieces (also used by the conv estimators) ----------------------------------------------

def normal(shape, seed: Tensor, offset: int, like: Tensor) -> Tensor:
    """Standard normals of `shape` from Philox stream (seed, offset), in like's dtype and device."""
    return _backend.ops().philox_normal(like.new_empty(shape), seed, offset)


def signs(shape, seed: Tensor, offset: int, like: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    """+1 / -1 of `shape`: the sign of stream (seed, offset)'s normals (symmetric, so a fair coin
    from Philox bits, and the same on every backend). Cheap to regenerate, so never saved."""
    return signs_of(normal(shape, seed, offset, like), dtype or like.dtype)


def signs_of(normals: Tensor, dtype: torch.dtype) -> Tensor:
    """+1 where normals >= 0 (0 and -0 included), else -1, in `dtype`; normals is overwritten."""
    return normals.ge_(0).to(dtype).mul_(2).sub_(1)


def half_noise_grad(ops, grad_out: Tensor, std: Tensor, seed: Tensor) -> Tensor:
    """dL/dvar = grad * eps / (2 std) for y = mean + std * eps, eps regenerated, in a backward: the
    fused op (eps never written). seed: one, or N for N groups of rows (the ops' seed groups).

    Where var = 0 (an all-zero input row without bias) sqrt has no derivative; 0 is taken there
    (a valid subgradient of |x| sigma), so gradients stay finite instead of NaN."""
    return ops.lrt_noise_grad(grad_out.to(std.dtype), std, seed, LRT_NOISE_OFFSET)


def zero_if_none(grad: Optional[Tensor], like: Tensor) -> Tensor:
    return like.new_zeros(()) if grad is None else grad


# ---- local reparameterisation -------------------------------------------------------------------

@fused_custom_op("bayes_ext::linear_lrt")
def _linear_lrt(x: Tensor, weight_mu: Tensor, weight_rho: Tensor, bias_mu: Optional[Tensor],
                bias_rho: Optional[Tensor], seed: Tensor, prior_sigma: float) -> Tuple[Tensor, Tensor, Tensor]:
    # Two GEMMs (mean, variance) around the fused weight pass (sigma^2 and, when prior_sigma > 0,
    # the closed-form KL against N(0, prior_sigma^2) in the same pass) and one elementwise pass.
    # Returns (y, std, kl): std (batch-sized) is kept for backward, eps is not. Under autocast the
    # GEMMs run in x's dtype, the rest in the parameters'. N seeds: N samples whose rows are grouped
    # in dim 0 (linear_lrt_samples); only the output noise differs between them (the noise ops' seed
    # groups).
    ops, dtype, low = _backend.ops(), weight_mu.dtype, x.dtype
    blocks = BF._row_blocks(weight_mu, BF.LRT_BLOCK_ELEMENTS)
    with BF.autocast_off(x.device.type):
        mean = F.linear(x, weight_mu.to(low), None if bias_mu is None else bias_mu.to(low)).to(dtype)
        if len(blocks) == 1:
            sigma2, kl = ops.lrt_weight_forward(weight_mu, weight_rho, prior_sigma)
            var = F.linear(x * x, sigma2.to(low)).to(dtype)
        else:
            var, kl = _blocked_variance(ops, x, weight_mu.contiguous(), weight_rho.contiguous(), prior_sigma, blocks)
        if bias_rho is not None:
            bias_sigma2, bias_kl = ops.lrt_weight_forward(bias_mu, bias_rho, prior_sigma)
            var += bias_sigma2
            kl = kl + bias_kl
        y = ops.lrt_output_(var, mean, seed, LRT_NOISE_OFFSET)  # var becomes std in place
    return y.to(low), var, kl


def _blocked_variance(ops, x: Tensor, mu: Tensor, rho: Tensor, prior_sigma: float, blocks):
    """x^2 (sigma^2)^T (in the parameters' dtype, x's shape with out_features last) and the KL, one
    block of rows of sigma^2 at a time (BF.LRT_BLOCK_ELEMENTS elements): a large CPU weight's sigma^2
    is never allocated whole (a fresh weight-sized tensor past glibc's mmap threshold costs its page
    faults each step; see bench/README.md)."""
    x_2d = x.reshape(-1, mu.shape[1])
    x2 = x_2d * x_2d
    var = torch.empty(x_2d.shape[0], mu.shape[0], dtype=mu.dtype, device=mu.device)
    kl = 0
    for r0, r1 in blocks:
        sigma2, block_kl = ops.lrt_weight_forward(mu[r0:r1], rho[r0:r1], prior_sigma)
        var[:, r0:r1] = x2.mm(sigma2.t().to(x.dtype))
        kl = kl + block_kl
    return var.reshape(x.shape[:-1] + (mu.shape[0],)), kl


@_linear_lrt.register_fake
def _(x, weight_mu, weight_rho, bias_mu, bias_rho, seed, prior_sigma):
    shape = x.shape[:-1] + (weight_mu.shape[0],)
    return x.new_empty(shape), weight_mu.new_empty(shape), weight_mu.new_empty(())


def _linear_lrt_setup_context(ctx, inputs, output):
    x, weight_mu, weight_rho, bias_mu, bias_rho, seed, prior_sigma = inputs
    ctx.mark_non_differentiable(output[1])  # std is an internal output, saved for backward
    ctx.save_for_backward(x, weight_mu, weight_rho, bias_mu, bias_rho, seed, output[1])
    ctx.prior_sigma = prior_sigma
    ctx.ops = _backend.ops()


def _linear_lrt_backward(ctx, grad_y, grad_std, grad_kl):
    x, mu, rho, bias_mu, bias_rho, seed, std = saved_tensors(ctx)
    ops, prior_sigma, low = ctx.ops, ctx.prior_sigma, x.dtype
    out_features, in_features = mu.shape
    need_x = ctx.needs_input_grad[0]
    need_w = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
    need_b = bias_mu is not None and (ctx.needs_input_grad[3] or ctx.needs_input_grad[4])
    grad_kl = zero_if_none(grad_kl, mu)
    with BF.autocast_off(x.device.type), torch.no_grad():  # (a recorded backward goes to _recorded.py)
        std = std.reshape(-1, out_features)
        g = (torch.zeros_like(std) if grad_y is None else grad_y).reshape(-1, out_features)
        x_2d = x.reshape(-1, in_features)
        half_u = half_noise_grad(ops, g, std, seed)  # dL/dvar
        g, half_u_low = g.to(low), half_u.to(low)
        grad_x = grad_mu = grad_rho = grad_bmu = grad_brho = sigma2 = None
        blocks = BF._row_blocks(mu, BF.LRT_BLOCK_ELEMENTS)
        if need_w and len(blocks) > 1 and not functorch_active():
            grad_mu, grad_rho, grad_x = _blocked_lrt_weight_grads(ops, g, half_u_low, x_2d, mu.contiguous(),
                                                                  rho.contiguous(), grad_kl, prior_sigma, blocks,
                                                                  need_x)
            if need_x:
                grad_x = grad_x.reshape(x.shape)
        elif need_w:
            # the GEMMs give dL/dmu and dL/dsigma2 of the data term; one fused pass adds the KL's
            # gradients, turns dL/dsigma2 into dL/drho and rebuilds sigma2 for grad_x
            if functorch_active():  # vmap may batch g: fresh GEMM results, no out=
                grad_mu, grad_rho = g.t().mm(x_2d).to(mu.dtype), half_u_low.t().mm(x_2d * x_2d).to(mu.dtype)
            else:
                grad_mu, grad_rho = BF.weight_grad_pair(mu)
                mm_into(grad_mu, g.t(), x_2d)
                mm_into(grad_rho, half_u_low.t(), x_2d * x_2d)
            sigma2 = ops.lrt_weight_backward_(grad_mu, grad_rho, grad_kl, mu, rho, prior_sigma)
        if need_x and grad_x is None:  # d/dx of x mu^T and of x^2 (sigma^2)^T
            if sigma2 is None:
                sigma2 = ops.lrt_weight_forward(mu, rho, 0.0)[0]
            grad_x = torch.addcmul(g.mm(mu.to(low)), x_2d, half_u_low.mm(sigma2.to(low)), value=2)
            grad_x = grad_x.reshape(x.shape)
        if need_b:
            grad_bmu = g.sum(0, dtype=bias_mu.dtype)
            grad_brho = half_u.sum(0).to(bias_rho.dtype)
            ops.lrt_weight_backward_(grad_bmu, grad_brho, grad_kl, bias_mu, bias_rho, prior_sigma)
    return grad_x, grad_mu, grad_rho, grad_bmu, grad_brho, None, None


def _blocked_lrt_weight_grads(ops, g: Tensor, half_u: Tensor, x_2d: Tensor, mu: Tensor, rho: Tensor, grad_kl: Tensor,
                              prior_sigma: float, blocks, need_x: bool):
    """(grad_mu, grad_rho, grad_x or None) of the LRT backward for a large CPU weight, block by block
    of rows: each block's data gradients are written into the rows of the whole gradients, turned
    into the full ones in place (lrt_weight_backward_, KL included) and its sigma^2 consumed by
    dL/dx while in cache, so no weight-sized temporary besides the gradients themselves."""
    grad_mu, grad_rho = BF.weight_grad_pair(mu)
    x2 = x_2d * x_2d
    var_grad_x = x_2d.new_zeros(x_2d.shape) if need_x else None  # half_u (sigma^2), summed over blocks
    for r0, r1 in blocks:
        mm_into(grad_mu[r0:r1], g[:, r0:r1].t(), x_2d)
        mm_into(grad_rho[r0:r1], half_u[:, r0:r1].t(), x2)
        sigma2 = ops.lrt_weight_backward_(grad_mu[r0:r1], grad_rho[r0:r1], grad_kl, mu[r0:r1], rho[r0:r1],
                                          prior_sigma)
        if need_x:
            var_grad_x.addmm_(half_u[:, r0:r1], sigma2.to(x_2d.dtype))
    grad_x = torch.addcmul(g.mm(mu.to(x_2d.dtype)), x_2d, var_grad_x, value=2) if need_x else None
    return grad_mu, grad_rho, grad_x


def mm_into(out: Tensor, a: Tensor, b: Tensor) -> None:
    """out = a @ b; a GEMM in a lower precision than out (autocast) is cast into it."""
    if a.dtype == out.dtype:
        torch.mm(a, b, out=out)
    else:
        out.copy_(a.mm(b))


_linear_lrt.register_autograd(_linear_lrt_backward, setup_context=_linear_lrt_setup_context)


# ---- Flipout ------------------------------------------------------------------------------------

@fused_custom_op("bayes_ext::linear_flipout")
def _linear_flipout(x: Tensor, weight_mu: Tensor, weight_rho: Tensor, bias_mu: Optional[Tensor],
                    bias_rho: Optional[Tensor], seed: Tensor, prior_pi: float, prior_sigma1: float,
                    prior_sigma2: float) -> Tuple[Tensor, Tensor, Tensor]:
    ops, prior, low = _backend.ops(), (prior_pi, prior_sigma1, prior_sigma2), x.dtype
    blocks = BF._row_blocks(weight_mu)
    with BF.autocast_off(x.device.type):
        x_signed = x * signs(x.shape, seed, SIGN_IN_OFFSET, weight_mu, low)
        if len(blocks) == 1:
            # dW = W - mu with W from the weight's own stream, so log q / log p are the MC KL terms of W
            dw, log_q, log_p = ops.sample_weight(weight_mu, weight_rho, seed, 0, *prior, 0, True)
            perturbation = F.linear(x_signed, dw.to(low))
        else:
            perturbation, log_q, log_p = _blocked_perturbation(ops, x_signed, weight_mu.contiguous(),
                                                               weight_rho.contiguous(), seed, prior, blocks)
        perturbation *= signs(perturbation.shape, seed, SIGN_OUT_OFFSET, weight_mu, low)
        y = torch.addmm(perturbation.reshape(-1, weight_mu.shape[0]), x.reshape(-1, weight_mu.shape[1]),
                        weight_mu.t().to(low)).reshape(perturbation.shape)
        if bias_mu is not None:
            b, log_q_b, log_p_b = ops.sample_weight(bias_mu, bias_rho, seed, 1, *prior)
            y += b.to(low)
            log_q, log_p = log_q + log_q_b, log_p + log_p_b
    return y, log_q, log_p


_linear_flipout.register_fake(BF.linear_op_fake)


def _blocked_perturbation(ops, x_signed: Tensor, mu: Tensor, rho: Tensor, seed: Tensor, prior, blocks):
    """(x_signed dW^T, log q, log p) for a large CPU weight, one block of rows of W at a time (each
    with the noise it has in the whole weight, consumed by its GEMM while in cache): no weight-sized
    temporary, whose page faults cost more than a pass over it."""
    in_features = mu.shape[1]
    x_2d = x_signed.reshape(-1, in_features)
    out = x_2d.new_empty(x_2d.shape[0], mu.shape[0])
    log_q = log_p = 0
    for r0, r1 in blocks:
        dw, q, p = ops.sample_weight(mu[r0:r1], rho[r0:r1], seed, 0, *prior, r0 * in_features, True)
        out[:, r0:r1] = x_2d.mm(dw.t().to(x_2d.dtype))
        log_q, log_p = log_q + q, log_p + p
    return out.reshape(x_signed.shape[:-1] + (mu.shape[0],)), log_q, log_p


def _add_mm(out: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """out += a @ b, in place when the dtypes allow (autocast: a, b in a lower precision)."""
    if a.dtype == out.dtype:
        return out.addmm_(a, b)
    return out.add_(a.mm(b).to(out.dtype))


def _linear_flipout_backward(ctx, grad_y, grad_log_q, grad_log_p):
    x, mu, rho, bias_mu, bias_rho, seed = saved_tensors(ctx)
    ops, prior, low = ctx.ops, ctx.prior, x.dtype
    grad_log_q, grad_log_p = zero_if_none(grad_log_q, mu), zero_if_none(grad_log_p, mu)
    out_features, in_features = mu.shape
    need_x = ctx.needs_input_grad[0]
    need_w = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
    need_b = bias_mu is not None and (ctx.needs_input_grad[3] or ctx.needs_input_grad[4])
    with BF.autocast_off(x.device.type):
        x_2d = x.reshape(-1, in_features)
        g = x_2d.new_zeros(x_2d.shape[0], out_features) if grad_y is None else grad_y.reshape(-1, out_features)
        g = g.to(low)
        g_signed = g * signs(g.shape, seed, SIGN_OUT_OFFSET, mu, low)
        s_in = signs(x_2d.shape, seed, SIGN_IN_OFFSET, mu, low)
        grad_x = grad_mu = grad_rho = dw = None
        blocks = BF._row_blocks(mu)
        if need_w and len(blocks) > 1 and not functorch_active():
            grad_mu, grad_rho, grad_x = _blocked_flipout_grads(ops, g, g_signed, s_in, x_2d, mu.contiguous(),
                                                               rho.contiguous(), grad_log_q, grad_log_p, seed, prior,
                                                               blocks, need_x)
            if need_x:
                grad_x = grad_x.reshape(x.shape)
        elif need_w:
            grad_dw = g_signed.t().mm(x_2d * s_in).to(mu.dtype)
            # the noise dW's backward: grad_dw reaches rho only, grad_mu holds the KL's terms (through
            # W = mu + dW); mu's own term is g^T x
            grad_mu, grad_rho, dw = ops.sample_weight_backward(grad_dw, grad_log_q, grad_log_p, mu, rho, seed, 0,
                                                               *prior, need_x, 0, True)
            grad_mu = _add_mm(grad_mu, g.t(), x_2d)
        elif need_x:
            dw = ops.sample_weight(mu, rho, seed, 0, *prior, 0, True)[0]
        if need_x and grad_x is None:
            grad_x = torch.addcmul(g.mm(mu.to(low)), g_signed.mm(dw.to(low)), s_in).reshape(x.shape)
        grad_bias_mu = grad_bias_rho = None
        if need_b:
            grad_bias_mu, grad_bias_rho, _ = ops.sample_weight_backward(
                g.sum(0, dtype=bias_mu.dtype), grad_log_q, grad_log_p, bias_mu, bias_rho, seed, 1, *prior, False)
    return grad_x, grad_mu, grad_rho, grad_bias_mu, grad_bias_rho, None, None, None, None


def _blocked_flipout_grads(ops, g: Tensor, g_signed: Tensor, s_in: Tensor, x_2d: Tensor, mu: Tensor, rho: Tensor,
                           grad_log_q: Tensor, grad_log_p: Tensor, seed: Tensor, prior, blocks, need_x: bool):
    """(grad_mu, grad_rho, grad_x or None) of the Flipout backward for a large CPU weight, block by
    block of rows: each block's dW is regenerated, differentiated straight into the rows of the whole
    gradients and consumed by dL/dx while in cache."""
    in_features = mu.shape[1]
    grad_mu, grad_rho = BF.weight_grad_pair(mu)
    x_in = x_2d * s_in
    signed_grad_x = x_2d.new_zeros(x_2d.shape) if need_x else None  # g_signed dW, summed over blocks
    for r0, r1 in blocks:
        grad_dw = g_signed[:, r0:r1].t().mm(x_in).to(mu.dtype)
        # as in the one-block path: the noise's backward puts the KL's terms in grad_mu and grad_dw
        # into grad_rho; mu's own term is g^T x
        dw = ops.sample_weight_backward_into(grad_mu[r0:r1], grad_rho[r0:r1], grad_dw, grad_log_q, grad_log_p,
                                             mu[r0:r1], rho[r0:r1], seed, 0, *prior, need_x, r0 * in_features, True)
        _add_mm(grad_mu[r0:r1], g[:, r0:r1].t(), x_2d)
        if need_x:
            signed_grad_x.addmm_(g_signed[:, r0:r1], dw.to(x_2d.dtype))
    grad_x = torch.addcmul(g.mm(mu.to(x_2d.dtype)), signed_grad_x, s_in) if need_x else None
    return grad_mu, grad_rho, grad_x


_linear_flipout.register_autograd(_linear_flipout_backward, setup_context=BF.linear_op_setup_context)


# ---- entry points ---------------------------------------------------------------------------------

def linear_lrt(x: Tensor, weight_mu: Tensor, weight_rho: Tensor, bias_mu: Optional[Tensor] = None,
               bias_rho: Optional[Tensor] = None, seed: Optional[Tensor] = None) -> Tensor:
    """Local reparameterisation: y = x mu^T + b_mu + sqrt(x^2 (sigma^2)^T + sigma_b^2) * eps, eps of
    y's shape from Philox stream (seed, 2); sigma = softplus(rho). Never materialises O x I noise;
    backward regenerates eps. The KL is not part of it (``linear_lrt_with_kl``, or an MC estimate
    on the weight's stream: see the layers)."""
    x, seed = BF.prepare_linear_call(x, weight_mu, weight_rho, bias_mu, bias_rho, seed)
    return _lrt_call(x, weight_mu, weight_rho, bias_mu, bias_rho, seed, 0.0)[0]


def linear_lrt_with_kl(x: Tensor, weight_mu: Tensor, weight_rho: Tensor, bias_mu: Optional[Tensor] = None,
                       bias_rho: Optional[Tensor] = None, seed: Optional[Tensor] = None,
                       prior_sigma: float = 0.1) -> Tuple[Tensor, Tensor]:
    """(linear_lrt(...), sum KL(q || N(0, prior_sigma^2)) over the weight and bias), the KL computed
    in the same fused pass over the parameters as sigma^2 (and its gradient in the backward's)."""
    _checks.check_positive_prior_sigma(prior_sigma)
    # (the op also takes N seeds, linear_lrt_samples' groups: one seed here is the Python checks' rule)
    x_for_op = BF._layer_op_input(x, weight_mu, weight_rho, bias_mu, bias_rho, seed, False)
    if x_for_op is not None and (seed is None or seed.numel() == 1):
        seed = BF.draw_seed() if seed is None else seed
        with BF.worded_errors(lambda: BF.prepare_linear_call(x, weight_mu, weight_rho, bias_mu, bias_rho, seed)):
            y, _, kl = torch.ops.bayes_ext.linear_lrt_rows.default(
                x_for_op, weight_mu, weight_rho, bias_mu, bias_rho, seed, float(prior_sigma),
                BF._block_rows(weight_mu, BF.LRT_BLOCK_ELEMENTS))
        return y, kl
    x, seed = BF.prepare_linear_call(x, weight_mu, weight_rho, bias_mu, bias_rho, seed)
    y, _, kl = _lrt_call(x, weight_mu, weight_rho, bias_mu, bias_rho, seed, float(prior_sigma))
    return y, kl


def linear_lrt_samples(x: Tensor, weight_mu: Tensor, weight_rho: Tensor, bias_mu: Optional[Tensor],
                       bias_rho: Optional[Tensor], seeds: Tensor, prior_sigma: float) -> Tuple[Tensor, Tensor]:
    """N samples of linear_lrt_with_kl in one call (the vectorised multi-sample ELBO): x (N * B, ...,
    I) holds sample s in rows [s * B, (s + 1) * B) of dim 0, whose output noise comes from seeds[s]
    (1-D int64, N >= 1), exactly as N calls of linear_lrt_with_kl(x[sample s], seed=seeds[s]) would
    draw it. The weights are the same for every sample, so the mean and variance GEMMs and the passes
    over the weights run once for all N; the returned KL (closed form, against N(0, prior_sigma^2))
    is every sample's."""
    _checks.check_positive_prior_sigma(prior_sigma)
    x = BF.prepare_linear_input(x, weight_mu, weight_rho, bias_mu, bias_rho)
    check_seeds(seeds, weight_mu)
    n = seeds.shape[0]
    if x.dim() < 2 or x.shape[0] % n != 0:
        raise ValueError(f"x must hold the {n} samples (one per seed) of a batch in dim 0, got shape {tuple(x.shape)}")
    y, _, kl = _lrt_call(x, weight_mu, weight_rho, bias_mu, bias_rho, seeds, float(prior_sigma))
    return y, kl


def _lrt_call(x, weight_mu, weight_rho, bias_mu, bias_rho, seed, prior_sigma: float):
    """(y, std, kl) of _linear_lrt; eager compiled CPU calls with x in a dtype the op takes
    (BF._eager_layer_op) take the same computation in one C++ call each way (bayes_ext::linear_lrt_rows,
    its autograd in C++)."""
    if BF._eager_layer_op(x, weight_mu, weight_rho, bias_mu, bias_rho, seed, ("cpu",)):
        rows = BF._block_rows(weight_mu, BF.LRT_BLOCK_ELEMENTS)
        return torch.ops.bayes_ext.linear_lrt_rows.default(x, weight_mu, weight_rho, bias_mu, bias_rho, seed,
                                                           prior_sigma, rows)
    return _linear_lrt(x, weight_mu, weight_rho, bias_mu, bias_rho, seed, prior_sigma)


def linear_flipout(x: Tensor, weight_mu: Tensor, weight_rho: Tensor, bias_mu: Optional[Tensor] = None,
                   bias_rho: Optional[Tensor] = None, seed: Optional[Tensor] = None,
                   prior: ScaleMixture = (1.0, 0.1, 0.4)) -> Tuple[Tensor, Tensor, Tensor]:
    """Flipout: y = x mu^T + b + ((x * S) dW^T) * R; returns (y, log_q, log_p) of W = mu + dW, b.

    dW = softplus(rho) * eps from stream (seed, 0) (W's own sample), b from (seed, 1); S (x's
    shape) and R (y's shape) are +-1 signs from streams 3 and 4. Each output has the marginal of
    the weight-noise model; backward regenerates dW, S and R."""
    x_for_op = (BF._layer_op_input(x, weight_mu, weight_rho, bias_mu, bias_rho, seed, False)
                if BF.three_floats(prior) else None)
    if x_for_op is not None:
        seed = BF.draw_seed() if seed is None else seed
        with BF.worded_errors(lambda: (BF.prepare_linear_call(x, weight_mu, weight_rho, bias_mu, bias_rho, seed),
                                       _checks.prior_values(prior))):
            return torch.ops.bayes_ext.linear_flipout_rows.default(x_for_op, weight_mu, weight_rho, bias_mu,
                                                                   bias_rho, seed, *prior, BF._block_rows(weight_mu))
    x, seed = BF.prepare_linear_call(x, weight_mu, weight_rho, bias_mu, bias_rho, seed)
    pi, sigma1, sigma2 = _checks.prior_values(prior)
    return _flipout_call(x, weight_mu, weight_rho, bias_mu, bias_rho, seed, pi, sigma1, sigma2)


def _flipout_call(x, weight_mu, weight_rho, bias_mu, bias_rho, seed, pi: float, sigma1: float, sigma2: float):
    """(y, log_q, log_p) of _linear_flipout; eager compiled CPU calls with x in a dtype the op takes
    (BF._eager_layer_op) take the same computation in one C++ call each way
    (bayes_ext::linear_flipout_rows, its autograd in C++): the custom op's Python dispatch and the
    dozen small ops between the kernels were half of a small layer's step."""
    if BF._eager_layer_op(x, weight_mu, weight_rho, bias_mu, bias_rho, seed, ("cpu",)):
        return torch.ops.bayes_ext.linear_flipout_rows.default(x, weight_mu, weight_rho, bias_mu, bias_rho, seed, pi,
                                                               sigma1, sigma2, BF._block_rows(weight_mu))
    return _linear_flipout(x, weight_mu, weight_rho, bias_mu, bias_rho, seed, pi, sigma1, sigma2)
