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
- ``closed_form_kl``: KL(q || p) summed over the table for a single Gaussian prior, through the
  ``gaussian_kl`` op (one fused read pass over the table forward, one pass writing the gradients
  backward; exact, so no sampling noise). This is the one part of a training step whose cost
  follows V (with the dense (V, D) gradients, which nn.Embedding has too).
- ``bayesian_embedding_closed_form``: the lookup and the closed-form KL as one autograd node, whose
  backward adds the KL's gradient into the lookup's dense gradients (no second pair of table-sized
  gradient tensors); what ``BayesianEmbedding(kl="closed_form")`` uses.
- ``mc_kl_terms``: BLiTZ's one-sample Monte Carlo (log q(w), log p(w)) of the whole table with the
  same seed as the lookup (so the rows a forward uses are the rows its KL sampled); it samples the
  whole table.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _backend, _checks, _recorded
from . import _ops  # noqa: F401  (registers fake kernels and autograd)
from . import functional as BF
from ._functorch_state import functorch_active
from ._saved_inputs import saved_tensors

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
    # torch.compile: a value read here would break the graph, and vmap cannot read one; the ops
    # check the range themselves
    readable = not (torch.compiler.is_compiling() or functorch_active())
    if input.device.type == "cpu" and input.numel() > 0 and readable:
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
    """Identity forward; backward divides each looked-up row's gradient by its count in the batch.
    New-style, so that torch.func transforms accept it (vmap of its backward fails: torch.unique)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(rows, indices):
        return rows.view_as(rows)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[1])

    @staticmethod
    def backward(ctx, grad):
        (indices,) = ctx.saved_tensors
        _, inverse, counts = torch.unique(indices.reshape(-1), return_inverse=True, return_counts=True)
        scale = counts[inverse].to(grad.dtype).reshape(indices.shape + (1,))
        return grad / scale, None


def _prepare(input, weight_mu, weight_rho, seed, padding_idx):
    _checks.check_posterior_params(weight_mu, weight_rho, "weight_mu", "weight_rho")
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
    _checks.check_positive_prior_sigma(prior_sigma)
    indices, padding_idx, seed = _prepare(input, weight_mu, weight_rho, seed, padding_idx)
    if functorch_active():  # _EmbeddingClosedForm is old-style, which torch.func refuses: the two ops
        ops = _backend.ops()
        rows = ops.sample_rows(weight_mu, weight_rho, indices, seed, 0)
        kl = _kl_sum(ops, weight_mu, weight_rho, float(prior_sigma), padding_idx)
    else:
        rows, kl = _EmbeddingClosedForm.apply(weight_mu, weight_rho, indices, seed, float(prior_sigma), padding_idx,
                                              _backend.ops())
    return _finish_rows(rows, indices, padding_idx, max_norm, norm_type, scale_grad_by_freq), kl


def _kl_sum(ops, mu: Tensor, rho: Tensor, prior_sigma: float, exclude_row: Optional[int]) -> Tensor:
    """sum KL(N(mu, softplus(rho)^2) || N(0, s^2)) over the table without row exclude_row: one
    fused pass (the ``gaussian_kl`` op) and the excluded row's own KL taken off."""
    total = ops.gaussian_kl(mu, rho, prior_sigma)
    if exclude_row is not None:
        total = total - ops.gaussian_kl(mu[exclude_row], rho[exclude_row], prior_sigma)
    return total


def _kl_forward(ops, mu: Tensor, rho: Tensor, prior_sigma: float, exclude_row: Optional[int]) -> Tensor:
    """_kl_sum inside the Functions below, which give its gradients themselves."""
    return _kl_sum(ops, mu.detach(), rho.detach(), prior_sigma, exclude_row)


def _kl_backward(ops, g: Tensor, mu: Tensor, rho: Tensor, prior_sigma: float, exclude_row: Optional[int]):
    """g * the KL's gradients as fresh dense (grad_mu, grad_rho) written in one pass (no zero-fill),
    with row exclude_row zero."""
    grad_mu, grad_rho = ops.gaussian_kl_backward(g, mu.detach(), rho.detach(), prior_sigma)
    if exclude_row is not None:
        grad_mu[exclude_row] = 0
        grad_rho[exclude_row] = 0
    return grad_mu, grad_rho


class _GaussianKL(torch.autograd.Function):
    """sum KL(N(mu, softplus(rho)^2) || N(0, s^2)) over a table without row ``exclude_row``: one read
    pass over mu and rho forward, one read / write pass backward."""

    @staticmethod
    def forward(ctx, mu, rho, prior_sigma, exclude_row, ops):
        ctx.save_for_backward(mu, rho)
        ctx.prior_sigma, ctx.exclude_row, ctx.ops = prior_sigma, exclude_row, ops
        return _kl_forward(ops, mu, rho, prior_sigma, exclude_row)

    @staticmethod
    def backward(ctx, grad):
        mu, rho = saved_tensors(ctx)
        if torch.is_grad_enabled():  # recorded (create_graph=True): exact to every order
            return _recorded.recorded_backward(_rebuilt_kl, (mu, rho, ctx.prior_sigma, ctx.exclude_row, None),
                                               ctx.needs_input_grad, (grad,))
        grad_mu, grad_rho = _kl_backward(ctx.ops, grad, mu, rho, ctx.prior_sigma, ctx.exclude_row)
        return grad_mu, grad_rho, None, None, None


