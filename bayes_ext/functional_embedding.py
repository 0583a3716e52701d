"""Functional form of the Bayesian embedding.

- ``bayesian_embedding``: the looked-up rows of a sample w ~ N(weight_mu, softplus(weight_rho)^2) of
  the (V, D) table, through the ``sample_rows`` op: only the looked-up rows are sampled, with the
  noise the whole table has there (Philox stream (seed, 0), row r at stream elements r*D ..
  r*D + D - 1), so the result equals ``sample_weight(weight_mu, weight_rho, seed, 0)[0][input]`` and
  the cost follows the batch, not V. The backward regenerates the rows' noise from the seed and
  sums the gradients of repeated indices deterministically; it returns dense (V, D) gradients.
  ``padding_idx`` rows come out as zeros and get no gradient; ``max_norm`` renormalises the sampled
  rows like ``F.embedding`` renormalises its table (the rescaling is not differentiated, as in
  ``F.embedding``); ``scale_grad_by_freq`` divides each row's gradient by its count in the batch.
- ``closed_form_kl``: KL(q || p) summed over the table for a single Gaussian prior, in plain torch
  ops processed in cache-sized chunks (one read pass over the table forward, one read / write pass
  backward; exact, so no sampling noise). This is the one part of a training step whose cost
  follows V (with the dense (V, D) gradients, which nn.Embedding has too).
- ``bayesian_embedding_closed_form``: the lookup and the closed-form KL as one autograd node, whose
  backward adds the KL's gradient into the lookup's dense gradients (no second pair of table-sized
  gradient tensors); what ``BayesianEmbedding(kl="closed_form")`` uses.
- ``mc_kl_terms``: BLiTZ's one-sample Monte Carlo (log q(w), log p(w)) of the whole table with the
  same seed as the lookup (so the rows a forward uses are the rows its KL sampled); it samples the
  whole table.
"""
import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _backend, _checks, _fallback
from . import _ops  # noqa: F401  (registers fake kernels and autograd)
from . import functional as BF

ScaleMixture = Tuple[float, float, float]  # (pi, sigma1, sigma2)
INDEX_DTYPES = (torch.int32, torch.int64)


def check_indices(input: Tensor, weight_mu: Tensor, name: str = "input") -> Tensor:
    """An index tensor as int64, with clear errors (the value range is checked on the CPU only: on a
    GPU it would cost a sync; the kernel asserts it there)."""
    _checks.check_tensor(input, name)
    if input.dtype not in INDEX_DTYPES:
        raise TypeError(f"{name} must be an int64 (or int32) tensor of indices, got {input.dtype}")
    if input.device != weight_mu.device:
        raise ValueError(f"{name} must be on the device of the embedding table ({weight_mu.device}), "
                         f"got {input.device}")
    if input.device.type == "cpu" and input.numel() > 0:
        low, high = int(input.min()), int(input.max())
        if low < 0 or high >= weight_mu.shape[0]:
            raise ValueError(f"{name} must hold indices in [0, {weight_mu.shape[0]}), got {low if low < 0 else high}")
    return input.to(torch.int64)


def normalize_padding_idx(padding_idx: Optional[int], num_embeddings: int) -> Optional[int]:
    """nn.Embedding's rule: a negative padding_idx counts from the end."""
    if padding_idx is None:
        return None
    padding_idx = int(padding_idx)
    if not -num_embeddings <= padding_idx < num_embeddings:
        raise ValueError(f"padding_idx must be within [-{num_embeddings}, {num_embeddings}), got {padding_idx}")
    return padding_idx + num_embeddings if padding_idx < 0 else padding_idx


class _ScaleGradByFreq(torch.autograd.Function):
    """Identity forward; backward divides each looked-up row's gradient by its count in the batch."""

    @staticmethod
    def forward(ctx, rows, indices):
        ctx.save_for_backward(indices)
        return rows.view_as(rows)

    @staticmethod
    def backward(ctx, grad):
        (indices,) = ctx.saved_tensors
        _, inverse, counts = torch.unique(indices.reshape(-1), return_inverse=True, return_counts=True)
        scale = counts[inverse].to(grad.dtype).reshape(indices.shape + (1,))
        return grad / scale, None


