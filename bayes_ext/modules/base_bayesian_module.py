"""Marker base classes, as in blitz.modules.base_bayesian_module."""
from torch import nn


class BayesianModule(nn.Module):
    """Base class of every Bayesian layer: ``kl_divergence_from_nn`` and ``@variational_estimator``
    find layers by this type and read their ``log_variational_posterior`` and ``log_prior``."""


from .rnn_bayesian_layer import BayesianRNN  # noqa: E402,F401  (BLiTZ's import path; defined after BayesianModule)
