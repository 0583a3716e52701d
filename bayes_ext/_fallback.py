"""Pure-PyTorch implementations of the sampling ops (the fallback backend).

Same signatures, same noise and same formulas as the compiled kernels (docs/design.md), so a seed
gives the same model with or without a compiler. Registered as the kernels of the
``bayes_ext_py::`` ops by bayes_ext/_ops.py.
"""
import math
import threading
from typing import Optional, Tuple

import torch
import torch.nn.functional as F

from . import _philox

HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)
SOFTPLUS_TINY_RHO = -20.0  # below it, log softplus(rho) = rho and sigmoid/softplus = 1 (see posterior_math.h)


def prior_constants(pi: float, sigma1: float, sigma2: float):
    """(a1, b1, a2, b2, mode): log p(w) = logsumexp(a1 - b1 w^2, a2 - b2 w^2); mode 1 / 2 = one component."""
    mode = 1 if pi >= 1.0 else (2 if pi <= 0.0 else 0)
    a1 = (math.log(pi) if mode == 0 else 0.0) - math.log(sigma1) - HALF_LOG_2PI
    a2 = (math.log1p(-pi) if mode == 0 else 0.0) - math.log(sigma2) - HALF_LOG_2PI
    return a1, 0.5 / sigma1 ** 2, a2, 0.5 / sigma2 ** 2, mode


def log_prior_terms(w: torch.Tensor, pi: float, sigma1: float, sigma2: float) -> torch.Tensor:
    """Elementwise log(pi N(w; 0, s1) + (1 - pi) N(w; 0, s2)), finite for every finite w."""
    a1, b1, a2, b2, mode = prior_constants(pi, sigma1, sigma2)
    w2 = w * w
    if mode == 1:
        return a1 - b1 * w2
    if mode == 2:
        return a2 - b2 * w2
    larger, log1p_term = _mixture_parts(w2, a1, b1, a2, b2)
    return larger.add_(log1p_term)


def log_prior_sum(w: torch.Tensor, pi: float, sigma1: float, sigma2: float, out=(None, None, None)) -> torch.Tensor:
    """sum of log_prior_terms(w) as a float64 scalar (its temporaries in `out`, three scratch vectors
    of w's size, when given). The sums run in w's dtype (cascade summation, ~1e-7 relative in
    float32) and are added in float64: a float64 sum of float32 data converts it all first, at 10x
    the cost."""
    a1, b1, a2, b2, mode = prior_constants(pi, sigma1, sigma2)
    if mode != 0:
        a, b = (a1, b1) if mode == 1 else (a2, b2)
        return a * w.numel() - b * torch.dot(w, w).to(torch.float64)
    larger, log1p_term = _mixture_parts(torch.mul(w, w, out=out[2]), a1, b1, a2, b2, out)
    return larger.sum().to(torch.float64) + log1p_term.sum().to(torch.float64)


def _mixture_parts(w2: torch.Tensor, a1: float, b1: float, a2: float, b2: float, out=(None, None, None)):
    """(max(x1, x2), log1p(exp(-|x1 - x2|))) for the components' logs x_k = a_k - b_k w^2: their sum
    is logaddexp(x1, x2), written out because torch.logaddexp is not vectorised on the CPU (1.5 ms
    per 256K elements, a quarter of the fallback's forward). x1 - x2 is formed from w^2 directly
    (no cancellation between two large logs). |x1 - x2| is capped at 80: exp(-80) = 2e-35 is below
    either dtype's resolution next to max(x1, x2), and beyond it exp and log1p meet subnormals (20x
    slower on the CPU). With out (three scratch vectors, w2 may be one of them) nothing is allocated;
    without, every op is out of place (log_prior_terms is differentiated through)."""
    x1 = torch.add(torch.mul(w2, -b1, out=out[0]), a1, out=out[0])
    x2 = torch.add(torch.mul(w2, -b2, out=out[1]), a2, out=out[1])
    gap = torch.add(torch.mul(w2, b2 - b1, out=out[2]), a1 - a2, out=out[2])
    gap = torch.clamp_max(torch.abs(gap, out=out[2]), 80.0, out=out[2])
    small = torch.exp(torch.neg(gap, out=out[2]), out=out[2])  # exp(-|x1 - x2|)
    return torch.maximum(x1, x2, out=out[0]), torch.log1p(small, out=out[2])


