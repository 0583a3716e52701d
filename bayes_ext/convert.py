"""Turn a trained deterministic model into a Bayesian one: ``bayesianize(model)``.

Every ``nn.Linear``, ``nn.Conv1d/2d/3d``, ``nn.ConvTranspose1d/2d/3d``, ``nn.LSTM``, ``nn.GRU`` and
``nn.Embedding`` is replaced by its Bayesian layer, with the posterior mean set to the trained weights and the posterior scale from
MOPED (``sigma = delta * |w|``, Krishnan et al. 2019) or a constant ``sigma``. Everything else
(BatchNorm, activations, pooling, custom modules) is left as it is, parameters and buffers included.

    model = bayesianize(trained_model, delta=0.05)          # a converted deep copy
    bayesianize(trained_model, inplace=True, sigma=1e-3)     # converted in place

Rules:

- Modules are matched by exact type: subclasses (e.g. ``NonDynamicallyQuantizableLinear`` inside
  ``nn.MultiheadAttention``, whose weight the attention reads directly, or the lazy modules) are not
  converted.
- A module shared by several parents is converted once and stays shared.
- ``nn.LSTM`` / ``nn.GRU`` convert when they have one layer, ``batch_first=True``, one direction and
  (LSTM) no projection, the configurations BayesianLSTM / BayesianGRU implement. Others raise a
  ``ValueError`` (``strict=True``, the default) or are skipped with a warning (``strict=False``).
- Layouts: BayesianLSTM keeps BLiTZ's ``weight_ih`` (in, 4H), ``weight_hh`` (H, 4H) and one bias
  (4H) = ``b_ih + b_hh``; BayesianGRU has ``weight_ih`` (in, 3H), ``weight_hh`` (H, 3H) and the
  bias (4H) = (b_ir + b_hr, b_iz + b_hz, b_in, b_hn). Both give nn.LSTM's / nn.GRU's outputs when frozen.
- The new layers are created on the device and in the dtype of the module they replace (a bf16 /
  fp16 layer samples in float32 and computes in its dtype: modules/_low_precision.py), in its
  training mode, unfrozen (they sample). Freeze them (``module.freeze = True`` or
  ``@variational_estimator``'s ``freeze_()``) for the mean-weight predictions, which equal the
  original model's.
- ``prior_kwargs`` (``prior_sigma_1``, ``prior_sigma_2``, ``prior_pi``, ``prior_dist``) go to every
  new layer's constructor; the layers' defaults apply otherwise.
"""
import copy
import inspect
import warnings
from typing import Dict, Iterable, Optional, Type

import torch
from torch import nn

from . import modules as M
from .modules._posterior import inverse_softplus

__all__ = ["bayesianize", "convertible_types"]

_PRIOR_KEYS = ("prior_sigma_1", "prior_sigma_2", "prior_pi", "prior_dist")


# ---- constructors of the Bayesian layers from their deterministic counterparts ---------------------------

def _linear(m: nn.Linear, kw):
    layer = M.BayesianLinear(m.in_features, m.out_features, bias=m.bias is not None, **kw)
    return layer, {"weight": m.weight, "bias": m.bias}


def _conv(cls):
    def build(m, kw):
        common = dict(stride=m.stride, padding=m.padding, dilation=m.dilation, groups=m.groups,
                      bias=m.bias is not None, padding_mode=m.padding_mode, **kw)
        if cls._transposed:
            common["output_padding"] = m.output_padding
        layer = cls(m.in_channels, m.out_channels, m.kernel_size, **common)
        return layer, {"weight": m.weight, "bias": m.bias}
    return build


def _check_rnn(m) -> Optional[str]:
    problems = []
    if m.num_layers != 1:
        problems.append(f"num_layers={m.num_layers} (only 1)")
    if not m.batch_first:
        problems.append("batch_first=False (only batch_first=True)")
    if m.bidirectional:
        problems.append("bidirectional=True (only unidirectional)")
    if getattr(m, "proj_size", 0):
        problems.append(f"proj_size={m.proj_size} (no projection)")
    return ", ".join(problems) or None


