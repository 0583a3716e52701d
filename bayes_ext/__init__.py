"""bayes_ext: fast Bayesian (variational) layers for PyTorch, a drop-in replacement for BLiTZ.

Replace ``blitz`` by ``bayes_ext`` in your imports. The layers run on fused C++/CUDA kernels when
they are built (``extension_available()``), otherwise on a pure-PyTorch implementation that draws
the same Philox noise, so a seed gives the same model on every backend.
"""
from ._backend import extension_available, extension_load_error, get_backend, set_backend, use_backend
from . import functional
from . import losses, modules, utils
from . import convert, metrics
from .convert import bayesianize

__version__ = "0.1.0"

__all__ = ["extension_available", "extension_load_error", "get_backend", "set_backend", "use_backend",
           "bayesianize", "convert", "functional", "losses", "metrics", "modules", "utils", "__version__"]
