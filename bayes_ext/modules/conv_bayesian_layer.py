"""Bayesian convolutions: BLiTZ's BayesianConv1d/2d/3d and BayesianConvTranspose1d/2d/3d, on the
fused sample + convolution op (bayes_ext.functional_conv)."""

import torch

from .. import functional as BF
from .. import functional_conv as BFC
from .. import functional_conv_estimators as BFCE
from ._estimators import EstimatorMixin
from ._low_precision import upcasts_low_precision
from ._posterior import GaussianPosteriorMixin, check_posterior_init, positive_int, posterior_parameter
from .base_bayesian_module import BayesianModule


class _BayesianConvNd(EstimatorMixin, GaussianPosteriorMixin, BayesianModule):
    """What the six convolution layers share; subclasses fix the number of spatial dimensions,
    transposed-ness and the constructor's argument order.

    W ~ N(weight_mu, softplus(weight_rho)^2) and b ~ N(bias_mu, softplus(bias_rho)^2) are sampled
    on every forward (the weight from Philox stream (seed, 0), the bias from (seed, 1), the seed
    from torch's default generator) and convolved in one fused op whose backward rebuilds W from
    the seed, so the training forward keeps only its input for backward, like ``nn.Conv*d``. Each
    forward sets ``log_variational_posterior`` and ``log_prior``; with ``freeze=True`` the layer
    uses the means and those terms are the ones of the means.

    Keyword-only, beyond BLiTZ (see modules/_estimators.py): ``estimator="reparam"`` (default),
    ``"lrt"`` or ``"flipout"`` (per-example noise, lower-variance gradients), and ``kl="mc"``
    (default) or ``"closed_form"`` (single Gaussian prior only).
    """

    _spatial_dims = 2
    _transposed = False

    def __init__(self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                 output_padding, padding_mode, prior_sigma_1, prior_sigma_2, prior_pi, posterior_mu_init,
                 posterior_rho_init, freeze, prior_dist, device, dtype, estimator="reparam", kl="mc"):
        super().__init__()
        n = self._spatial_dims
        in_channels = positive_int(in_channels, "in_channels")
        out_channels = positive_int(out_channels, "out_channels")
        groups = positive_int(groups, "groups")
        if in_channels % groups:
            raise ValueError(f"in_channels ({in_channels}) must be divisible by groups ({groups})")
        if out_channels % groups:
            raise ValueError(f"out_channels ({out_channels}) must be divisible by groups ({groups})")
        kernel_size = BFC._ntuple(kernel_size, n, "kernel_size", 1)
        stride = BFC._ntuple(stride, n, "stride", 1)
        dilation = BFC._ntuple(dilation, n, "dilation", 1)
        if not isinstance(padding, str):
            padding = BFC._ntuple(padding, n, "padding", 0)
        output_padding = BFC._ntuple(output_padding, n, "output_padding", 0)
        # validates the combination (same-padding and stride, output_padding, padding_mode)
        BFC.conv_spec(n, kernel_size, stride, padding, dilation, groups, self._transposed, output_padding,
                      padding_mode)

        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.padding = padding
        self.dilation = dilation
        self.groups = groups
        self.transposed = self._transposed
        self.output_padding = output_padding
        self.padding_mode = padding_mode
        self.bias = bool(bias)  # BLiTZ keeps a bool here; the parameters are bias_mu / bias_rho
        self.posterior_mu_init = posterior_mu_init
        self.posterior_rho_init = posterior_rho_init

        check_posterior_init(posterior_mu_init, posterior_rho_init, dtype)
        factory = {"device": device, "dtype": dtype}
        if self._transposed:
            shape = (in_channels, out_channels // groups) + kernel_size
        else:
            shape = (out_channels, in_channels // groups) + kernel_size
        self.weight_mu = posterior_parameter(shape, posterior_mu_init, factory)
        self.weight_rho = posterior_parameter(shape, posterior_rho_init, factory)
        if self.bias:
            self.bias_mu = posterior_parameter((out_channels,), posterior_mu_init, factory)
            self.bias_rho = posterior_parameter((out_channels,), posterior_rho_init, factory)
        else:
            self.register_parameter("bias_mu", None)
            self.register_parameter("bias_rho", None)
        self._init_prior(prior_sigma_1, prior_sigma_2, prior_pi, prior_dist, freeze)
        self._init_estimator(estimator, kl)

    def _spec(self, output_padding=None) -> BFC.ConvSpec:
        return BFC.cached_conv_spec(self._spatial_dims, self.kernel_size, self.stride, self.padding, self.dilation,
                                    self.groups, self._transposed,
                                    self.output_padding if output_padding is None else output_padding,
                                    self.padding_mode)

    def _forward(self, x: torch.Tensor, spec: BFC.ConvSpec) -> torch.Tensor:
        if self.freeze:
            return self._forward_frozen(x, spec)
        seed = BF.draw_seed()
        params = (self.weight_mu, self.weight_rho, self.bias_mu, self.bias_rho)
        if self.estimator == "lrt":
            prior_sigma = self._fused_kl_prior_sigma()
            y, kl = BFCE.conv_lrt_spec(x, *params, seed, spec, prior_sigma or 0.0)
            if prior_sigma is not None:  # the exact KL came out of the op's own pass over the weights
                self._set_kl_terms(kl, kl.new_zeros(()))
                return y
            mc_terms = None
        elif self.estimator == "flipout":
            y, log_q, log_p = BFCE.conv_flipout_spec(x, *params, seed, spec, self.prior)
            mc_terms = (log_q, log_p) if self.prior_dist is None else None  # else: log p from prior_dist
        elif self.prior_dist is None:
            y, log_q, log_p = BFC.bayesian_conv_spec(x, *params, seed, spec, self.prior)
            mc_terms = (log_q, log_p)
        else:
            x = BFC.autocast_input(x, self.weight_mu)
            BFC.check_conv_input(x, self.weight_mu, spec)
            samples, log_q, log_p = self._sample_with_prior_dist(seed)
            y, mc_terms = BFC.conv_with_weight(x, samples["weight"], samples.get("bias"), spec), (log_q, log_p)
        self._set_estimator_kl(seed, mc_terms)
        return y

    def _forward_frozen(self, x: torch.Tensor, spec: BFC.ConvSpec) -> torch.Tensor:
        y = BFC.conv_with_weight(x, self.weight_mu, self.bias_mu, spec)
        self._set_kl_at_mean()
        return y

    def extra_repr(self) -> str:
        s = (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}")
        n = self._spatial_dims
        if self.padding != (0,) * n:
            s += f", padding={self.padding!r}" if isinstance(self.padding, str) else f", padding={self.padding}"
        if self.dilation != (1,) * n:
            s += f", dilation={self.dilation}"
        if self.output_padding != (0,) * n:
            s += f", output_padding={self.output_padding}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if not self.bias:
            s += ", bias=False"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode}"
        s += f", prior=(pi={self.prior_pi}, sigma_1={self.prior_sigma_1}, sigma_2={self.prior_sigma_2})"
        if self.prior_dist is not None:
            s += f", prior_dist={self.prior_dist}"
        return s + self._estimator_repr() + (", frozen" if self.freeze else "")


class _BayesianConvPlainNd(_BayesianConvNd):
    def __init__(self, in_channels, out_channels, kernel_size, groups, stride, padding, dilation, bias,
                 prior_sigma_1, prior_sigma_2, prior_pi, posterior_mu_init, posterior_rho_init, freeze, prior_dist,
                 padding_mode, device, dtype, estimator, kl):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, 0,
                         padding_mode, prior_sigma_1, prior_sigma_2, prior_pi, posterior_mu_init, posterior_rho_init,
                         freeze, prior_dist, device, dtype, estimator, kl)

    @upcasts_low_precision
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward(x, self._spec())

    def forward_frozen(self, x: torch.Tensor) -> torch.Tensor:
        """The mean-weight forward (w = mu); the KL terms then describe w = mu."""
        return self._forward_frozen(x, self._spec())


