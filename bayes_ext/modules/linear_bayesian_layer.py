"""BayesianLinear: BLiTZ's layer on the fused sample + matmul op."""
import torch
import torch.nn.functional as F

from .. import functional as BF
from ._posterior import GaussianPosteriorMixin, posterior_parameter
from .base_bayesian_module import BayesianModule


ESTIMATORS = ("reparam", "lrt")


class BayesianLinear(GaussianPosteriorMixin, BayesianModule):
    """y = x W^T + b with W ~ N(weight_mu, softplus(weight_rho)^2) sampled on every forward.

    Arguments and defaults are BLiTZ's. Parameters are exactly ``weight_mu, weight_rho, bias_mu,
    bias_rho``. Each forward sets ``log_variational_posterior`` (log q) and ``log_prior`` (log p) of
    the sampled weights; with ``freeze=True`` the layer uses the means and those terms are the
    ones of the means. The training forward keeps only its input for backward: W is regenerated
    from the seed. Seeds come from torch's default generator, so ``torch.manual_seed`` fixes them.

    ``estimator="lrt"`` (keyword-only) samples the pre-activations instead of W (local
    reparameterisation: per-example noise, lower gradient variance) with the exact KL; it needs a
    single Gaussian prior (prior_pi 1 or 0, or a Normal prior_dist).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, prior_sigma_1: float = 0.1,
                 prior_sigma_2: float = 0.4, prior_pi: float = 1, posterior_mu_init: float = 0,
                 posterior_rho_init: float = -7.0, freeze: bool = False, prior_dist=None, *,
                 estimator: str = "reparam", device=None, dtype=None):
        super().__init__()
        if int(in_features) <= 0 or int(out_features) <= 0:
            raise ValueError(f"in_features and out_features must be positive, got {in_features}, {out_features}")
        factory = {"device": device, "dtype": dtype}
        self.in_features = int(in_features)
        self.out_features = int(out_features)
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
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
        self.estimator = estimator
        if estimator == "lrt":
            self._closed_form_prior()  # fail at construction, not at the first forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.freeze:
            return self.forward_frozen(x)
        if self.estimator == "lrt":
            y = BF.linear_lrt(x, self.weight_mu, self.weight_rho, self.bias_mu, self.bias_rho)
            # closed-form KL: reported as log q = KL, log p = 0, so log q - log p is the KL as usual
            self._set_kl_terms(self._closed_form_kl(), self.weight_mu.new_zeros(()))
            return y
        if self.prior_dist is None:
            y, log_q, log_p = BF.bayesian_linear(x, self.weight_mu, self.weight_rho, self.bias_mu, self.bias_rho,
                                                 prior=self.prior)
        else:
            BF.check_input(x, self.weight_mu, self.in_features)
            samples, log_q, log_p = self._sample_with_prior_dist(BF.draw_seed())
            y = F.linear(x, samples["weight"], samples.get("bias"))
        self._set_kl_terms(log_q, log_p)
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
                + (", frozen" if self.freeze else ""))
