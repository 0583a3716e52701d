"""Bayesian convolutions (1-d, 2-d, 3-d, plain and transposed) on one fused op.

- ``bayesian_conv``: sample W ~ N(weight_mu, softplus(weight_rho)^2) (Philox stream (seed, 0)) and
  b (stream (seed, 1)), convolve, and return ``(y, log_q, log_p)``. The op's backward computes
  grad_W from grad_out and the input, then regenerates eps from the seed to turn it into
  grad_mu / grad_rho and rebuild W in the same pass for grad_input; so a training forward keeps
  only its input alive for backward (like ``nn.Conv*d``), never the sampled weight.
- ``conv_with_weight``: the same convolution with given (e.g. mean) weights, for frozen layers.
- ``conv_spec``: validates and normalises stride / padding / dilation / groups / output_padding
  (int, tuple, ``'same'``, ``'valid'``, padding modes) once; the layers cache it.

Weight layouts are ``nn.Conv*d``'s: (out, in / groups, *kernel) for a convolution and
(in, out / groups, *kernel) for a transposed one.
"""
import functools
import numbers
from typing import List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _backend, _checks
from . import functional as BF
from ._fused_op import fused_custom_op
from ._saved_inputs import saved_tensors

ScaleMixture = Tuple[float, float, float]  # (pi, sigma1, sigma2)
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


class ConvSpec(NamedTuple):
    """A validated convolution configuration, in the form ``aten.convolution`` takes it.

    ``pre_pad`` (F.pad order: last dim first) is applied to the input before the convolution, with
    ``pre_pad_mode``: the asymmetric part of ``padding='same'`` with an even kernel, or the whole
    padding for a padding_mode other than 'zeros'. ``padding`` is then the symmetric zero padding
    the convolution itself adds.
    """
    spatial_dims: int
    kernel_size: Tuple[int, ...]
    stride: Tuple[int, ...]
    padding: Tuple[int, ...]
    dilation: Tuple[int, ...]
    transposed: bool
    output_padding: Tuple[int, ...]
    groups: int
    pre_pad: Optional[Tuple[int, ...]]
    pre_pad_mode: str


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _ntuple(value, n: int, name: str, minimum: int) -> Tuple[int, ...]:
    """An int or a sequence of n (or 1) ints, each >= minimum, as an n-tuple."""
    if _is_int(value):
        values = (int(value),) * n
    elif isinstance(value, (tuple, list, torch.Size)) and all(_is_int(v) for v in value):
        if len(value) == 1:
            values = (int(value[0]),) * n
        elif len(value) == n:
            values = tuple(int(v) for v in value)
        else:
            raise ValueError(f"{name} must be an int or a sequence of {n} ints, got {tuple(value)}")
    else:
        raise TypeError(f"{name} must be an int or a sequence of {n} ints, got {value!r}")
    if any(v < minimum for v in values):
        kind = "positive" if minimum == 1 else "non-negative"
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    return values


