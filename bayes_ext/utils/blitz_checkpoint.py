"""Loading BLiTZ checkpoints into models built from bayes_ext layers, in one call.

BLiTZ state_dicts hold every mu / rho twice (``weight_mu`` and ``weight_sampler.mu``) and the
``eps_w`` noise buffers; bayes_ext layers hold each parameter once.
"""
from collections import OrderedDict

from torch import Tensor, nn

from ..modules.base_bayesian_module import BayesianModule
from ..modules.rnn_bayesian_layer import _BLITZ_SAMPLER_SUFFIXES


def _generic_convert(module: nn.Module, state_dict, prefix: str):
    """BLiTZ -> bayes_ext for a layer without its own converter: keep ``<name>_sampler.mu/rho`` as
    ``<name>_mu/rho`` when the layer has that parameter, drop ``eps_w`` buffers."""
    out = OrderedDict()
    sampler_values = {}
    for key, value in state_dict.items():
        rest = key[len(prefix):] if key.startswith(prefix) else None
        if rest is not None and "." in rest:
            head, _, tail = rest.partition(".")
            if head.endswith("_sampler") and tail in _BLITZ_SAMPLER_SUFFIXES:
                name = head[:-len("_sampler")]
                if tail != "eps_w" and isinstance(getattr(module, f"{name}_{tail}", None), Tensor):
                    sampler_values[f"{prefix}{name}_{tail}"] = value
                continue
        out[key] = value
    out.update(sampler_values)
    return out


def load_blitz_state_dict(model: nn.Module, state_dict, strict: bool = True):
    """Load a BLiTZ model's state_dict into the same model built from bayes_ext layers, in one call.

    Every bayes_ext Bayesian layer converts its own entries (RNN layers: ``convert_blitz_state_dict``;
    other layers: the sampler duplicates become the parameters and ``eps_w`` buffers are dropped).
    """
    converted = OrderedDict(state_dict)
    for name, module in model.named_modules():
        if not isinstance(module, BayesianModule):
            continue
        prefix = f"{name}." if name else ""
        if hasattr(module, "convert_blitz_state_dict"):
            converted = module.convert_blitz_state_dict(converted, prefix)
        else:
            converted = _generic_convert(module, converted, prefix)
    return model.load_state_dict(converted, strict=strict)
