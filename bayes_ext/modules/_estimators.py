"""The ``estimator=`` and ``kl=`` switches of the Bayesian linear and conv layers.

- ``estimator``: how a training forward turns the posterior into outputs. "reparam" (BLiTZ: one
  sampled W per forward), "lrt" (local reparameterisation: Gaussian pre-activations, no W) or
  "flipout" (one dW per forward, decorrelated per example by random signs). The last two give each
  example its own noise, so gradients vary less at the same cost order.
- ``kl``: "mc" (BLiTZ's one-sample log q(w) - log p(w)) or "closed_form" (the exact KL for a single
  Gaussian prior, reported as log_variational_posterior = KL, log_prior = 0). "lrt" samples no
  weight, so with kl="mc" it uses the exact KL whenever the prior allows (an estimate would only
  add variance) and otherwise the MC terms of a W drawn on the weight's own stream (seed, 0).
"""
import torch

from .. import functional as BF

ESTIMATORS = ("reparam", "lrt", "flipout")
KL_MODES = ("mc", "closed_form")


def check_estimator_args(estimator, kl) -> None:
    if not isinstance(estimator, str) or estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if not isinstance(kl, str) or kl not in KL_MODES:
        raise ValueError(f"kl must be one of {KL_MODES}, got {kl!r}")


class EstimatorMixin:
    """For a GaussianPosteriorMixin layer: stores the switches and sets the KL terms of a forward."""

    def _init_estimator(self, estimator: str, kl: str) -> None:
        check_estimator_args(estimator, kl)
        self.estimator = estimator
        self.kl = kl
        if kl == "closed_form":
            self._closed_form_prior()  # a scale mixture fails at construction, not at the first forward

    def _prior_is_gaussian(self) -> bool:
        if self.prior_dist is not None:
            return isinstance(self.prior_dist, torch.distributions.Normal)
        return self.prior_pi >= 1 or self.prior_pi <= 0

    def _uses_closed_form(self) -> bool:
        return self.kl == "closed_form" or (self.estimator == "lrt" and self._prior_is_gaussian())

    def _fused_kl_prior_sigma(self):
        """The prior's sigma when the exact KL against N(0, sigma^2) can be fused into the
        estimator's op (closed form, no prior_dist), else None."""
        if self.prior_dist is None and self._uses_closed_form():
            return self._closed_form_prior()[0]
        return None

    def _set_estimator_kl(self, seed, mc_terms=None) -> None:
        """KL terms of a training forward with seed `seed`. `mc_terms`: the forward's own (log q,
        log p) of the weights it sampled on streams (seed, 0) / (seed, 1), when it has them for
        this layer's prior; otherwise they are computed here on those streams."""
        if self._uses_closed_form():
            kl = self._closed_form_kl()
            self._set_kl_terms(kl, kl.new_zeros(()))
        elif mc_terms is not None:
            self._set_kl_terms(*mc_terms)
        elif self.prior_dist is not None:
            _, log_q, log_p = self._sample_with_prior_dist(seed)
            self._set_kl_terms(log_q, log_p)
        else:  # a fused pass sums log q / log p of the weight's own sample without writing it
            log_q = log_p = 0
            for offset, (_, mu, rho) in enumerate(self._posterior_pairs()):
                q, p = BF.sample_kl(mu, rho, seed, offset, self.prior)
                log_q, log_p = log_q + q, log_p + p
            self._set_kl_terms(log_q, log_p)

    def _estimator_repr(self) -> str:
        s = f", estimator={self.estimator!r}" if self.estimator != "reparam" else ""
        return s + (f", kl={self.kl!r}" if self.kl != "mc" else "")
