"""KL (complexity cost) of a model, as in blitz.losses."""
from ..modules.base_bayesian_module import BayesianModule


def kl_divergence_from_nn(model):
    """Sum over the model's Bayesian layers of log q(w) - log p(w) from their last forward."""
    kl = 0
    for module in model.modules():
        if isinstance(module, BayesianModule):
            kl = kl + (module.log_variational_posterior - module.log_prior)
    return kl


def kl_divergence_of_layers(layers):
    """kl_divergence_from_nn's value for a model whose Bayesian layers, in module order, are
    `layers` (the vectorised ELBO has them from its own walk), without adding to a 0 first."""
    kl = 0
    for i, module in enumerate(layers):
        term = module.log_variational_posterior - module.log_prior
        kl = term if i == 0 else kl + term
    return kl
