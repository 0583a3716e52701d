"""BayesianLinear: BLiTZ's layer on the fused sample + matmul op."""
import torch
import torch.nn.functional as F

from .. import functional as BF
from .. import functional_estimators as BFE
from ._estimators import ESTIMATORS, EstimatorMixin  # noqa: F401  (ESTIMATORS: was defined here)
from ._low_precision import upcasts_low_precision
from ._posterior import GaussianPosteriorMixin, check_posterior_init, positive_int, posterior_parameter
from .base_bayesian_module import BayesianModule


class BayesianLinear(EstimatorMixin, GaussianPosteriorMixin, BayesianModule):
    """y = x W^T + b with W ~ N(weight_mu, softplus(weight_rho)^2) sampled on every forward.

    Arguments and defaults are BLiTZ's. Parameters are exactly ``weight_mu, weight_rho, bias_mu,
    bias_rho``. Each forward sets ``log_variational_posterior`` (log q) and ``log_prior`` (log p) of
    the sampled weights; with ``freeze=True`` the layer uses the means and those terms are the
    ones of the means. The training forward keeps only its input for backward: W is regenerated
    from the seed. Seeds come from torch's default generator, so ``torch.manual_seed`` fixes them.

    Keyword-only, beyond BLiTZ (see modules/_estimators.py): ``estimator="reparam"`` (default),
    ``"lrt"`` (local reparameterisation: samples the pre-activations, never W) or ``"flipout"``
    (per-example sign flips of one dW); both give lower-variance gradients. ``kl="mc"`` (default)
    or ``"closed_form"`` (single Gaussian prior only); "lrt" uses the exact KL whenever it can.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, prior_sigma_1: float = 0.1,
                 prior_sigma_2: float = 0.4, prior_pi: float = 1, posterior_mu_init: float = 0,
                 posterior_rho_init: float = -7.0, freeze: bool = False, prior_dist=None, *,
                 estimator: str = "reparam", kl: str = "mc", device=None, dtype=None):
        super().__init__()
        in_features, out_features = positive_int(in_features, "in_features"), positive_int(out_features, "out_features")
        check_posterior_init(posterior_mu_init, posterior_rho_init, dtype)
        factory = {"device": device, "dtype": dtype}
        self.in_features = in_features
        self.out_features = out_features
        self.bias = bool(bias)  # BLiTZ keeps a bool here; the parameters are bias_mu / bias_rho
        self.posterior_mu_init = posterior_mu_init
        self.posterior_rho_init = posterior_rho_init
        self.weight_mu = posterior_parameter((out_features, in_features), posterior_mu_init, factory)
        self.weight_rho = posterior_parameter((out_features, in_features), posterior_rho_init, factory)
        if self.bias:
            self.bias_mu = posterior_parameter((out_features,), posterior_mu_init, factory)
            self.bias_rho = posterior_parameter((out_features,), posterior_rho_init, factory)
        else:
            self.register_parameter("bias_mu", None)
            self.register_parameter("bias_rho", None)
        self._init_prior(prior_sigma_1, prior_sigma_2, prior_pi, prior_dist, freeze)
        self._init_estimator(estimator, kl)

    # Vectorised multi-sample ELBO (bayes_ext/utils/vectorised.py): during sample_elbo & co. this is
    # the SampleBatch that runs N weight samples of this layer in one op; None otherwise.
    _sample_batch = None

    def _supports_sample_batch(self) -> bool:
        """Whether the vectorised path reproduces this layer's forward: the fused reparam or Flipout op
        with the MC KL, or local reparameterisation with the closed-form KL fused into its op."""
        if type(self).forward is not BayesianLinear.forward or self.freeze or self.prior_dist is not None:
            return False
        if self.estimator == "lrt":
            return self._fused_kl_prior_sigma() is not None
        return self.estimator in ("reparam", "flipout") and getattr(self, "kl", "mc") == "mc"

    @upcasts_low_precision
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._sample_batch is not None:
            return self._sample_batch.linear(self, x)
        if self.freeze:
            return self.forward_frozen(x)
        seed = BF.draw_seed()
        params = self._weight_bias_params()
        if self.estimator == "lrt":
            prior_sigma = self._fused_kl_prior_sigma()
            if prior_sigma is not None:  # the exact KL comes out of the op's own pass over the weights
                y, kl = BFE.linear_lrt_with_kl(x, *params, seed=seed, prior_sigma=prior_sigma)
                self._set_kl_terms(kl, kl.new_zeros(()))
                return y
            y, mc_terms = BFE.linear_lrt(x, *params, seed=seed), None
        elif self.estimator == "flipout":
            y, log_q, log_p = BFE.linear_flipout(x, *params, seed=seed, prior=self.prior)
            mc_terms = (log_q, log_p) if self.prior_dist is None else None  # else: log p from prior_dist
        elif self.prior_dist is None:
            y, log_q, log_p = BF.bayesian_linear(x, *params, seed=seed, prior=self.prior)
            mc_terms = (log_q, log_p)
        else:
            BF.check_input(x, self.weight_mu, self.in_features)
            samples, log_q, log_p = self._sample_with_prior_dist(seed)
            y, mc_terms = F.linear(x, samples["weight"], samples.get("bias")), (log_q, log_p)
        self._set_estimator_kl(seed, mc_terms)
        return y

    def forward_frozen(self, x: torch.Tensor) -> torch.Tensor:
        """The mean-weight forward (w = mu); the KL terms then describe w = mu."""
        BF.check_input(x, self.weight_mu, self.in_features)
        self._set_kl_at_mean()
        return F.linear(x, self.weight_mu, self.bias_mu)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias}, "
                f"prior=(pi={self.prior_pi}, sigma_1={self.prior_sigma_1}, sigma_2={self.prior_sigma_2})"
                + (f", prior_dist={self.prior_dist}" if self.prior_dist is not None else "")
                + self._estimator_repr() + (", frozen" if self.freeze else ""))
