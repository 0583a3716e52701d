"""Functional forms of the Bayesian ops, in the style of torch.nn.functional.

- ``draw_seed()``: the per-forward seed, from torch's default CPU generator.
- ``sample_weight``: w = mu + softplus(rho) * eps with log q(w) and log p(w), differentiable.
- ``bayesian_linear``: sample + matmul as one op whose backward rebuilds W from the seed, so a
  training forward keeps only the input alive (like nn.Linear), whatever ``sample_nbr`` is.
- ``mean_weight_kl_terms``: log q and log p evaluated at w = mu (what frozen layers report).
"""
import contextlib
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _backend, _checks, _fallback, _recorded
from . import _ops  # noqa: F401  (registers fake kernels and autograd)
from ._fused_op import _functorch_active, _plain, fused_custom_op
from ._saved_inputs import saved_tensors

ScaleMixture = Tuple[float, float, float]  # (pi, sigma1, sigma2)
SEED_HIGH = 2 ** 63 - 1


def draw_seed(generator: Optional[torch.Generator] = None) -> Tensor:
    """A 63-bit seed from `generator` (default: torch's default CPU generator).

    Drawing from the CPU generator means ``torch.manual_seed(s)`` fixes every sample on every
    device and backend. Inside CUDA graph capture a host seed would be frozen into the graph (every
    replay the same noise), so there the seed comes from torch's CUDA generator, which advances its
    Philox offset on every replay the way PyTorch's own random kernels do: fresh noise per replay.
    """
    if generator is None and _capturing_cuda_graph():
        return torch.randint(0, SEED_HIGH, (), dtype=torch.int64, device="cuda")
    return torch.randint(0, SEED_HIGH, (), dtype=torch.int64, generator=generator)


def _capturing_cuda_graph() -> bool:
    # is_initialized first: asking a CUDA build about capture must not create a CUDA context on CPU runs
    return (not torch.compiler.is_compiling() and torch.cuda.is_initialized()
            and torch.cuda.is_current_stream_capturing())


def sample_weight(mu: Tensor, rho: Tensor, seed: Tensor, offset: int = 0,
                  prior: ScaleMixture = (1.0, 0.1, 0.4)) -> Tuple[Tensor, Tensor, Tensor]:
    """(w, log_q, log_p) for w = mu + softplus(rho) * eps, eps from Philox stream (seed, offset)."""
    pi, sigma1, sigma2 = _checks.prior_values(prior)
    return _backend.ops().sample_weight(mu, rho, seed, offset, pi, sigma1, sigma2)


def sample_kl(mu: Tensor, rho: Tensor, seed: Tensor, offset: int = 0,
              prior: ScaleMixture = (1.0, 0.1, 0.4)) -> Tuple[Tensor, Tensor]:
    """(log_q, log_p) of sample_weight's w for the same stream, without writing w (one fused pass;
    differentiable): the MC KL terms for layers that never use the sampled weight."""
    pi, sigma1, sigma2 = _checks.prior_values(prior)
    return _backend.ops().sample_kl(mu, rho, seed, offset, pi, sigma1, sigma2)


def log_prior_sum(w: Tensor, prior: ScaleMixture) -> Tensor:
    """sum log(pi N(w; 0, s1) + (1 - pi) N(w; 0, s2)) in log space (finite for every w)."""
    return _fallback.log_prior_terms(w, *prior).sum()


def mean_weight_kl_terms(mu: Tensor, rho: Tensor, prior: ScaleMixture) -> Tuple[Tensor, Tensor]:
    """(log q(mu), log p(mu)): the KL terms of the weights a frozen layer actually uses (eps = 0),
    summed in float32 for bf16 / fp16 parameters (modules/_low_precision.py)."""
    if mu.dtype in (torch.float16, torch.bfloat16):
        mu, rho = mu.float(), rho.float()
    _, log_sigma, _, _ = _fallback.softplus_terms(rho)
    log_q = -log_sigma.sum() - _fallback.HALF_LOG_2PI * mu.numel()
    return log_q, log_prior_sum(mu, prior)


