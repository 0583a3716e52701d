"""KL (complexity cost) of a model, as in blitz.losses."""
from ..modules.base_bayesian_module import BayesianModule


def kl_divergence_from_nn(model):
    """Sum over the model's Bayesian layers of log q(w) - log p(w) from their last forward."""
    kl = 0
    for module in model.modules():
        if isinstance(module, BayesianModule):
            kl = kl + (module.log_variational_posterior - module.log_prior)
    return kl