def dlog_prior(w: torch.Tensor, pi: float, sigma1: float, sigma2: float, out=(None, None)) -> torch.Tensor:
    """d log p / dw elementwise (into out[0], with out[1] as scratch, when given)."""
    a1, b1, a2, b2, mode = prior_constants(pi, sigma1, sigma2)
    if mode != 0:
        return torch.mul(w, -2.0 * (b1 if mode == 1 else b2), out=out[0])
    # -2 w (r1 b1 + (1 - r1) b2), r1 = sigmoid(x1 - x2) the first component's responsibility: a
    # sum of two non-negative terms (no cancellation), x1 - x2 formed from w^2 directly
    r1 = torch.mul(w, w, out=out[1]).mul_(b2 - b1).add_(a1 - a2).sigmoid_()
    factor = torch.sub(1.0, r1, out=out[0]).mul_(-2.0 * b2).add_(r1.mul_(-2.0 * b1))
    return factor.mul_(w)


SOFTPLUS_DIRECT_MAX_RHO = 30.0  # log1p(exp(rho)) is exact to rounding below it in either dtype


def softplus(rho: torch.Tensor, extremes: Optional[Tuple[float, float]] = None, out=None) -> torch.Tensor:
    """log(1 + exp(rho)), exact to rounding for every rho and rounded the same at every position
    (into `out` when given).

    Not F.softplus: its threshold (20) returns rho itself above it (off by up to 2e-9, which float64
    resolves), and its vector body and scalar tail use different exp/log1p, so an element's value
    would depend on where it falls in a vector. exp and log1p alone are consistent; when every rho
    is at most 30 (the usual case, checked with one reduction on the CPU) two passes suffice,
    otherwise max(rho, 0) + log1p(exp(-|rho|)) avoids the overflow in five.
    """
    if (extremes or _rho_extremes(rho))[1] <= SOFTPLUS_DIRECT_MAX_RHO:
        return torch.log1p(torch.exp(rho, out=out), out=out)
    return torch.add(rho.clamp_min(0), torch.log1p(torch.exp(-rho.abs())), out=out)


def _rho_extremes(rho: torch.Tensor) -> Tuple[float, float]:
    """(min, max) of rho for choosing a formula, one pass; (-inf, inf) where asking is not cheap or
    not possible (on a GPU it would sync; while torch.compile traces it would break the graph) or
    when rho holds a NaN, so that the exact branches are taken."""
    if rho.device.type != "cpu" or torch.compiler.is_compiling() or rho.numel() == 0:
        return -math.inf, math.inf
    low, high = (float(v) for v in torch.aminmax(rho.detach()))
    if math.isnan(low) or math.isnan(high):
        return -math.inf, math.inf
    return low, high


def _any_tiny(rho: torch.Tensor, extremes: Optional[Tuple[float, float]] = None) -> bool:
    """Whether some rho is below SOFTPLUS_TINY_RHO (or that cannot be ruled out cheaply), where the
    exact limits log sigma -> rho and sigmoid / sigma -> 1 take over."""
    return rho.numel() > 0 and (extremes or _rho_extremes(rho))[0] < SOFTPLUS_TINY_RHO


def softplus_grad_terms(rho: torch.Tensor, extremes: Optional[Tuple[float, float]] = None, out=(None, None, None)):
    """(sigma, sigmoid(rho), sigmoid(rho) / sigma = d log sigma / d rho), exact for very negative rho
    (into the three vectors of `out` when given)."""
    extremes = extremes or _rho_extremes(rho)
    sigma = softplus(rho, extremes, out=out[0])
    sig = torch.sigmoid(rho, out=out[1])
    if not _any_tiny(rho, extremes):  # the usual case: no selects (each a full pass in eager torch)
        return sigma, sig, torch.div(sig, sigma, out=out[2])
    tiny = rho < SOFTPLUS_TINY_RHO
    dlog_sigma = torch.where(tiny, 1.0 - 0.5 * torch.exp(rho), sig / torch.where(tiny, torch.ones_like(sigma), sigma))
    return sigma, sig, dlog_sigma