def _prepare(input, weight_mu, weight_rho, seed, padding_idx):
    _checks.check_posterior_params(weight_mu, weight_rho)
    if weight_mu.dim() != 2:
        raise ValueError(f"weight_mu must be 2-D (num_embeddings, embedding_dim), got shape {tuple(weight_mu.shape)}")
    indices = check_indices(input, weight_mu)
    padding_idx = normalize_padding_idx(padding_idx, weight_mu.shape[0])
    seed = BF.draw_seed() if seed is None else seed
    _checks.check_seed(seed, weight_mu)
    return indices, padding_idx, seed


def _finish_rows(rows, indices, padding_idx, max_norm, norm_type, scale_grad_by_freq):
    """padding_idx / max_norm / scale_grad_by_freq on the looked-up rows, as F.embedding does them."""
    if scale_grad_by_freq and rows.requires_grad:
        rows = _ScaleGradByFreq.apply(rows, indices)
    if max_norm is not None:
        with torch.no_grad():  # F.embedding's renorm: scale rows above max_norm, not differentiated
            norms = torch.linalg.vector_norm(rows, ord=norm_type, dim=-1, keepdim=True)
            scale = torch.where(norms > max_norm, max_norm / (norms + 1e-7), torch.ones_like(norms))
            delta = rows * (scale - 1)
        rows = rows + delta
    if padding_idx is not None:
        rows = rows.masked_fill((indices == padding_idx).unsqueeze(-1), 0)
    return rows


def bayesian_embedding(input: Tensor, weight_mu: Tensor, weight_rho: Tensor, seed: Optional[Tensor] = None,
                       padding_idx: Optional[int] = None, max_norm: Optional[float] = None,
                       norm_type: float = 2.0, scale_grad_by_freq: bool = False) -> Tensor:
    """Rows ``input`` of a sample of the table: shape input.shape + (embedding_dim,). See the module doc."""
    indices, padding_idx, seed = _prepare(input, weight_mu, weight_rho, seed, padding_idx)
    rows = _backend.ops().sample_rows(weight_mu, weight_rho, indices, seed, 0)
    return _finish_rows(rows, indices, padding_idx, max_norm, norm_type, scale_grad_by_freq)


def bayesian_embedding_closed_form(input: Tensor, weight_mu: Tensor, weight_rho: Tensor, prior_sigma: float,
                                   seed: Optional[Tensor] = None, padding_idx: Optional[int] = None,
                                   max_norm: Optional[float] = None, norm_type: float = 2.0,
                                   scale_grad_by_freq: bool = False) -> Tuple[Tensor, Tensor]:
    """``(bayesian_embedding(...), closed_form_kl(weight_mu, weight_rho, prior_sigma, exclude_row=padding_idx))``
    as one autograd node: its backward writes the KL's gradient into the lookup's dense gradients
    instead of allocating two more table-sized tensors (on the CPU, fresh table-sized allocations
    cost as much as nn.Embedding's whole training step)."""
    if not (isinstance(prior_sigma, (int, float)) and prior_sigma > 0 and math.isfinite(prior_sigma)):
        raise ValueError(f"prior_sigma must be positive and finite, got {prior_sigma}")
    indices, padding_idx, seed = _prepare(input, weight_mu, weight_rho, seed, padding_idx)
    rows, kl = _EmbeddingClosedForm.apply(weight_mu, weight_rho, indices, seed, float(prior_sigma), padding_idx,
                                          _backend.ops())
    return _finish_rows(rows, indices, padding_idx, max_norm, norm_type, scale_grad_by_freq), kl


KL_CHUNK = 1 << 16  # elements per chunk of the closed-form KL: its temporaries stay in cache


def _kl_elements(mu: Tensor, rho: Tensor, inv_two_var: float) -> Tensor:
    """Elementwise (sigma^2 + mu^2) / (2 s^2) - log sigma (the KL without its constant)."""
    sigma, log_sigma, _, _ = _fallback.softplus_terms(rho)
    return (sigma * sigma + mu * mu) * inv_two_var - log_sigma