def _lstm(m: nn.LSTM, kw):
    bias = m.bias
    layer = M.BayesianLSTM(m.input_size, m.hidden_size, bias=bias, **kw)
    values = {"weight_ih": m.weight_ih_l0.t(), "weight_hh": m.weight_hh_l0.t(),
              "bias": (m.bias_ih_l0 + m.bias_hh_l0) if bias else None}
    return layer, values


def _gru(m: nn.GRU, kw):
    bias, H = m.bias, m.hidden_size
    layer = M.BayesianGRU(m.input_size, H, bias=bias, **kw)
    values = {"weight_ih": m.weight_ih_l0.t(), "weight_hh": m.weight_hh_l0.t(), "bias": None}
    if bias:
        b_ih, b_hh = m.bias_ih_l0, m.bias_hh_l0
        values["bias"] = torch.cat([b_ih[:2 * H] + b_hh[:2 * H], b_ih[2 * H:], b_hh[2 * H:]])
    return layer, values


def _embedding(m: nn.Embedding, kw):
    cls = M.BayesianEmbedding
    params = inspect.signature(cls).parameters
    options = {"padding_idx": m.padding_idx, "max_norm": m.max_norm, "norm_type": m.norm_type,
               "scale_grad_by_freq": m.scale_grad_by_freq, "sparse": m.sparse}
    unsupported = [k for k, v in options.items()
                   if k not in params and v not in (None, False, 2.0)]
    if unsupported:
        raise ValueError(f"nn.Embedding with {', '.join(f'{k}={options[k]!r}' for k in unsupported)}: "
                         f"{cls.__name__} does not take these arguments")
    options = {k: v for k, v in options.items() if k in params}
    layer = cls(m.num_embeddings, m.embedding_dim, **options, **kw)
    return layer, {"weight": m.weight}


_BUILDERS = {
    nn.Linear: _linear,
    nn.Conv1d: _conv(M.BayesianConv1d),
    nn.Conv2d: _conv(M.BayesianConv2d),
    nn.Conv3d: _conv(M.BayesianConv3d),
    nn.ConvTranspose1d: _conv(M.BayesianConvTranspose1d),
    nn.ConvTranspose2d: _conv(M.BayesianConvTranspose2d),
    nn.ConvTranspose3d: _conv(M.BayesianConvTranspose3d),
    nn.LSTM: _lstm,
    nn.GRU: _gru,
    nn.Embedding: _embedding,
}


def convertible_types():
    """The module types ``bayesianize`` converts (with this build of bayes_ext)."""
    return tuple(_BUILDERS)


# ---- the conversion ---------------------------------------------------------------------------------------

def _convert_module(m: nn.Module, build, delta: float, sigma: Optional[float], prior_kwargs) -> nn.Module:
    ref = next(m.parameters())
    layer, values = build(m, prior_kwargs)
    layer = layer.to(device=ref.device, dtype=ref.dtype)
    with torch.no_grad():
        for name, value in values.items():
            mu = getattr(layer, f"{name}_mu", None)
            if mu is None:
                continue
            if tuple(mu.shape) != tuple(value.shape):  # a layout bug, never a user error
                raise RuntimeError(f"bayesianize: {type(m).__name__}.{name} has shape {tuple(value.shape)}, "
                                   f"{type(layer).__name__}.{name}_mu {tuple(mu.shape)}")
            mu.copy_(value)
            rho = getattr(layer, f"{name}_rho")
            if sigma is None:
                # MOPED, as GaussianPosteriorMixin.moped_; in float64, where the floor 1e-10 is not 0
                s = (delta * value.to(torch.float64).abs()).clamp_min(1e-10)
            else:
                s = torch.full_like(value, float(sigma), dtype=torch.float64)
            rho.copy_(inverse_softplus(s).to(rho.dtype))
    layer.train(m.training)
    return layer


