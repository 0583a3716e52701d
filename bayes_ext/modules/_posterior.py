"""What every Bayesian layer with a factorised Gaussian posterior shares: its (mu, rho) parameters,
its scale-mixture prior, the freeze switch and the KL terms of its last forward."""
import math
import numbers

import torch
from torch import nn

from .. import functional as BF
from .weight_sampler import PriorWeightDistribution


def positive_int(value, name: str) -> int:
    """A layer size: an int (bool is not one) above 0."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be positive, got {value}")
    return int(value)


def _real(value, name: str) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.dtype != torch.bool:
        return float(value)
    if not isinstance(value, numbers.Real) or isinstance(value, bool):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    return float(value)


def check_posterior_init(posterior_mu_init, posterior_rho_init, dtype) -> None:
    """The constructor arguments every layer's posterior parameters are made from: a NaN or infinite
    initial mean made every output NaN, an integer dtype failed inside torch's normal_."""
    for name, value in (("posterior_mu_init", posterior_mu_init), ("posterior_rho_init", posterior_rho_init)):
        if not math.isfinite(_real(value, name)):
            raise ValueError(f"{name} must be finite, got {value}")
    if dtype is not None and dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        raise TypeError(f"dtype must be a floating dtype (float32, float64, float16 or bfloat16), got {dtype}")


def posterior_parameter(shape, mean: float, factory_kwargs) -> nn.Parameter:
    """BLiTZ's initialisation: N(mean, 0.1^2)."""
    return nn.Parameter(torch.empty(shape, **factory_kwargs).normal_(mean, 0.1))


def inverse_softplus(sigma: torch.Tensor) -> torch.Tensor:
    """rho with softplus(rho) = sigma, stable for tiny and large sigma."""
    return sigma + torch.log(-torch.expm1(-sigma))