def autocast_dtype(x: Tensor) -> Optional[torch.dtype]:
    """The autocast dtype active for x's device type, or None."""
    device_type = x.device.type
    if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


_NO_CONTEXT = contextlib.nullcontext()


def autocast_off(device_type: str):
    """``torch.autocast(device_type, enabled=False)``, or a no-op context when autocast is off
    anyway: entering an autocast context costs ~5 us, a noticeable share of a small layer's step."""
    return torch.autocast(device_type, enabled=False) if torch.is_autocast_enabled(device_type) else _NO_CONTEXT


def check_input(x: Tensor, weight: Tensor, feature_dim: int, name: str = "input") -> None:
    """Clear errors for a layer input: type, dtype, device, feature size."""
    _checks.check_tensor(x, name)
    if not x.is_floating_point() or (x.dtype != weight.dtype and autocast_dtype(x) is None):
        raise TypeError(f"{name} must have the dtype of the layer's parameters ({weight.dtype}), got {x.dtype}")
    if x.device != weight.device:
        raise ValueError(f"{name} must be on the device of the layer's parameters ({weight.device}), got {x.device}")
    if x.dim() == 0 or x.shape[-1] != feature_dim:
        raise ValueError(f"{name} must have {feature_dim} features in its last dimension, got shape {tuple(x.shape)}")


# ---- fused reparameterised linear layer ---------------------------------------------------------

# Mixed precision: x may be in a lower precision than the fp32 parameters (autocast). The weight
# is sampled in the parameters' dtype, cast to x's for the matmul, and the KL stays in fp32.
#
# Large weights on the CPU are processed in blocks of rows (the ops' `start` gives each block the
# noise it has in the whole weight): a block of W is sampled into a cache-sized buffer and
# consumed by the matmul while it is still in cache, and no weight-sized temporary (W, grad_W) is
# ever allocated, whose page faults alone cost as much as a streaming pass.
BLOCK_ELEMENTS = 1 << 18  # weight elements per block: 1 MB in fp32


# The pure-PyTorch kernels stream their chunks through eager ops anyway, so cache-sized blocks buy
# them nothing and cost one more call (and GEMM) each: they take 16 MB blocks, which keeps the
# weight-sized temporaries of a large layer bounded (measured on 2 cores: 64x1024x1024 step 32 ->
# 29 ms, 1024^3 56 -> 53 ms against 1 MB blocks).
FALLBACK_BLOCK_ELEMENTS = 1 << 22


# The LRT streams sigma^2 blocks into GEMMs that are bigger per block than the sampled W's, and
# fewer, larger GEMMs won over cache residency there (2 cores, interleaved bench harness, LRT /
# nn.Linear: 64x1024x1024 2.82-2.92x -> 2.74-2.86x, 1024^3 2.61-2.64x -> 2.40-2.46x, 16x4096^2
# 3.05x -> 2.91-3.02x against 1 MB blocks).
LRT_BLOCK_ELEMENTS = 1 << 20