class _BayesianConvTransposeNd(_BayesianConvNd):
    _transposed = True

    def __init__(self, in_channels, out_channels, kernel_size, stride, padding, output_padding, groups, bias,
                 dilation, prior_sigma_1, prior_sigma_2, prior_pi, posterior_mu_init, posterior_rho_init, freeze,
                 prior_dist, padding_mode, device, dtype, estimator, kl):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                         output_padding, padding_mode, prior_sigma_1, prior_sigma_2, prior_pi, posterior_mu_init,
                         posterior_rho_init, freeze, prior_dist, device, dtype, estimator, kl)

    def _output_size_spec(self, x, output_size) -> BFC.ConvSpec:
        """The spec, with output_padding chosen to reach `output_size` (as nn.ConvTranspose*d does)."""
        spec = self._spec()
        if output_size is None:
            return spec
        batched = BFC.check_conv_input(x, self.weight_mu, spec)
        n = self._spatial_dims
        output_size = [int(s) for s in output_size]
        if len(output_size) == n + (2 if batched else 1):
            output_size = output_size[-n:]
        if len(output_size) != n:
            raise ValueError(f"output_size must have {n} or {n + (2 if batched else 1)} elements, "
                             f"got {len(output_size)}")
        padding = []
        for d in range(n):
            size = x.shape[x.dim() - n + d]
            smallest = ((size - 1) * self.stride[d] - 2 * self.padding[d]
                        + self.dilation[d] * (self.kernel_size[d] - 1) + 1)
            largest = smallest + self.stride[d] - 1
            if not smallest <= output_size[d] <= largest:
                raise ValueError(f"output_size {output_size} is not reachable from an input of spatial size "
                                 f"{tuple(x.shape[-n:])}: dimension {d} must be in [{smallest}, {largest}]")
            padding.append(output_size[d] - smallest)
        return self._spec(tuple(padding))

    @upcasts_low_precision
    def forward(self, x: torch.Tensor, output_size=None) -> torch.Tensor:
        x = BFC.autocast_input(x, self.weight_mu)
        return self._forward(x, self._output_size_spec(x, output_size))

    def forward_frozen(self, x: torch.Tensor, output_size=None) -> torch.Tensor:
        """The mean-weight forward (w = mu); the KL terms then describe w = mu."""
        x = BFC.autocast_input(x, self.weight_mu)
        return self._forward_frozen(x, self._output_size_spec(x, output_size))


