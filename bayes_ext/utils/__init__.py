"""Helpers for models built from Bayesian layers (mirrors blitz.utils)."""
from .blitz_checkpoint import load_blitz_state_dict
from .layer_wrappers import Flipout, Radial
from .variational_estimator import variational_estimator

__all__ = ["Flipout", "Radial", "load_blitz_state_dict", "variational_estimator"]
