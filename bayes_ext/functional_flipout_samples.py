"""N samples of a Flipout linear layer in one op (the vectorised multi-sample ELBO).

``bayes_ext::linear_flipout_samples(x[N*B.., I], ..., seeds[N])`` gives, for every sample s (rows
[s*B, (s+1)*B) of dim 0), what ``functional_estimators.linear_flipout(x[s], seed=seeds[s])`` gives:
y_s = x_s mu^T + b_s + ((x_s * S_s) dW_s^T) * R_s with dW_s = W_s - mu, W_s and b_s from the streams
(seeds[s], 0) and (seeds[s], 1), S_s and R_s the signs of (seeds[s], 3) and (seeds[s], 4), and the
per-sample log q / log p of W_s and b_s. The mean GEMM runs once on all N*B rows, the N samples of W
come from one multi-seed call and meet x through one bmm.

Memory: as the reparameterised samples op, autograd saves x and the N seeds only; the backward
rebuilds W_s and the signs. Small weights only (the caller checks ``supports``).
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _backend
from . import functional as BF
from ._fused_op import fused_custom_op
from ._saved_inputs import saved_tensors
from .functional_estimators import SIGN_IN_OFFSET, SIGN_OUT_OFFSET, signs_of
from .functional_samples import STACKED_ELEMENTS, check_seeds


def supports(x: Tensor, weight_mu: Tensor, sample_nbr: int) -> bool:
    """Whether the op takes this call: x in the weights' dtype outside autocast (the Python op's
    mixed precision is not reproduced here) and N samples of W small enough to hold at once."""
    return (x.dtype == weight_mu.dtype and BF.autocast_dtype(x) is None
            and sample_nbr * weight_mu.numel() <= STACKED_ELEMENTS)


def _group_normals(shape_per_sample, seeds: Tensor, offset: int, like: Tensor) -> Tensor:
    """(N, *shape_per_sample) normals, group s stream (seeds[s], offset) from its element 0: what
    functional_estimators.signs draws its signs from for sample s alone. One call for the N groups:
    the LRT output-noise op, which draws per seed group, returns the normals themselves for mean 0
    and variance 1 (0 + 1 * eps, exact); N separate draws cost most of a small layer's step."""
    ones = like.new_ones((seeds.shape[0],) + tuple(shape_per_sample))
    return _backend.ops().lrt_output_(ones, torch.zeros_like(ones), seeds, offset)


def _group_signs(shape_per_sample, seeds: Tensor, offset: int, like: Tensor) -> Tensor:
    """+1 / -1: the signs of _group_normals (functional_estimators.signs per group)."""
    return signs_of(_group_normals(shape_per_sample, seeds, offset, like), like.dtype)


@fused_custom_op("bayes_ext::linear_flipout_samples")
def _linear_flipout_samples(x: Tensor, weight_mu: Tensor, weight_rho: Tensor, bias_mu: Optional[Tensor],
                            bias_rho: Optional[Tensor], seeds: Tensor, prior_pi: float, prior_sigma1: float,
                            prior_sigma2: float) -> Tuple[Tensor, Tensor, Tensor]:
    ops, prior = _backend.ops(), (prior_pi, prior_sigma1, prior_sigma2)
    n = seeds.shape[0]
    out_features, in_features = weight_mu.shape
    x3 = x.reshape(n, -1, in_features)
    w, log_q, log_p = ops.sample_weight_samples(weight_mu, weight_rho, seeds, 0, *prior)
    dw = w.sub_(weight_mu)  # the noise W - mu, rounded as the single-sample op's noise_only pass
    x_signed = x3 * _group_signs(x3.shape[1:], seeds, SIGN_IN_OFFSET, weight_mu)
    perturbation = torch.bmm(x_signed, dw.transpose(1, 2))
    perturbation *= _group_signs(perturbation.shape[1:], seeds, SIGN_OUT_OFFSET, weight_mu)
    y = torch.addmm(perturbation.view(-1, out_features), x.reshape(-1, in_features), weight_mu.t())
    y3 = y.view(n, -1, out_features)
    if bias_mu is not None:
        b, log_q_b, log_p_b = ops.sample_weight_samples(bias_mu, bias_rho, seeds, 1, *prior)
        y3 += b.unsqueeze(1)
        log_q, log_p = log_q + log_q_b, log_p + log_p_b
    return y.view(x.shape[:-1] + (out_features,)), log_q, log_p