# ---- the public layers: BLiTZ's argument order (groups before stride) -----------------------------------

class BayesianConv1d(_BayesianConvPlainNd):
    """Bayesian ``nn.Conv1d`` with BLiTZ's arguments; weight (out, in / groups, k)."""
    _spatial_dims = 1

    def __init__(self, in_channels, out_channels, kernel_size, groups=1, stride=1, padding=0, dilation=1, bias=True,
                 prior_sigma_1=0.1, prior_sigma_2=0.002, prior_pi=1, posterior_mu_init=0, posterior_rho_init=-7.0,
                 freeze=False, prior_dist=None, *, padding_mode="zeros", device=None, dtype=None,
                 estimator="reparam", kl="mc"):
        super().__init__(in_channels, out_channels, kernel_size, groups, stride, padding, dilation, bias,
                         prior_sigma_1, prior_sigma_2, prior_pi, posterior_mu_init, posterior_rho_init, freeze,
                         prior_dist, padding_mode, device, dtype, estimator, kl)


class BayesianConv2d(_BayesianConvPlainNd):
    """Bayesian ``nn.Conv2d`` with BLiTZ's arguments; weight (out, in / groups, kh, kw)."""
    _spatial_dims = 2

    def __init__(self, in_channels, out_channels, kernel_size, groups=1, stride=1, padding=0, dilation=1, bias=True,
                 prior_sigma_1=0.1, prior_sigma_2=0.002, prior_pi=1, posterior_mu_init=0, posterior_rho_init=-6.0,
                 freeze=False, prior_dist=None, *, padding_mode="zeros", device=None, dtype=None,
                 estimator="reparam", kl="mc"):
        super().__init__(in_channels, out_channels, kernel_size, groups, stride, padding, dilation, bias,
                         prior_sigma_1, prior_sigma_2, prior_pi, posterior_mu_init, posterior_rho_init, freeze,
                         prior_dist, padding_mode, device, dtype, estimator, kl)