def conv_spec(spatial_dims: int, kernel_size, stride=1, padding=0, dilation=1, groups: int = 1,
              transposed: bool = False, output_padding=0, padding_mode: str = "zeros") -> ConvSpec:
    """Validate a convolution's configuration (errors name the argument) and normalise it."""
    n = spatial_dims
    if n not in (1, 2, 3):
        raise ValueError(f"only 1-d, 2-d and 3-d convolutions exist, got {n} spatial dimensions")
    kernel_size = _ntuple(kernel_size, n, "kernel_size", 1)
    stride = _ntuple(stride, n, "stride", 1)
    dilation = _ntuple(dilation, n, "dilation", 1)
    if not _is_int(groups):
        raise TypeError(f"groups must be an int, got {groups!r}")
    if groups < 1:
        raise ValueError(f"groups must be positive, got {groups}")
    if not isinstance(padding_mode, str) or padding_mode not in PADDING_MODES:
        raise ValueError(f"padding_mode must be one of {PADDING_MODES}, got {padding_mode!r}")
    if transposed:
        if padding_mode != "zeros":
            raise ValueError(f"padding_mode must be 'zeros' for a transposed convolution, got {padding_mode!r}")
        if isinstance(padding, str):
            raise ValueError(f"padding must be an int or a tuple for a transposed convolution, got {padding!r}")
        output_padding = _ntuple(output_padding, n, "output_padding", 0)
        for op, s, d in zip(output_padding, stride, dilation):
            if op >= max(s, d):
                raise ValueError(f"output_padding must be smaller than either stride or dilation, got "
                                 f"output_padding={output_padding}, stride={stride}, dilation={dilation}")
    else:
        output_padding = _ntuple(output_padding, n, "output_padding", 0)
        if any(output_padding):
            raise ValueError(f"output_padding is only for transposed convolutions, got {output_padding}")

    # explicit (left, right) padding per spatial dim
    if isinstance(padding, str):
        if padding == "valid":
            pads = [(0, 0)] * n
        elif padding == "same":
            if any(s != 1 for s in stride):
                raise ValueError(f"padding='same' is not supported for strided convolutions, got stride={stride}")
            pads = []
            for k, d in zip(kernel_size, dilation):
                total = d * (k - 1)
                pads.append((total // 2, total - total // 2))  # the extra one on the right, as torch does
        else:
            raise ValueError(f"padding must be an int, a tuple, 'same' or 'valid', got {padding!r}")
    else:
        pads = [(p, p) for p in _ntuple(padding, n, "padding", 0)]

    pre_pad, pre_pad_mode = None, "constant"
    if padding_mode != "zeros":
        # like nn.Conv*d: pad the input with the mode, then convolve without padding
        pre_pad = tuple(v for left, right in reversed(pads) for v in (left, right))
        pre_pad_mode = padding_mode
        conv_padding = (0,) * n
    else:
        conv_padding = tuple(left for left, _ in pads)
        if any(left != right for left, right in pads):
            pre_pad = tuple(v for left, right in reversed(pads) for v in (0, right - left))
    if pre_pad is not None and not any(pre_pad):
        pre_pad = None
    return ConvSpec(n, kernel_size, stride, conv_padding, dilation, bool(transposed), output_padding, int(groups),
                    pre_pad, pre_pad_mode)


@functools.lru_cache(maxsize=256)
def _cached_conv_spec(*args) -> ConvSpec:
    return conv_spec(*args)


def cached_conv_spec(*args) -> ConvSpec:
    """conv_spec, memoised for hashable arguments (a layer's configuration rarely changes)."""
    if torch.compiler.is_compiling():  # dynamo traces the function anyway; the spec becomes constant
        return conv_spec(*args)
    try:
        return _cached_conv_spec(*args)
    except TypeError as exc:  # unhashable (e.g. a list): validate without the cache
        if "unhashable" not in str(exc):
            raise
        return conv_spec(*args)


def conv_output_size(spec: ConvSpec, input_size: Sequence[int]) -> Tuple[int, ...]:
    """Spatial output size of the convolution for a spatial input size (before any pre_pad)."""
    sizes = list(input_size)
    if spec.pre_pad is not None:
        for i in range(spec.spatial_dims):
            j = 2 * (spec.spatial_dims - 1 - i)
            sizes[i] += spec.pre_pad[j] + spec.pre_pad[j + 1]
    out = []
    for i, size in enumerate(sizes):
        k, s, p, d = spec.kernel_size[i], spec.stride[i], spec.padding[i], spec.dilation[i]
        if spec.transposed:
            out.append((size - 1) * s - 2 * p + d * (k - 1) + spec.output_padding[i] + 1)
        else:
            out.append((size + 2 * p - d * (k - 1) - 1) // s + 1)
    return tuple(out)


def _weight_channels(weight: Tensor, spec: ConvSpec) -> Tuple[int, int]:
    """(in_channels, out_channels) of a weight laid out as nn.Conv*d / nn.ConvTranspose*d's."""
    if spec.transposed:
        return weight.shape[0], weight.shape[1] * spec.groups
    return weight.shape[1] * spec.groups, weight.shape[0]


def check_conv_input(x: Tensor, weight: Tensor, spec: ConvSpec, name: str = "input") -> bool:
    """Clear errors for a convolution's input; returns whether it is batched."""
    _checks.check_tensor(x, name)
    if not (x.is_floating_point() and x.dtype in (weight.dtype, _autocast_dtype(x, weight))):
        raise TypeError(f"{name} must have the dtype of the layer's parameters ({weight.dtype}), got {x.dtype}")
    if x.device != weight.device:
        raise ValueError(f"{name} must be on the device of the layer's parameters ({weight.device}), got {x.device}")
    n = spec.spatial_dims
    if x.dim() not in (n + 1, n + 2):
        raise ValueError(f"{name} must be {n + 1}-D (unbatched) or {n + 2}-D (batched) for a {n}-d convolution, "
                         f"got shape {tuple(x.shape)}")
    batched = x.dim() == n + 2
    in_channels, _ = _weight_channels(weight, spec)
    channels = x.shape[1 if batched else 0]
    if channels != in_channels:
        raise ValueError(f"{name} must have {in_channels} channels in dimension {1 if batched else 0}, "
                         f"got shape {tuple(x.shape)}")
    out = conv_output_size(spec, x.shape[-n:])
    if any(o <= 0 for o in out):
        raise ValueError(f"{name} of spatial size {tuple(x.shape[-n:])} is too small for kernel_size "
                         f"{spec.kernel_size} with padding {spec.padding} and dilation {spec.dilation} "
                         f"(output size {out})")
    return batched


def _check_weight_pair(mu, rho, prefix: str) -> None:
    _checks.check_floating(mu, f"{prefix}_mu")
    _checks.check_matches(rho, f"{prefix}_rho", mu, f"{prefix}_mu")


def check_conv_params(weight_mu, weight_rho, bias_mu, bias_rho, spec: ConvSpec) -> None:
    """Shapes, dtypes and devices of a convolution's posterior parameters."""
    _check_weight_pair(weight_mu, weight_rho, "weight")
    n = spec.spatial_dims
    if weight_mu.dim() != n + 2:
        raise ValueError(f"weight_mu must be {n + 2}-D for a {n}-d convolution, got shape {tuple(weight_mu.shape)}")
    if any(s == 0 for s in weight_mu.shape):
        raise ValueError(f"weight_mu must not be empty, got shape {tuple(weight_mu.shape)}")
    if weight_mu.shape[0] % spec.groups:
        which = "in_channels" if spec.transposed else "out_channels"
        raise ValueError(f"weight_mu.shape[0] ({which}) must be divisible by groups ({spec.groups}), "
                         f"got shape {tuple(weight_mu.shape)}")
    if (bias_mu is None) != (bias_rho is None):
        raise ValueError("bias_mu and bias_rho must both be given or both be None")
    if bias_mu is not None:
        _check_weight_pair(bias_mu, bias_rho, "bias")
        _, out_channels = _weight_channels(weight_mu, spec)
        if bias_mu.shape != (out_channels,):
            raise ValueError(f"bias_mu must have shape ({out_channels},), got {tuple(bias_mu.shape)}")
        if bias_mu.dtype != weight_mu.dtype:
            raise TypeError(f"bias_mu must have the dtype of weight_mu ({weight_mu.dtype}), got {bias_mu.dtype}")
        if bias_mu.device != weight_mu.device:
            raise ValueError(f"bias_mu must be on the device of weight_mu ({weight_mu.device}), got {bias_mu.device}")


# ---- the fused op -------------------------------------------------------------------------------

@fused_custom_op("bayes_ext::conv_reparam")
def _conv_reparam(x: Tensor, weight_mu: Tensor, weight_rho: Tensor, bias_mu: Optional[Tensor],
                  bias_rho: Optional[Tensor], seed: Tensor, stride: List[int], padding: List[int],
                  dilation: List[int], transposed: bool, output_padding: List[int], groups: int,
                  prior_pi: float, prior_sigma1: float, prior_sigma2: float) -> Tuple[Tensor, Tensor, Tensor]:
    ops = _backend.ops()
    # under autocast x arrives in the low precision: the weight is sampled (and the KL summed) in
    # the parameters' dtype, then cast for the convolution
    w, log_q, log_p = ops.sample_weight(weight_mu, weight_rho, seed, 0, prior_pi, prior_sigma1, prior_sigma2)
    b = None
    if bias_mu is not None:
        b, log_q_b, log_p_b = ops.sample_weight(bias_mu, bias_rho, seed, 1, prior_pi, prior_sigma1, prior_sigma2)
        log_q, log_p = log_q + log_q_b, log_p + log_p_b
        b = b.to(x.dtype)
    y = torch.ops.aten.convolution(x, w.to(x.dtype), b, stride, padding, dilation, transposed, output_padding, groups)
    return y, log_q, log_p


@_conv_reparam.register_fake
def _(x, weight_mu, weight_rho, bias_mu, bias_rho, seed, stride, padding, dilation, transposed, output_padding,
      groups, prior_pi, prior_sigma1, prior_sigma2):
    y = torch.ops.aten.convolution(x, weight_mu.to(x.dtype), None if bias_mu is None else bias_mu.to(x.dtype),
                                   stride, padding, dilation, transposed, output_padding, groups)
    return y, weight_mu.new_empty(()), weight_mu.new_empty(())


def _conv_reparam_setup_context(ctx, inputs, output):
    (x, weight_mu, weight_rho, bias_mu, bias_rho, seed, stride, padding, dilation, transposed, output_padding,
     groups, prior_pi, prior_sigma1, prior_sigma2) = inputs
    # Only the input is new memory; W is rebuilt from (seed, offset 0) in backward.
    ctx.save_for_backward(x, weight_mu, weight_rho, bias_mu, bias_rho, seed)
    ctx.conv = (stride, padding, dilation, transposed, output_padding, groups)
    ctx.prior = (prior_pi, prior_sigma1, prior_sigma2)
    ctx.ops = _backend.ops()


def _conv_reparam_backward(ctx, grad_out, grad_log_q, grad_log_p):
    x, weight_mu, weight_rho, bias_mu, bias_rho, seed = saved_tensors(ctx)
    ops, prior = ctx.ops, ctx.prior
    stride, padding, dilation, transposed, output_padding, groups = ctx.conv
    convolution_backward = torch.ops.aten.convolution_backward
    zero = weight_mu.new_zeros(())
    grad_log_q = zero if grad_log_q is None else grad_log_q
    grad_log_p = zero if grad_log_p is None else grad_log_p
    need_x = ctx.needs_input_grad[0] and grad_out is not None
    need_w = ctx.needs_input_grad[1] or ctx.needs_input_grad[2]
    need_b = bias_mu is not None and (ctx.needs_input_grad[3] or ctx.needs_input_grad[4])

    grad_mu = grad_rho = grad_x = w = None
    if need_w:
        grad_w = None
        if grad_out is not None:
            # with output_mask (False, True, False) the weight argument is only read for its
            # shape, dtype and layout (torch.nn.grad.conv*d_weight passes an expanded placeholder)
            weight_like = weight_mu.new_empty((), dtype=x.dtype).expand(weight_mu.shape)
            grad_w = convolution_backward(grad_out.to(x.dtype), x, weight_like, None, stride, padding, dilation,
                                          transposed, output_padding, groups, [False, True, False])[1]
            grad_w = grad_w.to(weight_mu.dtype)
        grad_mu, grad_rho, w = ops.sample_weight_backward(grad_w, grad_log_q, grad_log_p, weight_mu, weight_rho,
                                                          seed, 0, *prior, need_x)
    elif need_x:
        w = ops.sample_weight(weight_mu, weight_rho, seed, 0, *prior)[0]
    if need_x:
        grad_x = convolution_backward(grad_out.to(x.dtype), x, w.to(x.dtype), None, stride, padding, dilation,
                                      transposed, output_padding, groups, [True, False, False])[0]
    grad_bias_mu = grad_bias_rho = None
    if need_b:
        grad_b = None
        if grad_out is not None:
            grad_b = grad_out.sum([0] + list(range(2, grad_out.dim())), dtype=bias_mu.dtype)
        grad_bias_mu, grad_bias_rho, _ = ops.sample_weight_backward(grad_b, grad_log_q, grad_log_p, bias_mu,
                                                                    bias_rho, seed, 1, *prior, False)
    return (grad_x, grad_mu, grad_rho, grad_bias_mu, grad_bias_rho) + (None,) * 10


_conv_reparam.register_autograd(_conv_reparam_backward, setup_context=_conv_reparam_setup_context)


# ---- entry points ---------------------------------------------------------------------------------

def _autocast_dtype(x: Tensor, weight: Tensor) -> Optional[torch.dtype]:
    """The dtype nn.Conv*d would run in under an active autocast (float32 parameters only, as
    autocast leaves float64 alone), or None."""
    dtype = BF.autocast_dtype(x)
    return dtype if dtype is not None and weight.dtype == torch.float32 else None


def autocast_input(x, weight: Tensor):
    """Under torch.autocast the convolution runs in the autocast dtype, like nn.Conv*d (F.conv*d are
    on autocast's lists; the aten.convolution the op calls is not, so the cast is done here and the
    sampled weights are cast inside the op). The KL stays in the parameters' dtype."""
    if isinstance(x, Tensor) and x.is_floating_point():
        dtype = _autocast_dtype(x, weight)
        if dtype is not None and x.dtype != dtype:
            return x.to(dtype)
    return x


def _pre_pad(x: Tensor, spec: ConvSpec) -> Tensor:
    if spec.pre_pad is None:
        return x
    if spec.pre_pad_mode == "constant":
        return F.pad(x, spec.pre_pad)
    return F.pad(x, spec.pre_pad, mode=spec.pre_pad_mode)


def bayesian_conv_spec(x: Tensor, weight_mu: Tensor, weight_rho: Tensor, bias_mu: Optional[Tensor],
                       bias_rho: Optional[Tensor], seed: Tensor, spec: ConvSpec,
                       prior: ScaleMixture) -> Tuple[Tensor, Tensor, Tensor]:
    """bayesian_conv with an already validated spec, parameters, seed and prior (what the layers
    call on every forward); only the input is checked."""
    x = autocast_input(x, weight_mu)
    batched = check_conv_input(x, weight_mu, spec)
    x = _pre_pad(x if batched else x.unsqueeze(0), spec)
    op = (torch.ops.bayes_ext.conv_reparam_layer.default
          if _eager_layer_op(x, weight_mu, weight_rho, bias_mu, bias_rho, seed) else _conv_reparam)
    y, log_q, log_p = op(x, weight_mu, weight_rho, bias_mu, bias_rho, seed, spec.stride, spec.padding, spec.dilation,
                         spec.transposed, spec.output_padding, spec.groups, *prior)
    return (y if batched else y.squeeze(0)), log_q, log_p


def _eager_layer_op(x: Tensor, weight_mu: Tensor, weight_rho: Tensor, bias_mu: Optional[Tensor],
                    bias_rho: Optional[Tensor], seed: Tensor) -> bool:
    """bayes_ext::conv_reparam_layer applies: the same computation as _conv_reparam in one C++ call
    each way, its autograd in C++ (csrc/cpu/conv_reparam_layer.cpp), on the linear op's terms (an
    eager compiled call on the CPU or CUDA with x in the weights' dtype or autocast's bf16 / fp16
    with float32 weights)."""
    return BF._eager_layer_op(x, weight_mu, weight_rho, bias_mu, bias_rho, seed)


def conv_with_weight(x: Tensor, weight: Tensor, bias: Optional[Tensor], spec: ConvSpec) -> Tensor:
    """The convolution of `spec` with given weights (mean weights of a frozen layer, or samples)."""
    x = autocast_input(x, weight)
    batched = check_conv_input(x, weight, spec)
    x = _pre_pad(x if batched else x.unsqueeze(0), spec)
    y = torch.ops.aten.convolution(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype), spec.stride,
                                   spec.padding, spec.dilation, spec.transposed, spec.output_padding, spec.groups)
    return y if batched else y.squeeze(0)


def validated_spec(weight_mu, weight_rho, bias_mu, bias_rho, seed, stride, padding, dilation, groups, transposed,
                   output_padding):
    """(ConvSpec, seed) of a functional conv call, its parameters checked; a seed drawn if None."""
    _checks.check_tensor(weight_mu, "weight_mu")
    if weight_mu.dim() not in (3, 4, 5):
        raise ValueError(f"weight_mu must be 3-, 4- or 5-D (a 1-d, 2-d or 3-d convolution weight), "
                         f"got shape {tuple(weight_mu.shape)}")
    if not isinstance(transposed, bool):
        raise TypeError(f"transposed must be a bool, got {transposed!r}")
    spec = conv_spec(weight_mu.dim() - 2, tuple(weight_mu.shape[2:]), stride, padding, dilation, groups, transposed,
                     output_padding)
    check_conv_params(weight_mu, weight_rho, bias_mu, bias_rho, spec)
    seed = BF.draw_seed() if seed is None else seed
    _checks.check_seed(seed, weight_mu)
    return spec, seed


def bayesian_conv(x: Tensor, weight_mu: Tensor, weight_rho: Tensor, bias_mu: Optional[Tensor] = None,
                  bias_rho: Optional[Tensor] = None, seed: Optional[Tensor] = None,
                  stride: Union[int, Sequence[int]] = 1, padding: Union[int, Sequence[int], str] = 0,
                  dilation: Union[int, Sequence[int]] = 1, groups: int = 1, transposed: bool = False,
                  output_padding: Union[int, Sequence[int]] = 0,
                  prior: ScaleMixture = (1.0, 0.1, 0.002)) -> Tuple[Tensor, Tensor, Tensor]:
    """y = conv(x, W, b) (``F.conv{n}d``, or ``F.conv_transpose{n}d`` when ``transposed``) with
    W ~ N(weight_mu, softplus(weight_rho)^2) and b likewise; returns (y, log_q, log_p).

    The dimensionality comes from ``weight_mu`` (3-, 4- or 5-D). The weight uses Philox stream
    (seed, 0) and the bias (seed, 1); a fresh seed is drawn when ``seed`` is None. ``padding`` may
    be ``'same'`` (stride 1; an even kernel pads one more on the right, as torch does) or ``'valid'``
    for a non-transposed convolution. The backward regenerates W from the seed, so only the
    input is kept for it.
    """
    spec, seed = validated_spec(weight_mu, weight_rho, bias_mu, bias_rho, seed, stride, padding, dilation, groups,
                                transposed, output_padding)
    pi, sigma1, sigma2 = _checks.prior_values(prior)
    return bayesian_conv_spec(x, weight_mu, weight_rho, bias_mu, bias_rho, seed, spec, (pi, sigma1, sigma2))
