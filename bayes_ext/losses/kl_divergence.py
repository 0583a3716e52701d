"""KL (complexity cost) of a model, as in blitz.losses."""
import torch

from ..modules.base_bayesian_module import BayesianModule

# From this many layers on, the terms are stacked and summed in one pass (kl_divergence_of_layers).
_STACK_FROM_LAYERS = 3


def kl_divergence_from_nn(model):
    """Sum over the model's Bayesian layers of log q(w) - log p(w) from their last forward."""
    layers = [module for module in model.modules() if isinstance(module, BayesianModule)]
    return kl_divergence_of_layers(layers) if layers else 0


def kl_divergence_of_layers(layers):
    """kl_divergence_from_nn's value for a model whose Bayesian layers, in module order, are
    `layers` (the vectorised ELBO has them from its own walk).

    BLiTZ adds the terms layer by layer: a subtraction and an addition per layer forward and a
    negation per layer backward, each a kernel launch on a GPU, where a many-layer model's step is
    host-bound (48 layers: 144 launches a step). Terms of one shape on one device are stacked
    instead: two stacks, a subtraction and a sum forward and one negation backward, whatever the
    number of layers. The value is the same sum, added in another order."""
    log_q = [module.log_variational_posterior for module in layers]
    log_p = [module.log_prior for module in layers]
    if len(layers) >= _STACK_FROM_LAYERS and _stackable(log_q + log_p):
        return (torch.stack(log_q) - torch.stack(log_p)).sum(0)
    kl = 0
    for i, (q, p) in enumerate(zip(log_q, log_p)):
        term = q - p
        kl = term if i == 0 else kl + term
    return kl


def _stackable(terms) -> bool:
    """Tensors of one shape on one device (a term may be a number, say after a deepcopy; a
    closed-form layer's 0-dim term beside per-sample (N,) ones would need broadcasting). Dtypes may
    differ: torch.stack promotes them as the sum does. (Read once per term: ~0.2 us each.)"""
    first = terms[0]
    if not isinstance(first, torch.Tensor):
        return False
    shape, device = first.shape, first.device
    return all(isinstance(t, torch.Tensor) and t.shape == shape and t.device == device for t in terms)