def _rebuilt_kl(mu, rho, prior_sigma, exclude_row, unused_ops):
    """_GaussianKL's forward for a recorded backward, on its inputs (the ops it was given are not
    used: _backend.ops() then gives the differentiable compositions)."""
    return _kl_sum(_backend.ops(), mu, rho, prior_sigma, exclude_row)


def _rebuilt_closed_form(mu, rho, indices, seed, prior_sigma, exclude_row, unused_ops):
    """_EmbeddingClosedForm's forward for a recorded backward, likewise."""
    ops = _backend.ops()
    return ops.sample_rows(mu, rho, indices, seed, 0), _kl_sum(ops, mu, rho, prior_sigma, exclude_row)


class _EmbeddingClosedForm(torch.autograd.Function):
    """(sample_rows(mu, rho, indices, seed, 0), closed-form KL) with one pair of dense gradients:
    the KL's gradients are written over the whole table first, then the looked-up rows' are added
    in place."""

    @staticmethod
    def forward(ctx, mu, rho, indices, seed, prior_sigma, exclude_row, ops):
        ctx.save_for_backward(mu, rho, indices, seed)
        ctx.prior_sigma, ctx.exclude_row, ctx.ops = prior_sigma, exclude_row, ops
        rows = ops.sample_rows(mu, rho, indices, seed, 0)
        return rows, _kl_forward(ops, mu, rho, prior_sigma, exclude_row)

    @staticmethod
    def backward(ctx, grad_rows, grad_kl):
        mu, rho, indices, seed = saved_tensors(ctx)
        if torch.is_grad_enabled():  # recorded (create_graph=True): exact to every order
            return _recorded.recorded_backward(
                _rebuilt_closed_form, (mu, rho, indices, seed, ctx.prior_sigma, ctx.exclude_row, None),
                ctx.needs_input_grad, (grad_rows, grad_kl))
        if grad_rows is None:
            grad_rows = mu.new_zeros(tuple(indices.shape) + (mu.shape[1],))
        if grad_kl is None:
            grad_mu, grad_rho = ctx.ops.sample_rows_backward(grad_rows.contiguous(), mu, rho, indices, seed, 0)
        else:
            grad_mu, grad_rho = _kl_backward(ctx.ops, grad_kl, mu, rho, ctx.prior_sigma, ctx.exclude_row)
            ctx.ops.sample_rows_backward_add_(grad_mu, grad_rho, grad_rows.contiguous(), mu, rho, indices, seed, 0)
        return grad_mu, grad_rho, None, None, None, None, None


def closed_form_kl(weight_mu: Tensor, weight_rho: Tensor, prior_sigma: Optional[float] = None,
                   prior_dist=None, exclude_row: Optional[int] = None) -> Tensor:
    """sum KL(N(mu, softplus(rho)^2) || N(0, prior_sigma^2)) over the table (or || prior_dist, a
    torch.distributions.Normal), leaving out row ``exclude_row`` (the padding row: a constant zero,
    not a random weight). Exact and differentiable; one fused pass over the table."""
    if prior_dist is not None:
        q = torch.distributions.Normal(weight_mu, F.softplus(weight_rho))
        kl = torch.distributions.kl_divergence(q, prior_dist)
        if exclude_row is not None:
            kl = kl.index_fill(0, torch.tensor([exclude_row], device=kl.device), 0)
        return kl.sum()
    if not (prior_sigma is not None and prior_sigma > 0):
        raise ValueError(f"prior_sigma must be positive, got {prior_sigma}")
    if functorch_active():  # _GaussianKL is old-style, which torch.func refuses: the op's own autograd
        return _kl_sum(_backend.ops(), weight_mu, weight_rho, float(prior_sigma), exclude_row)
    return _GaussianKL.apply(weight_mu, weight_rho, float(prior_sigma), exclude_row, _backend.ops())


def mc_kl_terms(weight_mu: Tensor, weight_rho: Tensor, seed: Tensor, prior: ScaleMixture,
                prior_log_prob=None, exclude_row: Optional[int] = None) -> Tuple[Tensor, Tensor]:
    """(log q(w), log p(w)) of a whole-table sample w from stream (seed, 0), the stream the lookup
    uses; ``prior_log_prob(w)`` (summed) replaces the scale mixture when given. Row ``exclude_row``
    is left out (its stream elements are skipped, the other rows keep theirs)."""
    ops = _backend.ops()
    pi, sigma1, sigma2 = _checks.prior_values(prior)
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