def _chunk(t: Tensor) -> int:
    return KL_CHUNK if t.device.type == "cpu" else max(t.numel(), 1)  # GPUs prefer one big launch


def _chunk_kl_sum(m: Tensor, r: Tensor, inv_two_var: float) -> Tensor:
    """sum over a flat chunk of (sigma^2 + mu^2) / (2 s^2) - log sigma, in float64, with few passes."""
    if r.numel() and float(r.min()) < _fallback.SOFTPLUS_TINY_RHO:  # rare: exact limits for tiny sigma
        return _kl_elements(m, r, inv_two_var).sum(dtype=torch.float64)
    sigma = F.softplus(r)
    squares = torch.dot(sigma, sigma) + torch.dot(m, m)
    return squares.double() * inv_two_var - sigma.log_().sum(dtype=torch.float64)


def _kl_forward(mu: Tensor, rho: Tensor, prior_sigma: float, exclude_row: Optional[int]) -> Tensor:
    """sum KL(N(mu, softplus(rho)^2) || N(0, s^2)) without row exclude_row, in cache-sized chunks."""
    inv_two_var = 0.5 / (prior_sigma * prior_sigma)
    mu_flat, rho_flat = mu.detach().reshape(-1), rho.detach().reshape(-1)
    total = mu.new_zeros((), dtype=torch.float64)
    step = _chunk(mu)
    for begin in range(0, mu_flat.numel(), step):
        end = begin + step
        total += _chunk_kl_sum(mu_flat[begin:end], rho_flat[begin:end], inv_two_var)
    count = mu.numel()
    if exclude_row is not None:
        total -= _kl_elements(mu[exclude_row].detach(), rho[exclude_row].detach(),
                              inv_two_var).sum(dtype=torch.float64)
        count -= mu.shape[1]
    total += (math.log(prior_sigma) - 0.5) * count
    return total.to(mu.dtype)


def _kl_backward_into(grad_mu: Optional[Tensor], grad_rho: Optional[Tensor], mu: Tensor, rho: Tensor, g: Tensor,
                      prior_sigma: float, exclude_row: Optional[int]) -> None:
    """Adds g * dKL/dmu = g mu / s^2 and g * dKL/drho = g (sigma / s^2 - 1 / sigma) sigmoid(rho) to the
    contiguous buffers grad_mu / grad_rho (either may be None), leaving row exclude_row unchanged."""
    inv_var = 1.0 / (prior_sigma * prior_sigma)
    g = float(g)
    keep = None
    if exclude_row is not None:
        keep = [t[exclude_row].clone() for t in (grad_mu, grad_rho) if t is not None]
    if grad_mu is not None:
        grad_mu.add_(mu.detach(), alpha=g * inv_var)
    if grad_rho is not None:
        rho_flat, out = rho.detach().reshape(-1), grad_rho.view(-1)
        step = _chunk(rho)
        for begin in range(0, rho_flat.numel(), step):
            end = begin + step
            r, o = rho_flat[begin:end], out[begin:end]
            if r.numel() and float(r.min()) < _fallback.SOFTPLUS_TINY_RHO:  # rare: exact limits
                sigma, _, sig, dlog_sigma = _fallback.softplus_terms(r)
                o.add_(sigma * sig * (g * inv_var) - dlog_sigma * g)
                continue
            sigma = F.softplus(r)
            t = torch.reciprocal(sigma).add_(sigma, alpha=-inv_var)  # 1 / sigma - sigma / s^2
            o.addcmul_(t, torch.sigmoid(r), value=-g)
    if keep is not None:
        for t, row in zip((t for t in (grad_mu, grad_rho) if t is not None), keep):
            t[exclude_row] = row