def _block_rows(weight: Tensor, compiled_block_elements: Optional[int] = None) -> int:
    """Rows per block of a (out_features, in_features) weight; out_features: one block. Blocks hold
    compiled_block_elements (default BLOCK_ELEMENTS) under the compiled kernels."""
    out_features, in_features = weight.shape
    if _backend.get_backend() == "compiled":
        block_elements = BLOCK_ELEMENTS if compiled_block_elements is None else compiled_block_elements
    else:
        block_elements = FALLBACK_BLOCK_ELEMENTS
    if weight.device.type != "cpu" or weight.numel() <= 2 * block_elements:
        return out_features
    return max(1, block_elements // in_features)


def _row_blocks(weight: Tensor, compiled_block_elements: Optional[int] = None):
    if _recorded.rebuilding():  # a forward rebuilt for autograd (and vmap) is written whole
        return [(0, weight.shape[0])]
    out_features, step = weight.shape[0], _block_rows(weight, compiled_block_elements)
    return [(r, min(r + step, out_features)) for r in range(0, out_features, step)]


def weight_grad_pair(weight: Tensor) -> Tuple[Tensor, Tensor]:
    """Two uninitialised weight-shaped gradients (mu's and rho's), halves of one allocation. glibc
    gives the top of its heap back to the OS once more than twice its largest recent allocation is
    free there, so two fresh gradients that zero_grad(set_to_none=True) freed together were unmapped
    and page-faulted in again every step (64x1024x1024 LRT step in a loop of its own, 2 cores: 8.1-8.6
    -> 5.7-6.2 ms, ~1800 -> ~90 page faults a step; the blocked reparam step ~530-830 -> ~330). Every
    blocked backward allocates its weight gradients so. Mirrors layer_op::weight_grad_pair (C++).
    A layer that trains mu with rho frozen keeps the unused half alive beside mu's .grad.
    A traced backward (torch.compile: fake or functional tensors) gets two buffers: the compiler plans
    its own memory, and torch 2.5's inductor miscompiles in-place ops on two views of one buffer
    (garbage dL/drho from the LRT backward)."""
    if not _plain((weight,)):
        return (torch.empty_like(weight, memory_format=torch.contiguous_format),
                torch.empty_like(weight, memory_format=torch.contiguous_format))
    pair = weight.new_empty((2,) + tuple(weight.shape))
    return pair[0], pair[1]


_MM_OUT_DTYPE = [True]  # aten::mm.dtype usable here (CUDA, torch >= 2.8); cleared on first failure


def mm_in_dtype(a: Tensor, b: Tensor, dtype: torch.dtype) -> Tensor:
    """a @ b as a `dtype` tensor. Under CUDA autocast the bf16 / fp16 operands accumulate straight
    into an fp32 result (aten::mm.dtype): no low-precision product to write, read back and cast."""
    if a.dtype != dtype and a.is_cuda and _MM_OUT_DTYPE[0]:
        try:
            return torch.mm(a, b, out_dtype=dtype)
        except (RuntimeError, TypeError):  # an older torch, or a dtype pair cuBLAS lacks
            _MM_OUT_DTYPE[0] = False
    return a.mm(b).to(dtype)


@fused_custom_op("bayes_ext::linear_reparam")
def _linear_reparam(x: Tensor, weight_mu: Tensor, weight_rho: Tensor, bias_mu: Optional[Tensor],
                    bias_rho: Optional[Tensor], seed: Tensor, prior_pi: float, prior_sigma1: float,
                    prior_sigma2: float) -> Tuple[Tensor, Tensor, Tensor]:
    ops, prior = _backend.ops(), (prior_pi, prior_sigma1, prior_sigma2)
    out_features, in_features = weight_mu.shape
    weight_mu, weight_rho = weight_mu.contiguous(), weight_rho.contiguous()
    with autocast_off(x.device.type):
        blocks = _row_blocks(weight_mu)
        if len(blocks) == 1:
            w, log_q, log_p = ops.sample_weight(weight_mu, weight_rho, seed, 0, *prior)
            if bias_mu is not None:  # the bias added by the matmul itself (one launch fewer on a GPU)
                b, log_q_b, log_p_b = ops.sample_weight(bias_mu, bias_rho, seed, 1, *prior)
                return F.linear(x, w.to(x.dtype), b.to(x.dtype)), log_q + log_q_b, log_p + log_p_b
            return F.linear(x, w.to(x.dtype)), log_q, log_p
        x_2d = x.reshape(-1, in_features)
        y = x.new_empty(x_2d.shape[0], out_features)
        log_q = log_p = 0
        for r0, r1 in blocks:
            w, q, p = ops.sample_weight(weight_mu[r0:r1], weight_rho[r0:r1], seed, 0, *prior, r0 * in_features)
            y[:, r0:r1] = x_2d.mm(w.t().to(x.dtype))
            log_q, log_p = log_q + q, log_p + p
        y = y.reshape(x.shape[:-1] + (out_features,))
        if bias_mu is not None:
            b, log_q_b, log_p_b = ops.sample_weight(bias_mu, bias_rho, seed, 1, *prior)
            y = y + b.to(x.dtype)
            log_q, log_p = log_q + log_q_b, log_p + log_p_b
        return y, log_q, log_p


@_linear_reparam.register_fake
def linear_op_fake(x, weight_mu, weight_rho, bias_mu, bias_rho, seed, prior_pi, prior_sigma1, prior_sigma2):
    """Fake kernel of the linear ops returning (y, log_q, log_p) (reparam, flipout)."""
    out = x.new_empty(x.shape[:-1] + (weight_mu.shape[0],))
    return out, weight_mu.new_empty(()), weight_mu.new_empty(())


def linear_op_setup_context(ctx, inputs, output):
    """setup_context of the linear ops taking (x, weight_mu, weight_rho, bias_mu, bias_rho, seed or
    seeds, pi, sigma1, sigma2): only the input is new memory, the backward rebuilds the noise (W,
    dW and the signs, or each sample's W) from the seed(s)."""
    x, weight_mu, weight_rho, bias_mu, bias_rho, seed, prior_pi, prior_sigma1, prior_sigma2 = inputs
    ctx.save_for_backward(x, weight_mu, weight_rho, bias_mu, bias_rho, seed)
    ctx.prior = (prior_pi, prior_sigma1, prior_sigma2)
    ctx.ops = _backend.ops()


def _linear_reparam_backward(ctx, grad_out, grad_log_q, grad_log_p):
    x, weight_mu, weight_rho, bias_mu, bias_rho, seed = saved_tensors(ctx)
    ops, prior = ctx.ops, ctx.prior
    if grad_log_q is None or grad_log_p is None:  # (a CUDA launch: only when an output went unused)
        zero = weight_mu.new_zeros(())
        grad_log_q = zero if grad_log_q is None else grad_log_q
        grad_log_p = zero if grad_log_p is None else grad_log_p
    out_features, in_features = weight_mu.shape
    weight_mu, weight_rho = weight_mu.contiguous(), weight_rho.contiguous()
    need_x = ctx.needs_input_grad[0]
    with autocast_off(x.device.type):
        grad_out_2d = grad_out.reshape(-1, out_features).to(x.dtype)
        x_2d = x.reshape(-1, in_features)
        blocks = _row_blocks(weight_mu)
        if len(blocks) == 1 and weight_mu.is_cuda:
            # dL/dx first, from W rebuilt by the sampling kernel and freed before the two gradients
            # exist; then the CUDA kernel turns the grad_w buffer into grad_mu in place (each element
            # read before it is written). The step holds nn.Linear's memory plus one weight copy
            # (grad_rho), not three. The CPU kernels take __restrict__ pointers (no aliasing), and
            # there the out-of-place op below costs ~10 us less a call than the mutating one.
            grad_x = None
            if need_x:
                grad_x = grad_out_2d.mm(ops.sample_weight(weight_mu, weight_rho, seed, 0, *prior)[0].to(x.dtype))
            grad_mu = mm_in_dtype(grad_out_2d.t(), x_2d, weight_mu.dtype)
            grad_rho = torch.empty_like(grad_mu)
            ops.sample_weight_backward_into(grad_mu, grad_rho, grad_mu, grad_log_q, grad_log_p, weight_mu,
                                            weight_rho, seed, 0, *prior, False, 0)
        elif len(blocks) == 1:
            grad_w = mm_in_dtype(grad_out_2d.t(), x_2d, weight_mu.dtype)
            grad_mu, grad_rho, w = ops.sample_weight_backward(grad_w, grad_log_q, grad_log_p, weight_mu, weight_rho,
                                                              seed, 0, *prior, need_x)
            grad_x = grad_out_2d.mm(w.to(x.dtype)) if need_x else None
        else:
            grad_mu, grad_rho = weight_grad_pair(weight_mu)
            grad_x = x_2d.new_zeros(x_2d.shape) if need_x else None
            for r0, r1 in blocks:
                grad_w = grad_out_2d[:, r0:r1].t().mm(x_2d).to(weight_mu.dtype)
                # written straight into the rows of the whole gradients (no block-sized copies)
                w = ops.sample_weight_backward_into(grad_mu[r0:r1], grad_rho[r0:r1], grad_w, grad_log_q, grad_log_p,
                                                    weight_mu[r0:r1], weight_rho[r0:r1], seed, 0, *prior, need_x,
                                                    r0 * in_features)
                if need_x:
                    grad_x.addmm_(grad_out_2d[:, r0:r1], w.to(x.dtype))
        if grad_x is not None:
            grad_x = grad_x.reshape(x.shape)
        grad_bias_mu = grad_bias_rho = None
        if bias_mu is not None:
            grad_b = grad_out_2d.sum(0, dtype=bias_mu.dtype)
            grad_bias_mu, grad_bias_rho, _ = ops.sample_weight_backward(grad_b, grad_log_q, grad_log_p, bias_mu,
                                                                        bias_rho, seed, 1, *prior, False)
    return grad_x, grad_mu, grad_rho, grad_bias_mu, grad_bias_rho, None, None, None, None


_linear_reparam.register_autograd(_linear_reparam_backward, setup_context=linear_op_setup_context)


LRT_NOISE_OFFSET = 2  # Philox stream of the output noise (0 and 1 are the weight's and the bias's)


def linear_lrt(x: Tensor, weight_mu: Tensor, weight_rho: Tensor, bias_mu: Optional[Tensor] = None,
               bias_rho: Optional[Tensor] = None, seed: Optional[Tensor] = None) -> Tensor:
    """Local reparameterisation (Kingma, Salimans, Welling 2015): the pre-activations of
    W ~ N(mu, sigma^2) are Gaussian, y = x mu^T + b_mu + sqrt(x^2 (sigma^2)^T + sigma_b^2) * eps, with
    eps of the output's shape from Philox stream (seed, 2). Per-example noise, no O x I sample.

    The fused op with a hand-written backward lives in bayes_ext.functional_estimators (imported
    here lazily: it builds on this module).
    """
    from .functional_estimators import linear_lrt as fused_linear_lrt
    return fused_linear_lrt(x, weight_mu, weight_rho, bias_mu, bias_rho, seed)


def check_linear_params(weight_mu: Tensor, weight_rho: Tensor, bias_mu: Optional[Tensor],
                        bias_rho: Optional[Tensor]) -> None:
    """Shapes, dtypes and devices of a linear layer's posterior parameters (clear errors)."""
    _checks.check_posterior_params(weight_mu, weight_rho, "weight_mu", "weight_rho")
    if weight_mu.dim() != 2:
        raise ValueError(f"weight_mu must be 2-D (out_features, in_features), got shape {tuple(weight_mu.shape)}")
    if weight_mu.numel() == 0:  # as BayesianLinear's constructor and the conv functionals
        raise ValueError(f"weight_mu must not be empty, got shape {tuple(weight_mu.shape)}")
    if (bias_mu is None) != (bias_rho is None):
        raise ValueError("bias_mu and bias_rho must both be given or both be None")
    if bias_mu is not None:
        _checks.check_posterior_params(bias_mu, bias_rho, "bias_mu", "bias_rho")
        if bias_mu.dtype != weight_mu.dtype:  # (the Flipout and LRT ops added a float64 bias to float32 outputs)
            raise TypeError(f"bias_mu must have the dtype of weight_mu ({weight_mu.dtype}), got {bias_mu.dtype}")
        if bias_mu.device != weight_mu.device:
            raise ValueError(f"bias_mu must be on the device of weight_mu ({weight_mu.device}), got {bias_mu.device}")
        if bias_mu.shape != (weight_mu.shape[0],):
            raise ValueError(f"bias_mu must have shape ({weight_mu.shape[0]},), got {tuple(bias_mu.shape)}")


def prepare_linear_input(x: Tensor, weight_mu: Tensor, weight_rho: Tensor, bias_mu: Optional[Tensor],
                         bias_rho: Optional[Tensor]) -> Tensor:
    """Validate a linear layer's parameters and input; x cast to the active autocast dtype."""
    check_linear_params(weight_mu, weight_rho, bias_mu, bias_rho)
    check_input(x, weight_mu, weight_mu.shape[1])
    low_precision = autocast_dtype(x)
    return x if low_precision is None else x.to(low_precision)


def prepare_linear_call(x: Tensor, weight_mu: Tensor, weight_rho: Tensor, bias_mu: Optional[Tensor],
                        bias_rho: Optional[Tensor], seed: Optional[Tensor]) -> Tuple[Tensor, Tensor]:
    """Validate a linear layer call, cast x to the active autocast dtype and draw a seed if none is
    given: (x, seed), what every fused linear op takes."""
    x = prepare_linear_input(x, weight_mu, weight_rho, bias_mu, bias_rho)
    seed = draw_seed() if seed is None else seed
    _checks.check_seed(seed, weight_mu)
    return x, seed


def bayesian_linear(x: Tensor, weight_mu: Tensor, weight_rho: Tensor, bias_mu: Optional[Tensor] = None,
                    bias_rho: Optional[Tensor] = None, seed: Optional[Tensor] = None,
                    prior: ScaleMixture = (1.0, 0.1, 0.4)) -> Tuple[Tensor, Tensor, Tensor]:
    """y = x W^T + b with W ~ N(weight_mu, softplus(weight_rho)^2), b likewise; returns (y, log_q, log_p).

    The weight uses Philox stream (seed, 0) and the bias (seed, 1). A fresh seed is drawn when
    ``seed`` is None.
    """
    x_for_op = _layer_op_input(x, weight_mu, weight_rho, bias_mu, bias_rho, seed, True) if three_floats(prior) else None
    if x_for_op is not None:
        seed = draw_seed() if seed is None else seed
        with worded_errors(lambda: (prepare_linear_call(x, weight_mu, weight_rho, bias_mu, bias_rho, seed),
                                    _checks.prior_values(prior))):
            return torch.ops.bayes_ext.linear_reparam_rows.default(x_for_op, weight_mu, weight_rho, bias_mu, bias_rho,
                                                                   seed, *prior, _block_rows(weight_mu))
    x, seed = prepare_linear_call(x, weight_mu, weight_rho, bias_mu, bias_rho, seed)
    pi, sigma1, sigma2 = _checks.prior_values(prior)
    if _eager_layer_op(x, weight_mu, weight_rho, bias_mu, bias_rho, seed):
        # the same computation as _linear_reparam in one compiled call each way, its autograd in C++
        # (csrc/cpu/linear_reparam_cpu.cpp, registered for the CPU and CUDA)
        return torch.ops.bayes_ext.linear_reparam_rows(x, weight_mu, weight_rho, bias_mu, bias_rho, seed, pi, sigma1,
                                                       sigma2, _block_rows(weight_mu))
    return _linear_reparam(x, weight_mu, weight_rho, bias_mu, bias_rho, seed, pi, sigma1, sigma2)


def eager_compiled_call(x: Tensor, tensors, device_types=("cpu",)) -> bool:
    """An eager call with the compiled kernels on one of `device_types` (by default the CPU, where
    all of them are registered), on plain tensors: where the one-call C++ layer ops
    (csrc/cpu/linear_*_cpu.cpp, autograd in C++) may replace a Python custom op. torch.compile,
    tensor subclasses and functorch transforms keep the custom op (its fake kernel, its registered
    autograd)."""
    return (x.device.type in device_types and _backend.ops() is torch.ops.bayes_ext
            and not torch.compiler.is_compiling() and _plain(tensors) and not _functorch_active())


# with float32 weights: what the layer ops (linear_reparam_rows, conv_reparam_layer, linear_lrt_rows,
# linear_flipout_rows) accept besides x in the weights' dtype
_AUTOCAST_X_DTYPES = (torch.bfloat16, torch.float16)


def layer_op_takes(x: Tensor, weight_mu: Tensor) -> bool:
    """x's dtype is one the one-call layer ops take: the weights', or autocast's bf16 / fp16 with
    float32 weights (their GEMMs then run in x's dtype, the weight passes in float32, as in the
    Python ops, bit for bit). Other mixes keep the Python ops, whose checks word the error."""
    return x.dtype == weight_mu.dtype or (weight_mu.dtype == torch.float32 and x.dtype in _AUTOCAST_X_DTYPES)


def _layer_op_input(x, weight_mu, weight_rho, bias_mu, bias_rho, seed, cuda: bool) -> Optional[Tensor]:
    """The eager fast path of the functionals in front of the one-call C++ layer ops
    (linear_reparam_rows, and on the CPU linear_lrt_rows and linear_flipout_rows): x as the op takes
    it, or None where the checked path must run. The call must be one eager_compiled_call lets through
    (on the CPU, or on CUDA where `cuda` says the op is registered there), with x in the weights' dtype
    or, under autocast, cast to its dtype (layer_op_takes). The op checks everything else itself, so
    the Python checks (~10 us a call; on a GPU's host a bf16 4096^3 layer step is host-bound) run only
    to word an error it raised: ``worded_errors``."""
    if not (isinstance(x, torch.Tensor) and isinstance(weight_mu, torch.Tensor)):
        return None
    if not eager_compiled_call(x, (x, weight_mu, weight_rho, bias_mu, bias_rho, seed),
                               ("cpu", "cuda") if cuda else ("cpu",)):
        return None
    low_precision = autocast_dtype(x)
    if low_precision is None:
        return x if x.dtype == weight_mu.dtype else None
    if weight_mu.dtype == torch.float32 and low_precision in _AUTOCAST_X_DTYPES and x.is_floating_point():
        return x.to(low_precision)
    return None


def three_floats(prior) -> bool:
    """A prior the layer ops take as it is: a tuple of three Python floats (what the layers pass)."""
    return (type(prior) is tuple and len(prior) == 3 and type(prior[0]) is float and type(prior[1]) is float
            and type(prior[2]) is float)


class worded_errors:
    """Around a fast-path op call: when the op raises, `run_checks()` runs the Python checks, which raise
    their own error (naming the arguments as the caller passed them); the op's error goes on when they
    find nothing. (A class: a generator-based context manager costs ~1 us a call.)"""

    __slots__ = ("run_checks",)

    def __init__(self, run_checks):
        self.run_checks = run_checks

    def __enter__(self):
        return None

    def __exit__(self, exc_type, exc, traceback):
        if exc_type is not None and issubclass(exc_type, (RuntimeError, TypeError, ValueError, IndexError)):
            self.run_checks()
        return False


def _eager_layer_op(x: Tensor, weight_mu: Tensor, weight_rho: Tensor, bias_mu: Optional[Tensor],
                    bias_rho: Optional[Tensor], seed: Tensor, device_types=("cpu", "cuda")) -> bool:
    """A one-call layer op applies (bayes_ext::linear_reparam_rows by default; the CPU-only LRT and
    Flipout ops pass ("cpu",)): an eager compiled call on one of `device_types` with x in a dtype the
    op takes (layer_op_takes)."""
    tensors = (x, weight_mu, weight_rho, bias_mu, bias_rho, seed)
    return layer_op_takes(x, weight_mu) and eager_compiled_call(x, tensors, device_types)
