"""Local reparameterisation and Flipout for the Bayesian convolutions (plain and transposed, 1-3 d).

The convolution analogues of bayes_ext.functional_estimators, on ``aten.convolution`` and its
backward, with the same Philox streams (0 weight, 1 bias, 2 LRT noise, 3 / 4 Flipout signs):

- ``conv_lrt``: y = conv(x, mu, b_mu) + sqrt(conv(x^2, sigma^2) + sigma_b^2) * eps, eps of y's
  shape: each output gets the variance it has under W ~ N(mu, sigma^2) (neighbouring positions
  are not correlated as they would be with one shared W, the usual LRT trade-off for convolutions).
- ``conv_flipout``: y = conv(x, mu, b) + conv(x * S, dW) * R.

Backwards are hand-written and regenerate eps, dW and the signs from the seed.
"""
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from . import _backend, _checks
from . import functional as BF
from . import functional_conv as BFC
from ._fused_op import fused_custom_op
from ._saved_inputs import saved_tensors
from .functional_estimators import (LRT_NOISE_OFFSET, SIGN_IN_OFFSET, SIGN_OUT_OFFSET, half_noise_grad,
                                    signs, zero_if_none)

ScaleMixture = Tuple[float, float, float]


def _to(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    return None if t is None else t.to(dtype)


def _channel_sum(t: Tensor, dtype: torch.dtype) -> Tensor:
    """Sum over every dim but the channels (dim 1): a bias's gradient."""
    return t.sum([0] + list(range(2, t.dim())), dtype=dtype)


def _conv_grads(grad_out, x, weight, conv, need_x: bool, need_w: bool):
    """(grad_x, grad_weight) of aten.convolution(x, weight.to(x.dtype)) for grad_out (each None if
    not needed); grad_weight in weight's dtype (autocast: x and grad_out in a lower precision)."""
    if not (need_x or need_w):
        return None, None
    low = x.dtype
    # for the weight gradient alone the weight is only read for its shape, dtype and layout
    weight_low = weight.to(low) if need_x else weight.new_empty((), dtype=low).expand(weight.shape)
    grad_x, grad_w, _ = torch.ops.aten.convolution_backward(grad_out, x, weight_low, None, *conv,
                                                            [need_x, need_w, False])
    return grad_x, (None if grad_w is None else grad_w.to(weight.dtype))


# ---- local reparameterisation -------------------------------------------------------------------

@fused_custom_op("bayes_ext::conv_lrt")
def _conv_lrt(x: Tensor, weight_mu: Tensor, weight_rho: Tensor, bias_mu: Optional[Tensor],
              bias_rho: Optional[Tensor], seed: Tensor, stride: List[int], padding: List[int],
              dilation: List[int], transposed: bool, output_padding: List[int],
              groups: int, prior_sigma: float) -> Tuple[Tensor, Tensor, Tensor]:
    # Two convolutions around the fused weight pass (sigma^2, and the closed-form KL against
    # N(0, prior_sigma^2) when prior_sigma > 0); returns (y, std, kl), std kept for backward.
    # Under autocast x arrives in the low precision: the convolutions run in it, the noise, std
    # and KL in the parameters' dtype.
    ops, conv, dtype, low = (_backend.ops(), (stride, padding, dilation, transposed, output_padding, groups),
                             weight_mu.dtype, x.dtype)
    with BF.autocast_off(x.device.type):
        sigma2, kl = ops.lrt_weight_forward(weight_mu, weight_rho, prior_sigma)
        bias_var = None
        if bias_rho is not None:
            bias_var, bias_kl = ops.lrt_weight_forward(bias_mu, bias_rho, prior_sigma)
            bias_var, kl = bias_var.to(low), kl + bias_kl
        mean = torch.ops.aten.convolution(x, weight_mu.to(low), _to(bias_mu, low), *conv)
        var = torch.ops.aten.convolution(x * x, sigma2.to(low), bias_var, *conv).to(dtype)
        # std = sqrt(max(var, 0)) in place (a Winograd / FFT convolution of non-negative terms can
        # round slightly below 0). The op draws noise i for memory element i, so a channels_last
        # var goes through a contiguous copy; y and std keep var's format (as the fake kernel says).
        std = var.contiguous()
        y = ops.lrt_output_(std, mean.to(dtype), seed, LRT_NOISE_OFFSET)
        if std is not var:
            std, y = var.copy_(std), torch.empty_like(var).copy_(y)
    return y.to(low), std, kl


@_conv_lrt.register_fake
def _(x, weight_mu, weight_rho, bias_mu, bias_rho, seed, stride, padding, dilation, transposed, output_padding,
      groups, prior_sigma):
    y = torch.ops.aten.convolution(x, weight_mu.to(x.dtype), _to(bias_mu, x.dtype), stride, padding, dilation,
                                   transposed, output_padding, groups)
    return y, torch.empty_like(y, dtype=weight_mu.dtype), weight_mu.new_empty(())


def _conv_lrt_setup_context(ctx, inputs, output):
    (x, weight_mu, weight_rho, bias_mu, bias_rho, seed, stride, padding, dilation, transposed, output_padding,
     groups, prior_sigma) = inputs
    ctx.mark_non_differentiable(output[1])  # std is an internal output, saved for backward
    ctx.save_for_backward(x, weight_mu, weight_rho, bias_mu, bias_rho, seed, output[1])
    ctx.conv = (stride, padding, dilation, transposed, output_padding, groups)
    ctx.prior_sigma = prior_sigma
    ctx.ops = _backend.ops()


def _conv_lrt_backward(ctx, grad_y, grad_std, grad_kl):
    x, mu, rho, bias_mu, bias_rho, seed, std = saved_tensors(ctx)
    ops, prior_sigma, low = ctx.ops, ctx.prior_sigma, x.dtype
    need_x = ctx.needs_input_grad[0]
    need_w = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
    need_b = bias_mu is not None and (ctx.needs_input_grad[3] or ctx.needs_input_grad[4])
    grad_kl = zero_if_none(grad_kl, mu)
    with BF.autocast_off(x.device.type):
        g = torch.zeros_like(std) if grad_y is None else grad_y
        half_u = half_noise_grad(ops, g, std, seed)  # dL/dvar
        grad_x, grad_mu = _conv_grads(g.to(low), x, mu, ctx.conv, need_x, need_w)
        grad_rho = grad_bmu = grad_brho = sigma2 = None
        if need_w:
            # dL/dsigma2 of the data term, then one fused pass: the KL's gradients, dL/drho, and
            # sigma2 rebuilt for the input gradient
            grad_rho = _conv_grads(half_u.to(low), x * x, rho, ctx.conv, False, True)[1].contiguous()
            grad_mu = grad_mu.contiguous()
            sigma2 = ops.lrt_weight_backward_(grad_mu, grad_rho, grad_kl, mu, rho, prior_sigma)
        if need_x:  # d x^2 / dx = 2x
            if sigma2 is None:
                sigma2 = ops.lrt_weight_forward(mu, rho, 0.0)[0]
            grad_x2 = _conv_grads(half_u.to(low), x * x, sigma2, ctx.conv, True, False)[0]
            grad_x = grad_x.addcmul_(x, grad_x2, value=2)
        if need_b:
            grad_bmu = _channel_sum(g, bias_mu.dtype)
            grad_brho = _channel_sum(half_u, bias_rho.dtype)
            ops.lrt_weight_backward_(grad_bmu, grad_brho, grad_kl, bias_mu, bias_rho, prior_sigma)
    return (grad_x, grad_mu, grad_rho, grad_bmu, grad_brho) + (None,) * 8


_conv_lrt.register_autograd(_conv_lrt_backward, setup_context=_conv_lrt_setup_context)


# ---- Flipout ------------------------------------------------------------------------------------

@fused_custom_op("bayes_ext::conv_flipout")
def _conv_flipout(x: Tensor, weight_mu: Tensor, weight_rho: Tensor, bias_mu: Optional[Tensor],
                  bias_rho: Optional[Tensor], seed: Tensor, stride: List[int], padding: List[int],
                  dilation: List[int], transposed: bool, output_padding: List[int], groups: int,
                  prior_pi: float, prior_sigma1: float, prior_sigma2: float) -> Tuple[Tensor, Tensor, Tensor]:
    ops, prior, low = _backend.ops(), (prior_pi, prior_sigma1, prior_sigma2), x.dtype
    conv = (stride, padding, dilation, transposed, output_padding, groups)
    with BF.autocast_off(x.device.type):
        # dW = W - mu with W from the weight's own stream, so log q / log p are the MC KL terms of W
        dw, log_q, log_p = ops.sample_weight(weight_mu, weight_rho, seed, 0, *prior, 0, True)
        b = None
        if bias_mu is not None:
            b, log_q_b, log_p_b = ops.sample_weight(bias_mu, bias_rho, seed, 1, *prior)
            log_q, log_p = log_q + log_q_b, log_p + log_p_b
        x_signed = x * signs(x.shape, seed, SIGN_IN_OFFSET, weight_mu, low)
        perturbation = torch.ops.aten.convolution(x_signed, dw.to(low), None, *conv)
        perturbation *= signs(perturbation.shape, seed, SIGN_OUT_OFFSET, weight_mu, low)
        y = torch.ops.aten.convolution(x, weight_mu.to(low), _to(b, low), *conv).add_(perturbation)
    return y, log_q, log_p


@_conv_flipout.register_fake
def _(x, weight_mu, weight_rho, bias_mu, bias_rho, seed, stride, padding, dilation, transposed, output_padding,
      groups, prior_pi, prior_sigma1, prior_sigma2):
    y = torch.ops.aten.convolution(x, weight_mu.to(x.dtype), _to(bias_mu, x.dtype), stride, padding, dilation,
                                   transposed, output_padding, groups)
    return y, weight_mu.new_empty(()), weight_mu.new_empty(())


def _conv_flipout_setup_context(ctx, inputs, output):
    (x, weight_mu, weight_rho, bias_mu, bias_rho, seed, stride, padding, dilation, transposed, output_padding,
     groups, prior_pi, prior_sigma1, prior_sigma2) = inputs
    ctx.save_for_backward(x, weight_mu, weight_rho, bias_mu, bias_rho, seed)  # dW, S, R: from the seed
    ctx.conv = (stride, padding, dilation, transposed, output_padding, groups)
    ctx.prior = (prior_pi, prior_sigma1, prior_sigma2)
    ctx.ops = _backend.ops()


def _conv_flipout_backward(ctx, grad_y, grad_log_q, grad_log_p):
    x, mu, rho, bias_mu, bias_rho, seed = saved_tensors(ctx)
    ops, prior, conv, low = ctx.ops, ctx.prior, ctx.conv, x.dtype
    grad_log_q, grad_log_p = zero_if_none(grad_log_q, mu), zero_if_none(grad_log_p, mu)
    need_x = ctx.needs_input_grad[0]
    need_w = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
    need_b = bias_mu is not None and (ctx.needs_input_grad[3] or ctx.needs_input_grad[4])
    with BF.autocast_off(x.device.type):
        if grad_y is None:  # only the KL was used
            grad_y = torch.ops.aten.convolution(x, mu.to(low), None, *conv).zero_()
        g = grad_y.to(low)
        s_in = signs(x.shape, seed, SIGN_IN_OFFSET, mu, low)
        x_signed = x * s_in
        g_signed = g * signs(g.shape, seed, SIGN_OUT_OFFSET, mu, low)
        grad_x, grad_mu = _conv_grads(g, x, mu, conv, need_x, need_w)  # the mean's terms
        grad_rho = dw = None
        if need_w:
            grad_dw = _conv_grads(g_signed, x_signed, mu, conv, False, True)[1]
            # the noise dW's backward: grad_dw reaches rho; grad_mu_kl is the KL's alone (through W = mu + dW)
            grad_mu_kl, grad_rho, dw = ops.sample_weight_backward(grad_dw, grad_log_q, grad_log_p, mu, rho, seed, 0,
                                                                  *prior, need_x, 0, True)
            grad_mu = grad_mu.add_(grad_mu_kl)
        elif need_x:
            dw = ops.sample_weight(mu, rho, seed, 0, *prior, 0, True)[0]
        if need_x:
            grad_x = grad_x.addcmul_(_conv_grads(g_signed, x_signed, dw, conv, True, False)[0], s_in)
        grad_bias_mu = grad_bias_rho = None
        if need_b:
            grad_bias_mu, grad_bias_rho, _ = ops.sample_weight_backward(
                _channel_sum(g, bias_mu.dtype), grad_log_q, grad_log_p, bias_mu, bias_rho, seed, 1, *prior, False)
    return (grad_x, grad_mu, grad_rho, grad_bias_mu, grad_bias_rho) + (None,) * 10


_conv_flipout.register_autograd(_conv_flipout_backward, setup_context=_conv_flipout_setup_context)


# ---- entry points ---------------------------------------------------------------------------------

def _prepare(x: Tensor, weight_mu: Tensor, spec: BFC.ConvSpec) -> Tuple[Tensor, bool]:
    """(the op's batched, pre-padded input, whether x was batched)."""
    x = BFC.autocast_input(x, weight_mu)
    batched = BFC.check_conv_input(x, weight_mu, spec)
    return BFC._pre_pad(x if batched else x.unsqueeze(0), spec), batched


def _conv_args(spec: BFC.ConvSpec):
    return spec.stride, spec.padding, spec.dilation, spec.transposed, spec.output_padding, spec.groups


def conv_lrt_spec(x: Tensor, weight_mu: Tensor, weight_rho: Tensor, bias_mu: Optional[Tensor],
                  bias_rho: Optional[Tensor], seed: Tensor, spec: BFC.ConvSpec,
                  prior_sigma: float = 0.0) -> Tuple[Tensor, Tensor]:
    """conv_lrt with an already validated spec, parameters and seed (the layers' per-forward call);
    returns (y, kl) with kl the closed-form KL against N(0, prior_sigma^2) (0 when prior_sigma is 0)."""
    x, batched = _prepare(x, weight_mu, spec)
    y, _, kl = _conv_lrt(x, weight_mu, weight_rho, bias_mu, bias_rho, seed, *_conv_args(spec), float(prior_sigma))
    return (y if batched else y.squeeze(0)), kl


def conv_flipout_spec(x: Tensor, weight_mu: Tensor, weight_rho: Tensor, bias_mu: Optional[Tensor],
                      bias_rho: Optional[Tensor], seed: Tensor, spec: BFC.ConvSpec,
                      prior: ScaleMixture) -> Tuple[Tensor, Tensor, Tensor]:
    """conv_flipout with an already validated spec, parameters, seed and prior."""
    x, batched = _prepare(x, weight_mu, spec)
    y, log_q, log_p = _conv_flipout(x, weight_mu, weight_rho, bias_mu, bias_rho, seed, *_conv_args(spec), *prior)
    return (y if batched else y.squeeze(0)), log_q, log_p


def conv_lrt(x: Tensor, weight_mu: Tensor, weight_rho: Tensor, bias_mu: Optional[Tensor] = None,
             bias_rho: Optional[Tensor] = None, seed: Optional[Tensor] = None,
             stride: Union[int, Sequence[int]] = 1, padding: Union[int, Sequence[int], str] = 0,
             dilation: Union[int, Sequence[int]] = 1, groups: int = 1, transposed: bool = False,
             output_padding: Union[int, Sequence[int]] = 0) -> Tensor:
    """Local reparameterisation of ``bayesian_conv``'s convolution (same arguments, no prior: the
    KL is the caller's): y = conv(x, mu, b_mu) + sqrt(conv(x^2, sigma^2) + sigma_b^2) * eps."""
    spec, seed = BFC.validated_spec(weight_mu, weight_rho, bias_mu, bias_rho, seed, stride, padding, dilation, groups,
                                 transposed, output_padding)
    return conv_lrt_spec(x, weight_mu, weight_rho, bias_mu, bias_rho, seed, spec)[0]


def conv_flipout(x: Tensor, weight_mu: Tensor, weight_rho: Tensor, bias_mu: Optional[Tensor] = None,
                 bias_rho: Optional[Tensor] = None, seed: Optional[Tensor] = None,
                 stride: Union[int, Sequence[int]] = 1, padding: Union[int, Sequence[int], str] = 0,
                 dilation: Union[int, Sequence[int]] = 1, groups: int = 1, transposed: bool = False,
                 output_padding: Union[int, Sequence[int]] = 0,
                 prior: ScaleMixture = (1.0, 0.1, 0.002)) -> Tuple[Tensor, Tensor, Tensor]:
    """Flipout of ``bayesian_conv``'s convolution: y = conv(x, mu, b) + conv(x * S, dW) * R; returns
    (y, log_q, log_p) of W = mu + dW (stream (seed, 0)) and b (stream (seed, 1))."""
    spec, seed = BFC.validated_spec(weight_mu, weight_rho, bias_mu, bias_rho, seed, stride, padding, dilation, groups,
                                 transposed, output_padding)
    pi, sigma1, sigma2 = _checks.prior_values(prior)
    return conv_flipout_spec(x, weight_mu, weight_rho, bias_mu, bias_rho, seed, spec, (pi, sigma1, sigma2))