class _GaussianKL(torch.autograd.Function):
    """sum KL(N(mu, softplus(rho)^2) || N(0, s^2)) over a table, without row ``exclude_row``: one read
    pass over mu and rho forward, one read / write pass backward (cache-sized chunks) instead of
    ~10 table-sized temporaries."""

    @staticmethod
    def forward(ctx, mu, rho, prior_sigma, exclude_row):
        ctx.save_for_backward(mu, rho)
        ctx.prior_sigma, ctx.exclude_row = prior_sigma, exclude_row
        return _kl_forward(mu, rho, prior_sigma, exclude_row)

    @staticmethod
    def backward(ctx, grad):
        mu, rho = ctx.saved_tensors
        grad_mu = torch.zeros_like(mu, memory_format=torch.contiguous_format) if ctx.needs_input_grad[0] else None
        grad_rho = torch.zeros_like(rho, memory_format=torch.contiguous_format) if ctx.needs_input_grad[1] else None
        _kl_backward_into(grad_mu, grad_rho, mu, rho, grad, ctx.prior_sigma, ctx.exclude_row)
        return grad_mu, grad_rho, None, None


class _EmbeddingClosedForm(torch.autograd.Function):
    """(sample_rows(mu, rho, indices, seed, 0), closed-form KL) with one pair of dense gradients."""

    @staticmethod
    def forward(ctx, mu, rho, indices, seed, prior_sigma, exclude_row, ops):
        ctx.save_for_backward(mu, rho, indices, seed)
        ctx.prior_sigma, ctx.exclude_row, ctx.ops = prior_sigma, exclude_row, ops
        rows = ops.sample_rows(mu, rho, indices, seed, 0)
        return rows, _kl_forward(mu, rho, prior_sigma, exclude_row)

    @staticmethod
    def backward(ctx, grad_rows, grad_kl):
        mu, rho, indices, seed = ctx.saved_tensors
        if grad_rows is None:
            grad_rows = mu.new_zeros(tuple(indices.shape) + (mu.shape[1],))
        grad_mu, grad_rho = ctx.ops.sample_rows_backward(grad_rows.contiguous(), mu, rho, indices, seed, 0)
        if grad_kl is not None:
            _kl_backward_into(grad_mu, grad_rho, mu, rho, grad_kl, ctx.prior_sigma, ctx.exclude_row)
        return grad_mu, grad_rho, None, None, None, None, None


def closed_form_kl(weight_mu: Tensor, weight_rho: Tensor, prior_sigma: Optional[float] = None,
                   prior_dist=None, exclude_row: Optional[int] = None) -> Tensor:
    """sum KL(N(mu, softplus(rho)^2) || N(0, prior_sigma^2)) over the table (or || prior_dist, a
    torch.distributions.Normal), leaving out row ``exclude_row`` (the padding row: a constant zero,
    not a random weight). Exact and differentiable; plain torch ops, one pass over the table."""
    if prior_dist is not None:
        q = torch.distributions.Normal(weight_mu, F.softplus(weight_rho))
        kl = torch.distributions.kl_divergence(q, prior_dist)
        if exclude_row is not None:
            kl = kl.index_fill(0, torch.tensor([exclude_row], device=kl.device), 0)
        return kl.sum()
    if not (prior_sigma is not None and prior_sigma > 0):
        raise ValueError(f"prior_sigma must be positive, got {prior_sigma}")
    return _GaussianKL.apply(weight_mu, weight_rho, float(prior_sigma), exclude_row)


def mc_kl_terms(weight_mu: Tensor, weight_rho: Tensor, seed: Tensor, prior: ScaleMixture,
                prior_log_prob=None, exclude_row: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """(log q(w), log p(w)) of a whole-table sample w from stream (seed, 0), the stream the lookup
    uses; ``prior_log_prob(w)`` (summed) replaces the scale mixture when given. Row ``exclude_row``
    is left out (its stream elements are skipped, the other rows keep theirs)."""
    ops = _backend.ops()
    pi, sigma1, sigma2 = (float(v) for v in prior)
    num_rows, dim = weight_mu.shape
    if exclude_row is None:
        blocks = [(0, num_rows)]
    else:
        blocks = [(r0, r1) for r0, r1 in ((0, exclude_row), (exclude_row + 1, num_rows)) if r1 > r0]
    log_q = log_p = weight_mu.new_zeros(())
    for r0, r1 in blocks:
        w, q, p = ops.sample_weight(weight_mu[r0:r1], weight_rho[r0:r1], seed, 0, pi, sigma1, sigma2, r0 * dim)
        if prior_log_prob is not None:
            p = prior_log_prob(w)
        log_q, log_p = log_q + q, log_p + p
    return log_q, log_p
