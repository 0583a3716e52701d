"""Bayesian layers (mirrors blitz.modules)."""
from .base_bayesian_module import BayesianModule
from .conv_bayesian_layer import (BayesianConv1d, BayesianConv2d, BayesianConv3d, BayesianConvTranspose1d,
                                  BayesianConvTranspose2d, BayesianConvTranspose3d)
from .embedding_bayesian_layer import BayesianEmbedding
from .gru_bayesian_layer import BayesianGRU
from .linear_bayesian_layer import BayesianLinear
from .lstm_bayesian_layer import BayesianLSTM
from .rnn_bayesian_layer import BayesianRNN
from .weight_sampler import PriorWeightDistribution, TrainableRandomDistribution

__all__ = ["BayesianModule", "BayesianLinear", "BayesianConv1d", "BayesianConv2d", "BayesianConv3d",
           "BayesianConvTranspose1d", "BayesianConvTranspose2d", "BayesianConvTranspose3d", "BayesianRNN",
           "BayesianLSTM", "BayesianGRU", "BayesianEmbedding", "PriorWeightDistribution",
           "TrainableRandomDistribution"]