@_linear_flipout_samples.register_fake
def _(x, weight_mu, weight_rho, bias_mu, bias_rho, seeds, prior_pi, prior_sigma1, prior_sigma2):
    n = seeds.shape[0]
    return x.new_empty(x.shape[:-1] + (weight_mu.shape[0],)), weight_mu.new_empty((n,)), weight_mu.new_empty((n,))


def _backward(ctx, grad_y, grad_log_q, grad_log_p):
    x, weight_mu, weight_rho, bias_mu, bias_rho, seeds = saved_tensors(ctx)
    ops, prior = ctx.ops, ctx.prior
    n = seeds.shape[0]
    out_features, in_features = weight_mu.shape
    zeros = weight_mu.new_zeros((n,))
    grad_log_q = zeros if grad_log_q is None else grad_log_q
    grad_log_p = zeros if grad_log_p is None else grad_log_p
    need_x = ctx.needs_input_grad[0]
    x2 = x.reshape(-1, in_features)
    g2 = x2.new_zeros(x2.shape[0], out_features) if grad_y is None else grad_y.reshape(-1, out_features)
    x3, g3 = x2.reshape(n, -1, in_features), g2.reshape(n, -1, out_features)
    s_in = _group_signs(x3.shape[1:], seeds, SIGN_IN_OFFSET, weight_mu)
    g_signed = g3 * _group_signs(g3.shape[1:], seeds, SIGN_OUT_OFFSET, weight_mu)
    grad_dw = torch.bmm(g_signed.transpose(1, 2), x3 * s_in)
    # through W = mu + dW: the op's grad_mu holds sum_s grad_dW_s besides the KL's terms, but dW does
    # not depend on mu (Flipout's noise_only); mu's own term is g^T x over all rows
    grad_mu, grad_rho, w = ops.sample_weight_samples_backward(grad_dw, grad_log_q, grad_log_p, weight_mu,
                                                              weight_rho, seeds, 0, *prior, need_x)
    grad_mu = grad_mu.sub_(grad_dw.sum(0)).addmm_(g2.t(), x2)
    grad_x = None
    if need_x:
        grad_x = torch.addcmul(g2.mm(weight_mu).view(g3.shape[0], -1, in_features),
                               torch.bmm(g_signed, w.sub_(weight_mu)), s_in).view(x.shape)
    grad_bias_mu = grad_bias_rho = None
    if bias_mu is not None:
        grad_bias_mu, grad_bias_rho, _ = ops.sample_weight_samples_backward(
            g3.sum(1), grad_log_q, grad_log_p, bias_mu, bias_rho, seeds, 1, *prior, False)
    return grad_x, grad_mu, grad_rho, grad_bias_mu, grad_bias_rho, None, None, None, None


# x and the N seeds are the only new memory: W_s and the signs are rebuilt from seeds[s]
_linear_flipout_samples.register_autograd(_backward, setup_context=BF.linear_op_setup_context)


def linear_flipout_samples(x: Tensor, weight_mu: Tensor, weight_rho: Tensor, bias_mu: Optional[Tensor],
                           bias_rho: Optional[Tensor], seeds: Tensor, prior) -> Tuple[Tensor, Tensor, Tensor]:
    """(y (N*B, ..., O), log_q (N,), log_p (N,)) of N Flipout samples, sample s on rows [s*B, (s+1)*B)
    of dim 0 with seed seeds[s] (see the module docstring); x checked as a layer input."""
    BF.check_input(x, weight_mu, weight_mu.shape[1])
    check_seeds(seeds, weight_mu)
    n = seeds.shape[0]
    if x.dim() < 2 or x.shape[0] % n != 0:
        raise ValueError(f"x must hold the {n} samples (one per seed) of a batch in dim 0, got shape {tuple(x.shape)}")
    return _linear_flipout_samples(x, weight_mu, weight_rho, bias_mu, bias_rho, seeds, *prior)
