"""The @variational_estimator class decorator (BLiTZ's API, same signatures and meaning)."""
import math

import numpy as np
import torch

from ..losses import kl_divergence_from_nn
from ..modules.base_bayesian_module import BayesianModule
from ..modules.rnn_bayesian_layer import BayesianRNN
from . import vectorised as _vec


def _check_sample_nbr(sample_nbr) -> int:
    if isinstance(sample_nbr, bool) or not isinstance(sample_nbr, int) or sample_nbr < 1:
        raise ValueError(f"sample_nbr must be a positive int, got {sample_nbr!r}")
    return sample_nbr


def _check_cost_weight(weight) -> None:
    """A NaN or infinite KL weight would make every loss NaN without a word. (A tensor, e.g. a
    schedule's value on the GPU, is taken as it is: checking it would synchronise.)"""
    if isinstance(weight, (int, float)) and not isinstance(weight, bool) and not math.isfinite(weight):
        raise ValueError(f"complexity_cost_weight must be finite, got {weight!r}")


def nn_kl_divergence(self):
    """Sum of log q - log p over the model's Bayesian layers (from their last forward)."""
    return kl_divergence_from_nn(self)


def _vectorised_kl_fn(model):
    """What run_samples evaluates for the KL: the model's own nn_kl_divergence if it has another
    one, else LAYERS_KL (the same sum from the layers run_samples already found: no second walk)."""
    default = getattr(type(model), "nn_kl_divergence", None) is nn_kl_divergence
    return _vec.LAYERS_KL if default and "nn_kl_divergence" not in model.__dict__ else model.nn_kl_divergence


def sample_elbo(self, inputs, labels, criterion, sample_nbr, complexity_cost_weight=1, *, vectorized=None):
    """Mean over ``sample_nbr`` weight samples of criterion(self(inputs), labels) + KL * weight.

    ``vectorized``: None (auto) runs the samples as one batched forward when every layer supports it
    (bayes_ext/utils/vectorised.py; same noise, loss and gradients as the loop, about twice as fast
    for small models), False always loops, True requires the batched path (ValueError otherwise).
    The criterion sees one sample's outputs at a time, so any criterion gives the loop's loss (built-in
    losses whose value on the stacked samples is that same sum get them in one call).
    The batched path assumes the forward treats the examples of a batch independently (BatchNorm in
    training and dropout are detected and run the loop); a forward that mixes them by hand needs False.
    """
    sample_nbr = _check_sample_nbr(sample_nbr)
    _check_cost_weight(complexity_cost_weight)
    batched = _vec.run_samples(self, inputs, sample_nbr, vectorized, _vectorised_kl_fn(self))
    if batched is not None:
        outputs, kl = batched  # the mean over the samples term by term: fewer ops than sum, then divide
        return (_vec.criterion_over_samples(criterion, outputs, labels, sample_nbr, reduce="mean")
                + _vec.kl_over_samples(kl, sample_nbr, complexity_cost_weight, reduce="mean"))
    loss = 0
    for _ in range(sample_nbr):
        outputs = self(inputs)
        loss = loss + criterion(outputs, labels) + self.nn_kl_divergence() * complexity_cost_weight
    return loss / sample_nbr


def sample_elbo_detailed_loss(self, inputs, labels, criterion, sample_nbr, complexity_cost_weight=1, *,
                              vectorized=None):
    """(predictions as a numpy array (sample_nbr, ...), ELBO, likelihood part, complexity part).

    ``vectorized``: as in sample_elbo."""
    sample_nbr = _check_sample_nbr(sample_nbr)
    _check_cost_weight(complexity_cost_weight)
    likelihood_cost = complexity_cost = 0
    batched = _vec.run_samples(self, inputs, sample_nbr, vectorized, _vectorised_kl_fn(self))
    if batched is not None:
        outputs, kl = batched
        likelihood_cost = _vec.criterion_over_samples(criterion, outputs, labels, sample_nbr)
        complexity_cost = _vec.kl_over_samples(kl, sample_nbr, complexity_cost_weight)
        return (outputs.detach().unflatten(0, (sample_nbr, -1)).cpu().numpy(),
                (likelihood_cost + complexity_cost) / sample_nbr,
                likelihood_cost / sample_nbr, complexity_cost / sample_nbr)
    predictions = []
    for _ in range(sample_nbr):
        outputs = self(inputs)
        predictions.append(outputs.detach().cpu().numpy())
        likelihood_cost = likelihood_cost + criterion(outputs, labels)
        complexity_cost = complexity_cost + self.nn_kl_divergence() * complexity_cost_weight
    return (np.array(predictions), (likelihood_cost + complexity_cost) / sample_nbr,
            likelihood_cost / sample_nbr, complexity_cost / sample_nbr)


