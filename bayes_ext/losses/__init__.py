from .kl_divergence import kl_divergence_from_nn

__all__ = ["kl_divergence_from_nn"]