class BayesianConv3d(_BayesianConvPlainNd):
    """Bayesian ``nn.Conv3d`` with BLiTZ's arguments; weight (out, in / groups, kd, kh, kw)."""
    _spatial_dims = 3

    def __init__(self, in_channels, out_channels, kernel_size, groups=1, stride=1, padding=0, dilation=1, bias=True,
                 prior_sigma_1=0.1, prior_sigma_2=0.002, prior_pi=1, posterior_mu_init=0, posterior_rho_init=-6.0,
                 freeze=False, prior_dist=None, *, padding_mode="zeros", device=None, dtype=None,
                 estimator="reparam", kl="mc"):
        super().__init__(in_channels, out_channels, kernel_size, groups, stride, padding, dilation, bias,
                         prior_sigma_1, prior_sigma_2, prior_pi, posterior_mu_init, posterior_rho_init, freeze,
                         prior_dist, padding_mode, device, dtype, estimator, kl)


# nn.ConvTranspose*d's argument order, then the prior / posterior keywords with the Conv2d defaults.

class BayesianConvTranspose1d(_BayesianConvTransposeNd):
    """Bayesian ``nn.ConvTranspose1d``; weight (in, out / groups, k). ``forward(x, output_size=None)``."""
    _spatial_dims = 1

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, output_padding=0, groups=1,
                 bias=True, dilation=1, prior_sigma_1=0.1, prior_sigma_2=0.002, prior_pi=1, posterior_mu_init=0,
                 posterior_rho_init=-6.0, freeze=False, prior_dist=None, *, padding_mode="zeros", device=None,
                 dtype=None, estimator="reparam", kl="mc"):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, output_padding, groups, bias,
                         dilation, prior_sigma_1, prior_sigma_2, prior_pi, posterior_mu_init, posterior_rho_init,
                         freeze, prior_dist, padding_mode, device, dtype, estimator, kl)


class BayesianConvTranspose2d(_BayesianConvTransposeNd):
    """Bayesian ``nn.ConvTranspose2d``; weight (in, out / groups, kh, kw). ``forward(x, output_size=None)``."""
    _spatial_dims = 2

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, output_padding=0, groups=1,
                 bias=True, dilation=1, prior_sigma_1=0.1, prior_sigma_2=0.002, prior_pi=1, posterior_mu_init=0,
                 posterior_rho_init=-6.0, freeze=False, prior_dist=None, *, padding_mode="zeros", device=None,
                 dtype=None, estimator="reparam", kl="mc"):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, output_padding, groups, bias,
                         dilation, prior_sigma_1, prior_sigma_2, prior_pi, posterior_mu_init, posterior_rho_init,
                         freeze, prior_dist, padding_mode, device, dtype, estimator, kl)


class BayesianConvTranspose3d(_BayesianConvTransposeNd):
    """Bayesian ``nn.ConvTranspose3d``; weight (in, out / groups, kd, kh, kw). ``forward(x, output_size=None)``."""
    _spatial_dims = 3

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, output_padding=0, groups=1,
                 bias=True, dilation=1, prior_sigma_1=0.1, prior_sigma_2=0.002, prior_pi=1, posterior_mu_init=0,
                 posterior_rho_init=-6.0, freeze=False, prior_dist=None, *, padding_mode="zeros", device=None,
                 dtype=None, estimator="reparam", kl="mc"):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, output_padding, groups, bias,
                         dilation, prior_sigma_1, prior_sigma_2, prior_pi, posterior_mu_init, posterior_rho_init,
                         freeze, prior_dist, padding_mode, device, dtype, estimator, kl)