class GaussianPosteriorMixin:
    """Prior configuration, freeze state and KL bookkeeping for a layer that owns
    ``<name>_mu`` / ``<name>_rho`` parameter pairs listed in ``self._posterior_names``."""

    _posterior_names = ("weight", "bias")
    # the parameter whose dtype is the layer's precision (_low_precision.py): _posterior_names[0] + "_mu",
    # spelled out because it is read on every call
    _dtype_probe = "weight_mu"

    def _init_prior(self, prior_sigma_1, prior_sigma_2, prior_pi, prior_dist, freeze) -> None:
        for name, value in (("prior_sigma_1", prior_sigma_1), ("prior_sigma_2", prior_sigma_2), ("prior_pi", prior_pi)):
            _real(value, name)
        if not (0 < prior_sigma_1 < math.inf and 0 < prior_sigma_2 < math.inf):
            raise ValueError(f"prior_sigma_1 and prior_sigma_2 must be positive and finite, got {prior_sigma_1}, "
                             f"{prior_sigma_2}")
        if not 0 <= prior_pi <= 1:
            raise ValueError(f"prior_pi must be in [0, 1], got {prior_pi}")
        if prior_dist is not None and not hasattr(prior_dist, "log_prob"):
            raise TypeError(f"prior_dist must be a torch.distributions object with log_prob, got {type(prior_dist).__name__}")
        self.prior_sigma_1 = prior_sigma_1
        self.prior_sigma_2 = prior_sigma_2
        self.prior_pi = prior_pi
        self.prior_dist = prior_dist
        self.freeze = freeze
        self.weight_prior_dist = PriorWeightDistribution(prior_pi, prior_sigma_1, prior_sigma_2, dist=prior_dist)
        self.bias_prior_dist = PriorWeightDistribution(prior_pi, prior_sigma_1, prior_sigma_2, dist=prior_dist)
        self._kl_terms = (0, 0)  # BLiTZ reports 0 before the first forward
        self._kl_at_mean = False
        # (an instance attribute from the start: torch 2.8's export refuses attributes a forward creates)
        self._kl_last_sample = False

    @property
    def prior(self):
        """(pi, sigma1, sigma2) of the scale-mixture prior, as the fused ops take it."""
        return (float(self.prior_pi), float(self.prior_sigma_1), float(self.prior_sigma_2))

    def _weight_bias_params(self):
        """(weight_mu, weight_rho, bias_mu, bias_rho) as the forward uses them. Read from _parameters
        where they are plain registered parameters: four nn.Module.__getattr__ calls cost ~2 us, a
        share of a small layer's forward. Anything else (no bias, a torch.nn.utils.parametrize'd or
        functional_call-swapped tensor) takes the attribute."""
        params = self._parameters
        weight_mu, weight_rho = params.get("weight_mu"), params.get("weight_rho")
        bias_mu, bias_rho = params.get("bias_mu"), params.get("bias_rho")
        if weight_mu is None or weight_rho is None or bias_mu is None or bias_rho is None:
            return self.weight_mu, self.weight_rho, self.bias_mu, self.bias_rho
        return weight_mu, weight_rho, bias_mu, bias_rho

    def reset_parameters(self) -> None:
        """Draw the posterior parameters afresh, as the constructor did (BLiTZ's N(posterior_mu_init,
        0.1^2) means and N(posterior_rho_init, 0.1^2) rhos, in the same order): what torch.nn layers
        offer for a model built on the meta device and materialised with ``to_empty``."""
        with torch.no_grad():
            for _, mu, rho in self._posterior_pairs():
                mu.normal_(self.posterior_mu_init, 0.1)
                rho.normal_(self.posterior_rho_init, 0.1)

    def _posterior_pairs(self):
        for name in self._posterior_names:
            mu = getattr(self, f"{name}_mu", None)
            if isinstance(mu, torch.Tensor):
                yield name, mu, getattr(self, f"{name}_rho")

    # KL terms: set by every forward. A frozen forward uses w = mu, so its terms are those of mu,
    # computed when read rather than on every inference forward.
    # A vectorised forward (utils/vectorised.py) leaves one term per sample, shape (N,); the layer then
    # reports the last sample's, as after the loop's last forward, indexed when read rather than
    # with two more tensor ops per layer on every vectorised step.
    _kl_last_sample = False

    def _set_kl_terms(self, log_q, log_p) -> None:
        if torch.compiler.is_compiling():  # dynamo before torch 2.5 cannot trace object.__setattr__
            self._kl_terms, self._kl_at_mean, self._kl_last_sample = (log_q, log_p), False, False
            return
        # plain attributes: object.__setattr__ skips nn.Module's parameter/buffer bookkeeping (~5 us)
        object.__setattr__(self, "_kl_terms", (log_q, log_p))
        object.__setattr__(self, "_kl_at_mean", False)
        object.__setattr__(self, "_kl_last_sample", False)

    def _report_last_sample_kl(self) -> None:
        """The per-sample terms of a vectorised forward stand for the last sample from now on."""
        if torch.compiler.is_compiling():  # (as in _set_kl_terms)
            self._kl_last_sample = True
        else:
            object.__setattr__(self, "_kl_last_sample", True)

    def _kl_term(self, i: int):
        if self._kl_at_mean:
            return self._mean_kl_terms()[i]
        term = self._kl_terms[i]
        return term[-1] if self._kl_last_sample else term

    def _set_kl_at_mean(self) -> None:
        self._kl_at_mean = True

    def _mean_kl_terms(self):
        log_q = log_p = 0
        for name, mu, rho in self._posterior_pairs():
            q, p = BF.mean_weight_kl_terms(mu, rho, self.prior)
            if self.prior_dist is not None:
                p = self.prior_dist.log_prob(mu).sum()
            log_q, log_p = log_q + q, log_p + p
        return log_q, log_p

    @property
    def log_variational_posterior(self):
        return self._kl_term(0)

    @log_variational_posterior.setter
    def log_variational_posterior(self, value):
        self._set_kl_terms(value, self._kl_term(1))

    @property
    def log_prior(self):
        return self._kl_term(1)

    @log_prior.setter
    def log_prior(self, value):
        self._set_kl_terms(self._kl_term(0), value)

    def __getstate__(self):
        # The KL terms of the last forward are non-leaf tensors, which deepcopy and pickle refuse
        # (BLiTZ layers cannot be deep-copied after a forward); a copy starts as before a forward.
        state = self.__dict__.copy()
        state["_kl_terms"] = (0, 0)
        state["_kl_at_mean"] = False
        state["_kl_last_sample"] = False
        return state

    def kl_divergence(self):
        """log q(w) - log p(w) of the last forward (a one-sample Monte Carlo KL estimate)."""
        return self.log_variational_posterior - self.log_prior

    def moped_(self, delta: float = 0.1) -> None:
        """MOPED: sigma = delta * |mu| for every posterior of this layer (empirical-Bayes init)."""
        with torch.no_grad():
            for _, mu, rho in self._posterior_pairs():
                sigma = (delta * mu.to(torch.float64).abs()).clamp_min(1e-10)  # in bf16 / fp16 1e-10 is 0
                rho.copy_(inverse_softplus(sigma).to(rho.dtype))

    def _closed_form_prior(self):
        """(prior_sigma, prior_dist) for the closed-form KL, or a ValueError."""
        if self.prior_dist is not None:
            if not isinstance(self.prior_dist, torch.distributions.Normal):
                raise ValueError("a closed-form KL (kl='closed_form', estimator='lrt') needs a "
                                 f"torch.distributions.Normal prior_dist, got {type(self.prior_dist).__name__}")
            return None, self.prior_dist
        if self.prior_pi >= 1:
            return float(self.prior_sigma_1), None
        if self.prior_pi <= 0:
            return float(self.prior_sigma_2), None
        raise ValueError("a closed-form KL (kl='closed_form', estimator='lrt') needs a single Gaussian prior "
                         f"(prior_pi 1 or 0, or a Normal prior_dist); got a scale mixture with prior_pi={self.prior_pi}")

    def _closed_form_kl(self):
        """sum over the posteriors of KL(q || p) for the single Gaussian prior (exact)."""
        from ..functional_embedding import closed_form_kl
        prior_sigma, prior_dist = self._closed_form_prior()
        return sum(closed_form_kl(mu, rho, prior_sigma, prior_dist) for _, mu, rho in self._posterior_pairs())

    def _sample_with_prior_dist(self, seed):
        """Sample every posterior through the op, with log p from the user's prior_dist (not fused)."""
        samples, log_q, log_p = {}, 0, 0
        for offset, (name, mu, rho) in enumerate(self._posterior_pairs()):
            w, q, _ = BF.sample_weight(mu, rho, seed, offset, self.prior)
            dist = self.weight_prior_dist if name.startswith("weight") else self.bias_prior_dist
            samples[name] = w
            log_q, log_p = log_q + q, log_p + dist.log_prior(w)
        return samples, log_q, log_p