def _bayesian_layers(model):
    return [m for m in model.modules() if isinstance(m, BayesianModule)]


def freeze_(self):
    """Every Bayesian layer predicts with its mean weights."""
    for module in _bayesian_layers(self):
        module.freeze = True


def unfreeze_(self):
    """Every Bayesian layer samples its weights again."""
    for module in _bayesian_layers(self):
        module.freeze = False


def MOPED_(self, delta=0.1):
    """Set sigma = delta * |mu| in every Bayesian layer (Krishnan et al. 2019), then unfreeze."""
    if not delta > 0:
        raise ValueError(f"delta must be positive, got {delta}")
    for module in _bayesian_layers(self):
        if hasattr(module, "moped_"):
            module.moped_(delta)
    self.unfreeze_()


def mfvi_forward(self, inputs, sample_nbr=10, *, vectorized=None):
    """(mean, std) over ``sample_nbr`` sampled forwards, along the sample axis.

    ``vectorized``: as in sample_elbo (the batched path gives the loop's samples). The std is the
    unbiased one (BLiTZ's), so it needs at least 2 samples (BLiTZ returned NaN for one)."""
    if _check_sample_nbr(sample_nbr) < 2:
        raise ValueError(f"sample_nbr must be at least 2 for a standard deviation, got {sample_nbr}")
    batched = _vec.run_samples(self, inputs, sample_nbr, vectorized)
    if batched is not None:
        result = batched[0].unflatten(0, (sample_nbr, -1))
        return result.mean(dim=0), result.std(dim=0)
    outputs = [self(inputs) for _ in range(sample_nbr)]
    if not isinstance(outputs[0], torch.Tensor):
        raise TypeError(f"mfvi_forward needs a model that returns one tensor, got {type(outputs[0]).__name__}")
    result = torch.stack(outputs)
    return result.mean(dim=0), result.std(dim=0)


def forward_with_sharpening(self, x, labels, criterion):
    """The posterior-sharpened forward BLiTZ's ``@variational_estimator.forward_with_sharpening`` meant.

    One sampled forward gives the loss ``criterion(self(x), labels)``; every sharpening RNN layer
    then sharpens its sample with that loss in a second forward, whose predictions are returned.
    ``nn_kl_divergence()`` afterwards includes the sharpening KL.
    """
    loss = criterion(self(x), labels)
    layers = [m for m in self.modules() if isinstance(m, BayesianRNN) and m.sharpen]
    for module in layers:
        module.loss_to_sharpen = loss
    try:
        return self(x)
    finally:
        for module in layers:
            module.loss_to_sharpen = None


_METHODS = {
    "nn_kl_divergence": nn_kl_divergence,
    "sample_elbo": sample_elbo,
    "sample_elbo_detailed_loss": sample_elbo_detailed_loss,
    "freeze_": freeze_,
    "unfreeze_": unfreeze_,
    "MOPED_": MOPED_,
    "mfvi_forward": mfvi_forward,
    "forward_with_sharpening": forward_with_sharpening,
}


def variational_estimator(nn_class):
    """Adds nn_kl_divergence, sample_elbo, sample_elbo_detailed_loss, freeze_, unfreeze_, MOPED_
    mfvi_forward and forward_with_sharpening to an nn.Module subclass."""
    if not (isinstance(nn_class, type) and issubclass(nn_class, torch.nn.Module)):
        raise TypeError(f"variational_estimator decorates nn.Module subclasses, got {nn_class!r}")
    for name, method in _METHODS.items():
        setattr(nn_class, name, method)
    return nn_class