def bayesianize(model: nn.Module, inplace: bool = False, delta: float = 0.1, sigma: Optional[float] = None,
                types: Optional[Iterable[Type[nn.Module]]] = None, strict: bool = True,
                **prior_kwargs) -> nn.Module:
    """Replace the Linear / Conv / ConvTranspose / LSTM / GRU / Embedding modules of ``model`` by
    Bayesian layers whose posterior mean is the trained weight.

    Args:
        model: the trained model (or a single supported module).
        inplace: convert ``model`` itself; otherwise (default) a deep copy is converted and ``model``
            is left unchanged.
        delta: MOPED's factor, ``sigma = delta * |w|`` per weight (used when ``sigma`` is None).
        sigma: a constant posterior standard deviation for every weight instead of MOPED.
        types: only convert modules of these types (a subset of ``convertible_types()``).
        strict: an LSTM / GRU configuration the Bayesian layers lack (several layers,
            bidirectional, not batch_first, projection) raises ``ValueError``; with ``strict=False``
            such modules are left as they are, with a warning.
        prior_kwargs: ``prior_sigma_1``, ``prior_sigma_2``, ``prior_pi``, ``prior_dist`` for every new layer.

    Returns the converted model: ``model`` itself when ``inplace``, else the copy. (When ``model`` is a
    supported module itself, the returned module is its Bayesian replacement.)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"bayesianize takes an nn.Module, got {type(model).__name__}")
    if sigma is None:
        if not (isinstance(delta, (int, float)) and delta > 0):
            raise ValueError(f"delta must be positive, got {delta!r}")
    elif not (isinstance(sigma, (int, float)) and sigma > 0):
        raise ValueError(f"sigma must be positive, got {sigma!r}")
    unknown = set(prior_kwargs) - set(_PRIOR_KEYS)
    if unknown:
        raise TypeError(f"bayesianize got unexpected keyword arguments {sorted(unknown)}; "
                        f"prior arguments are {list(_PRIOR_KEYS)}")
    builders = _BUILDERS
    if types is not None:
        types = tuple(types)
        bad = [t for t in types if t not in builders]
        if bad:
            raise ValueError(f"types {[getattr(t, '__name__', t) for t in bad]} cannot be converted; "
                             f"convertible: {[t.__name__ for t in builders]}")
        builders = {t: builders[t] for t in types}
    if not inplace:
        model = copy.deepcopy(model)

    converted: Dict[int, nn.Module] = {}  # id(original) -> replacement, so shared modules stay shared

    def replacement(m: nn.Module) -> Optional[nn.Module]:
        build = builders.get(type(m))
        if build is None:
            return None
        if id(m) in converted:
            return converted[id(m)]
        if isinstance(m, (nn.LSTM, nn.GRU)):
            problem = _check_rnn(m)
            if problem is not None:
                message = (f"bayesianize: cannot convert {type(m).__name__} with {problem}; Bayesian{type(m).__name__} "
                           f"is a single-layer, unidirectional, batch_first layer")
                if strict:
                    raise ValueError(message + " (pass strict=False to leave such modules unconverted)")
                warnings.warn(message + "; left unconverted", UserWarning, stacklevel=3)
                return None
        new = _convert_module(m, build, delta, sigma, prior_kwargs)
        converted[id(m)] = new
        return new

    def visit(parent: nn.Module, seen: set) -> None:
        if id(parent) in seen:
            return
        seen.add(id(parent))
        for name, child in list(parent._modules.items()):  # named_children() hides repeated modules
            if child is None:
                continue
            new = replacement(child)
            if new is not None:
                setattr(parent, name, new)
            else:
                visit(child, seen)

    root = replacement(model)
    if root is not None:
        return root
    visit(model, set())
    return model