def log_softplus(rho: torch.Tensor, sigma: torch.Tensor, extremes: Optional[Tuple[float, float]] = None, out=None):
    """log sigma for sigma = softplus(rho), exact where sigma underflows (log softplus(rho) -> rho)."""
    if not _any_tiny(rho, extremes):
        return torch.log(sigma, out=out)
    return torch.where(rho < SOFTPLUS_TINY_RHO, rho, torch.log(sigma))


def softplus_terms(rho: torch.Tensor):
    """(sigma, log sigma, sigmoid(rho), sigmoid(rho) / sigma) with exact limits for very negative rho."""
    extremes = _rho_extremes(rho)
    sigma, sig, dlog_sigma = softplus_grad_terms(rho, extremes)
    return sigma, log_softplus(rho, sigma, extremes), sig, dlog_sigma


def host_seed(seed: torch.Tensor) -> int:
    """The seed as a Python int. This backend draws its noise with host-side arithmetic on the seed,
    which a CUDA graph would freeze at capture: refuse capture with a clear error instead."""
    if seed.is_cuda and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("bayes_ext: the pure-PyTorch backend cannot run inside CUDA graph capture (it reads "
                           "the seed on the host, so every replay would draw the same noise); build the "
                           "compiled extension with CUDA kernels to capture Bayesian layers")
    return int(seed.item())


def eps_like(t: torch.Tensor, seed: torch.Tensor, offset: int, start: int = 0) -> torch.Tensor:
    return _philox.normal(t.numel(), host_seed(seed), offset, dtype=t.dtype, device=t.device,
                          start=start).reshape(t.shape)


# The elementwise work goes chunk by chunk, right after each chunk's noise is drawn, so eager
# torch's dozen passes stay in cache instead of streaming weight-sized temporaries (CPU only:
# a GPU prefers one large launch).
CHUNK_ELEMENTS = 1 << 18
_THREAD_STATE = threading.local()


def _chunks(t: torch.Tensor):
    n = t.numel()
    step = CHUNK_ELEMENTS if t.device.type == "cpu" else max(n, 1)
    return [(b, min(b + step, n)) for b in range(0, n, step)]


def _scratch(count: int, n: int, dtype: torch.dtype, device: torch.device):
    """`count` scratch vectors of n elements for one chunk's temporaries. On the CPU they are views
    of buffers kept per thread between calls: a fresh 1 MB temporary per op page-faults its memory
    in again (glibc returns freed blocks of that size to the kernel), ~10% of a fallback train step.
    Nothing a caller receives may be a view of them."""
    if device.type != "cpu" or n > CHUNK_ELEMENTS:
        return [torch.empty(n, dtype=dtype, device=device) for _ in range(count)]
    pool = getattr(_THREAD_STATE, "scratch", None)
    if pool is None:
        pool = _THREAD_STATE.scratch = {}
    buffers = pool.get(dtype, [])
    while len(buffers) < count:
        buffers.append(torch.empty(CHUNK_ELEMENTS, dtype=dtype))
    pool[dtype] = buffers
    return [b[:n] for b in buffers[:count]]


