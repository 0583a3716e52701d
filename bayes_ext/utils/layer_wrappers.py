"""BLiTZ's ``Flipout`` and ``Radial`` layer wrappers, made to do what their names promise.

Both take a Bayesian layer class whose output is linear in its weights (``BayesianLinear``, the
convolutions) and return a subclass with the same constructor, parameters and KL bookkeeping:

- ``Flipout(cls)`` (Wen et al. 2018): ``y = f(x; mu) + (f(x * S; W) - f(x * S; mu)) * R`` with
  Rademacher signs S (input shape) and R (output shape) per example. Each example's output has the
  same distribution as with plain sampling, but the perturbations of different examples of a
  batch are decorrelated (BLiTZ's version added the mean output twice).
- ``Radial(cls)`` (Farquhar et al. 2020): ``w = mu + sigma * (eps / ||eps||) * r`` with eps from
  the layer's Philox stream and one radius r ~ N(0, 1) per weight tensor. ``log_variational_posterior``
  is the radial posterior's log density up to a constant that does not depend on the parameters,
  ``-sum(log sigma)`` (its entropy term is analytic); ``log_prior`` is the prior's log density of w.
  (BLiTZ's version patched a method its layers never call.)

Recurrent layers are not linear in their weights: wrapping them raises TypeError.
"""
import torch
import torch.nn.functional as F

from .. import _backend, _fallback
from .. import functional as BF
from ..modules.base_bayesian_module import BayesianModule
from ..modules.conv_bayesian_layer import _BayesianConvPlainNd
from ..modules.linear_bayesian_layer import BayesianLinear


def _weight_linear_layers(nn_module) -> None:
    if not (isinstance(nn_module, type) and issubclass(nn_module, BayesianModule)):
        raise TypeError(f"expected a bayes_ext Bayesian layer class, got {nn_module!r}")
    if not issubclass(nn_module, (BayesianLinear, _BayesianConvPlainNd)):
        raise TypeError(f"{nn_module.__name__} is not linear in its weights; Flipout and Radial wrap "
                        "BayesianLinear and BayesianConv1d/2d/3d")


def _apply_weights(layer, x, weight, bias):
    """The layer's operation with given weights."""
    if isinstance(layer, BayesianLinear):
        return F.linear(x, weight, bias)
    from ..functional_conv import conv_with_weight
    return conv_with_weight(x, weight, bias, layer._spec())


def _rademacher_like(t: torch.Tensor) -> torch.Tensor:
    return torch.randint(0, 2, t.shape, dtype=t.dtype, device=t.device) * 2 - 1


def Flipout(nn_module):
    """A subclass of ``nn_module`` whose sampled forward uses Flipout perturbations."""
    _weight_linear_layers(nn_module)

    class FlipoutLayer(nn_module):
        def forward(self, x):
            if self.freeze:
                return self.forward_frozen(x)
            x_signed = x * _rademacher_like(x)
            sampled = super().forward(x_signed)  # validates x, sets the KL terms of the sampled weights
            perturbation = sampled - _apply_weights(self, x_signed, self.weight_mu, self.bias_mu)
            mean = _apply_weights(self, x, self.weight_mu, self.bias_mu)
            return mean + perturbation * _rademacher_like(perturbation)

    FlipoutLayer.__name__ = FlipoutLayer.__qualname__ = f"Flipout{nn_module.__name__}"
    return FlipoutLayer


def Radial(nn_module):
    """A subclass of ``nn_module`` with a radial posterior (direction uniform, radius N(0, 1))."""
    _weight_linear_layers(nn_module)

    class RadialLayer(nn_module):
        def forward(self, x):
            if self.freeze:
                return self.forward_frozen(x)
            if isinstance(self, BayesianLinear):
                BF.check_input(x, self.weight_mu, self.in_features)
            seed = BF.draw_seed()
            samples, log_q, log_p = {}, 0, 0
            for offset, (name, mu, rho) in enumerate(self._posterior_pairs()):
                eps = _backend.ops().philox_normal(mu, seed, offset)
                radius = torch.randn((), dtype=mu.dtype).to(mu.device)  # CPU generator, like the seed
                sigma, log_sigma, _, _ = _fallback.softplus_terms(rho)
                direction = eps / eps.norm().clamp_min(torch.finfo(eps.dtype).tiny)
                w = mu + sigma * direction * radius
                dist = self.weight_prior_dist if name.startswith("weight") else self.bias_prior_dist
                samples[name] = w
                log_q = log_q - log_sigma.sum()
                log_p = log_p + dist.log_prior(w)
            self._set_kl_terms(log_q, log_p)
            return _apply_weights(self, x, samples["weight"], samples.get("bias"))

    RadialLayer.__name__ = RadialLayer.__qualname__ = f"Radial{nn_module.__name__}"
    return RadialLayer
