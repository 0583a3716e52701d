"""BLiTZ's weight-sampler classes, for code that builds its own Bayesian layers with them.

bayes_ext's own layers do not use these as submodules (that is how BLiTZ registers every mu and
rho twice); they call the fused op directly. These classes run on the same op.
"""
import math

import torch
from torch import nn

from .. import functional as BF

HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


class TrainableRandomDistribution(nn.Module):
    """Gaussian posterior N(mu, softplus(rho)^2) with reparameterised sampling.

    ``sample()`` draws w through the fused Philox op and returns it; ``log_posterior(w=None)`` is
    log q of the last sample (computed in the same pass) or of a given ``w``.
    """

    def __init__(self, mu: torch.Tensor, rho: torch.Tensor):
        super().__init__()
        self.mu = mu if isinstance(mu, nn.Parameter) else nn.Parameter(mu)
        self.rho = rho if isinstance(rho, nn.Parameter) else nn.Parameter(rho)
        self.w = None
        self._log_q = None

    @property
    def sigma(self) -> torch.Tensor:
        return torch.nn.functional.softplus(self.rho)

    def sample(self, seed: torch.Tensor = None, offset: int = 0) -> torch.Tensor:
        seed = BF.draw_seed() if seed is None else seed
        self.w, self._log_q, _ = BF.sample_weight(self.mu, self.rho, seed, offset)
        return self.w

    def log_posterior(self, w: torch.Tensor = None) -> torch.Tensor:
        if w is None:
            if self._log_q is None:
                raise RuntimeError("log_posterior() without w needs a sample first: call sample()")
            return self._log_q
        sigma = self.sigma
        return (-HALF_LOG_2PI - torch.log(sigma) - (w - self.mu) ** 2 / (2 * sigma ** 2)).sum()


class PriorWeightDistribution(nn.Module):
    """Scale-mixture prior pi N(0, sigma1^2) + (1 - pi) N(0, sigma2^2), or any ``dist`` with log_prob.

    ``log_prior(w)`` is evaluated in log space, so it stays finite (and keeps its gradient) for
    every w, unlike BLiTZ's ``log(... + 1e-6)``.
    """

    def __init__(self, pi: float = 1, sigma1: float = 0.1, sigma2: float = 0.001, dist=None):
        super().__init__()
        if dist is not None and not hasattr(dist, "log_prob"):
            raise TypeError(f"dist must be a torch.distributions object with log_prob, got {type(dist).__name__}")
        self.pi = pi
        self.sigma1 = sigma1
        self.sigma2 = sigma2
        self.dist = dist

    def log_prior(self, w: torch.Tensor) -> torch.Tensor:
        if self.dist is not None:
            return self.dist.log_prob(w).sum()
        return BF.log_prior_sum(w, (float(self.pi), float(self.sigma1), float(self.sigma2)))
