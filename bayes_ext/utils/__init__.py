"""Helpers for models built from Bayesian layers (mirrors blitz.utils)."""
from .variational_estimator import variational_estimator

__all__ = ["variational_estimator"]