def sample_weight(mu: torch.Tensor, rho: torch.Tensor, seed: torch.Tensor, offset: int, prior_pi: float,
                  prior_sigma1: float, prior_sigma2: float, start: int = 0, noise_only: bool = False
                  ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(w, log q, log p), or with noise_only (w - mu, log q, log p): Flipout's dW, rounded as that
    subtraction, as the kernels do."""
    mu_flat, rho_flat = mu.reshape(-1), rho.reshape(-1)
    w = torch.empty_like(mu_flat)
    acc = torch.float64  # sum in double like the kernels
    log_q = torch.zeros((), dtype=acc, device=mu.device)
    log_p = torch.zeros((), dtype=acc, device=mu.device)
    seed_value = host_seed(seed)
    for b, e in _chunks(mu_flat):
        eps, sigma, spare = _scratch(3, e - b, mu.dtype, mu.device)
        _philox.normal(e - b, seed_value, offset, dtype=mu.dtype, device=mu.device, start=start + b, out=eps)
        r = rho_flat[b:e]
        extremes = _rho_extremes(r)
        softplus(r, extremes, out=sigma)
        # w = mu + sigma eps (mul + add, not addcmul: its vector body may fuse the multiply-add
        # while its scalar tail does not, so a block of the weight would not reproduce the whole)
        w_chunk = torch.mul(sigma, eps, out=w[b:e]).add_(mu_flat[b:e])
        # float32 chunk sums (cascade summation, ~1e-7 relative) added in float64: a float64 sum
        # converts the whole chunk first, 10x the cost
        log_q -= 0.5 * torch.dot(eps, eps).to(acc) + log_softplus(r, sigma, extremes, out=spare).sum().to(acc)
        log_p += log_prior_sum(w_chunk, prior_pi, prior_sigma1, prior_sigma2, out=(eps, sigma, spare))
        if noise_only:
            w_chunk -= mu_flat[b:e]
    log_q -= HALF_LOG_2PI * mu.numel()
    return w.reshape(mu.shape), log_q.to(mu.dtype), log_p.to(mu.dtype)


def sample_weight_backward(grad_w: Optional[torch.Tensor], grad_log_q: torch.Tensor, grad_log_p: torch.Tensor,
                           mu: torch.Tensor, rho: torch.Tensor, seed: torch.Tensor, offset: int, prior_pi: float,
                           prior_sigma1: float, prior_sigma2: float, return_weight: bool, start: int = 0,
                           noise_only: bool = False):
    """(grad_mu, grad_rho, w or empty) of sample_weight; noise_only: of sample_weight(noise_only=True),
    grad_w (of the noise) reaching grad_rho only, and the noise returned."""
    mu_flat, rho_flat = mu.reshape(-1), rho.reshape(-1)
    grad_w_flat = None if grad_w is None else grad_w.reshape(-1)
    glq = grad_log_q.reshape(()).to(device=mu.device, dtype=mu.dtype)
    glp = grad_log_p.reshape(()).to(device=mu.device, dtype=mu.dtype)
    grad_mu, grad_rho = torch.empty_like(mu_flat), torch.empty_like(mu_flat)
    w = torch.empty_like(mu_flat) if return_weight else mu.new_empty(0)
    seed_value = host_seed(seed)
    for b, e in _chunks(mu_flat):
        eps, sigma, sig, dlog_sigma, w_scratch, spare = _scratch(6, e - b, mu.dtype, mu.device)
        _philox.normal(e - b, seed_value, offset, dtype=mu.dtype, device=mu.device, start=start + b, out=eps)
        sigma, sig, dlog_sigma = softplus_grad_terms(rho_flat[b:e], out=(sigma, sig, dlog_sigma))
        w_chunk = torch.mul(sigma, eps, out=w[b:e] if return_weight else w_scratch).add_(mu_flat[b:e])
        g = dlog_prior(w_chunk, prior_pi, prior_sigma1, prior_sigma2, out=(sigma, spare))  # sigma is spent
        g = torch.mul(g, glp, out=grad_mu[b:e])
        if grad_w_flat is not None:
            g += grad_w_flat[b:e]
        # g eps sigmoid(rho) - glq dlog_sigma in the chunk's temporaries (not addcmul: see above)
        torch.sub(eps.mul_(g).mul_(sig), dlog_sigma.mul_(glq), out=grad_rho[b:e])
        if noise_only:
            if grad_w_flat is not None:
                g -= grad_w_flat[b:e]
            if return_weight:
                w_chunk -= mu_flat[b:e]
    out_shape = mu.shape
    return grad_mu.reshape(out_shape), grad_rho.reshape(out_shape), w.reshape(out_shape) if return_weight else w


def philox_normal(like: torch.Tensor, seed: torch.Tensor, offset: int, start: int = 0) -> torch.Tensor:
    return eps_like(like, seed, offset, start).contiguous()


# ---- rows of a table (Bayesian embedding lookups) -------------------------------------------------

def _row_eps(mu: torch.Tensor, rows: torch.Tensor, seed: torch.Tensor, offset: int) -> torch.Tensor:
    """eps of rows `rows` (1-D int64) of the (V, D) table mu, as the whole table has them: (len(rows), D)."""
    dim = mu.shape[1]
    elements = rows.reshape(-1, 1) * dim + torch.arange(dim, dtype=torch.int64, device=rows.device)
    return _philox.normal_at(elements, host_seed(seed), offset, dtype=mu.dtype)


def sample_rows(mu: torch.Tensor, rho: torch.Tensor, indices: torch.Tensor, seed: torch.Tensor,
                offset: int) -> torch.Tensor:
    """Rows `indices` of w = mu + softplus(rho) * eps (eps of the whole table): indices.shape + (D,)."""
    flat = indices.reshape(-1)
    eps = _row_eps(mu, flat, seed, offset)
    sigma = softplus(rho[flat])
    return (mu[flat] + sigma * eps).reshape(indices.shape + (mu.shape[1],)).contiguous()


def sample_rows_backward(grad_rows: torch.Tensor, mu: torch.Tensor, rho: torch.Tensor, indices: torch.Tensor,
                         seed: torch.Tensor, offset: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Dense (V, D) grad_mu, grad_rho of sample_rows: the gradients of repeated indices are summed (in
    their order of appearance) and each distinct row is then differentiated once."""
    dim = mu.shape[1]
    flat = indices.reshape(-1)
    grad_mu = torch.zeros_like(mu, memory_format=torch.contiguous_format)
    grad_rho = torch.zeros_like(rho, memory_format=torch.contiguous_format)
    if flat.numel() == 0:
        return grad_mu, grad_rho
    rows, inverse = torch.unique(flat, sorted=True, return_inverse=True)
    # index_add_ sums in index order on the CPU (deterministic); on CUDA it uses atomics, so this
    # fallback is deterministic there only under torch.use_deterministic_algorithms (the compiled
    # CUDA kernel always is).
    g = grad_rows.new_zeros(rows.numel(), dim).index_add_(0, inverse, grad_rows.reshape(-1, dim))
    eps = _row_eps(mu, rows, seed, offset)
    sig = torch.sigmoid(rho[rows])
    grad_mu[rows] = g
    grad_rho[rows] = g * eps * sig
    return grad_mu, grad_rho


def sample_rows_backward_add_(grad_mu: torch.Tensor, grad_rho: torch.Tensor, grad_rows: torch.Tensor,
                              mu: torch.Tensor, rho: torch.Tensor, indices: torch.Tensor, seed: torch.Tensor,
                              offset: int) -> None:
    grad_mu_rows, grad_rho_rows = sample_rows_backward(grad_rows, mu, rho, indices, seed, offset)
    grad_mu.add_(grad_mu_rows)
    grad_rho.add_(grad_rho_rows)


# ---- closed-form Gaussian KL (cpu/gaussian_kl_cpu.cpp) -------------------------------------------

KL_CHUNK = 1 << 16  # elements per chunk: the temporaries stay in cache


def _kl_chunk_sum(m: torch.Tensor, r: torch.Tensor, inv_two_var: float) -> torch.Tensor:
    """sum over a flat chunk of (sigma^2 + mu^2) / (2 s^2) - log sigma, in float64, with few passes."""
    if r.numel() and float(r.min()) < SOFTPLUS_TINY_RHO:  # rare: exact limits for tiny sigma
        sigma, log_sigma, _, _ = softplus_terms(r)
        return ((sigma * sigma + m * m) * inv_two_var - log_sigma).sum(dtype=torch.float64)
    sigma = F.softplus(r)
    squares = torch.dot(sigma, sigma) + torch.dot(m, m)
    return squares.double() * inv_two_var - sigma.log_().sum(dtype=torch.float64)


def gaussian_kl(mu: torch.Tensor, rho: torch.Tensor, prior_sigma: float) -> torch.Tensor:
    """sum KL(N(mu, softplus(rho)^2) || N(0, prior_sigma^2)), summed in float64, in chunks."""
    inv_two_var = 0.5 / (prior_sigma * prior_sigma)
    mu_flat, rho_flat = mu.reshape(-1), rho.reshape(-1)
    step = KL_CHUNK if mu.device.type == "cpu" else max(mu.numel(), 1)  # GPUs prefer one big launch
    total = mu.new_zeros((), dtype=torch.float64)
    for begin in range(0, mu_flat.numel(), step):
        total += _kl_chunk_sum(mu_flat[begin:begin + step], rho_flat[begin:begin + step], inv_two_var)
    total += (math.log(prior_sigma) - 0.5) * mu.numel()
    return total.to(mu.dtype)


def gaussian_kl_backward(grad: torch.Tensor, mu: torch.Tensor, rho: torch.Tensor, prior_sigma: float):
    """grad * (dKL/dmu, dKL/drho) = grad * (mu / s^2, (sigma / s^2 - 1 / sigma) sigmoid(rho))."""
    inv_var = 1.0 / (prior_sigma * prior_sigma)
    g = grad.reshape(()).to(mu.dtype)
    grad_mu = mu * (g * inv_var)
    grad_rho = torch.empty_like(rho, memory_format=torch.contiguous_format)
    rho_flat, out = rho.reshape(-1), grad_rho.view(-1)
    step = KL_CHUNK if rho.device.type == "cpu" else max(rho.numel(), 1)
    for begin in range(0, rho_flat.numel(), step):
        r, o = rho_flat[begin:begin + step], out[begin:begin + step]
        sigma, _, sig, dlog_sigma = softplus_terms(r)
        torch.mul(sigma * sig * inv_var - dlog_sigma, g, out=o)
    return grad_mu.contiguous(), grad_rho


# ---- local reparameterisation's weight passes (cpu/lrt_weight_cpu.cpp) ----------------------------

def lrt_weight_forward(mu: torch.Tensor, rho: torch.Tensor, prior_sigma: float):
    """(softplus(rho)^2, the closed-form KL against N(0, prior_sigma^2) or 0 when prior_sigma is 0)."""
    sigma2 = softplus(rho).square_()
    kl = gaussian_kl(mu, rho, prior_sigma) if prior_sigma > 0 else mu.new_zeros(())
    return sigma2, kl


def lrt_weight_backward_(grad_mu: torch.Tensor, grad_rho: torch.Tensor, grad_kl: torch.Tensor, mu: torch.Tensor,
                         rho: torch.Tensor, prior_sigma: float) -> torch.Tensor:
    """In place: grad_rho (dL/dsigma2 on entry) -> dL/drho, both plus grad_kl times the KL's
    gradients; returns sigma^2."""
    sigma, _, sig, dlog_sigma = softplus_terms(rho)
    sigma_sigmoid = sigma * sig
    grad_rho.mul_(2 * sigma_sigmoid)
    if prior_sigma > 0:
        inv_var = 1.0 / (prior_sigma * prior_sigma)
        g = grad_kl.reshape(()).to(mu.dtype)
        grad_rho.add_((sigma_sigmoid * inv_var - dlog_sigma) * g)
        grad_mu.add_(mu * (g * inv_var))
    return sigma.square_().contiguous()


# ---- local reparameterisation's output noise (cpu/lrt_noise_cpu.cpp) -----------------------------

def grouped_eps_like(t: torch.Tensor, seed: torch.Tensor, offset: int) -> torch.Tensor:
    """eps_like for one seed; for N seeds (1-D) t's elements in N equal groups, group s drawing stream
    (seed[s], offset) from its own first element (the LRT noise ops' seed groups)."""
    seeds = seed.reshape(-1)
    if seeds.numel() == 1:
        return eps_like(t, seed, offset)
    groups = t.reshape(seeds.numel(), -1)
    return torch.cat([eps_like(g, s, offset) for g, s in zip(groups.unbind(0), seeds.unbind(0))]).view(t.shape)


def lrt_output_(var: torch.Tensor, mean: torch.Tensor, seed: torch.Tensor, offset: int) -> torch.Tensor:
    """In place var -> std = sqrt(max(var, 0)); returns y = mean + std * eps (stream (seed, offset), or
    one per group of elements for N seeds)."""
    std = var.clamp_min_(0).sqrt_()
    return torch.addcmul(mean, std, grouped_eps_like(std, seed, offset))


def lrt_noise_grad(grad: torch.Tensor, std: torch.Tensor, seed: torch.Tensor, offset: int) -> torch.Tensor:
    """dL/dvar = grad * eps / (2 std) for y = mean + std * eps, 0 where std is not > 0."""
    eps = grouped_eps_like(std, seed, offset)
    positive = std > 0
    u = grad * eps / torch.where(positive, std, torch.ones_like(std))
    return u.masked_fill_(~positive, 0).mul_(0.5)
