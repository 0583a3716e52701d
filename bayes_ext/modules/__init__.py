"""Bayesian layers (mirrors blitz.modules)."""
from .base_bayesian_module import BayesianModule
from .linear_bayesian_layer import BayesianLinear
from .weight_sampler import PriorWeightDistribution, TrainableRandomDistribution

__all__ = ["BayesianModule", "BayesianLinear", "PriorWeightDistribution", "TrainableRandomDistribution"]
