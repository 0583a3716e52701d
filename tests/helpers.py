"""Independent reference implementations used by the tests.

Nothing here calls bayes_ext: the Philox rounds are re-implemented with numpy uint64 arithmetic,
the Box-Muller mapping follows docs/design.md literally, and the posterior / prior terms use
torch.distributions so that autograd supplies the reference gradients.
"""
import math

import numpy as np
import pytest
import torch

from bayes_ext import _backend
from bayes_ext import functional as BF
from bayes_ext.modules import (BayesianConv2d, BayesianConvTranspose2d, BayesianEmbedding, BayesianGRU, BayesianLinear,
                               BayesianLSTM)
from bayes_ext.utils.layer_wrappers import Flipout, Radial
import torch.nn.functional as F

TORCH_VERSION = tuple(int(part) for part in torch.__version__.split("+")[0].split(".")[:2])


def _needs_torch_reason(version, why) -> str:
    return f"needs torch >= {version[0]}.{version[1]}: {why}"


def needs_torch(version, why):
    """Skips a test on a torch older than `version`, where that torch was seen to fail it for a
    reason of its own (`why`); bayes_ext supports torch >= 2.4 and CI runs 2.13."""
    return pytest.mark.skipif(TORCH_VERSION < version, reason=_needs_torch_reason(version, why))


def require_torch(version, why):
    """needs_torch inside a test (for some of its parameters)."""
    if TORCH_VERSION < version:
        pytest.skip(_needs_torch_reason(version, why))


# torch 2.4 refuses its custom ops inside torch.func transforms (their autograd.Function has no
# setup_context); these layers' higher-order derivatives and torch.func gradients need them there
CUSTOM_OPS_UNDER_TORCH_FUNC = ((2, 5), "torch 2.4 refuses custom ops inside torch.func transforms")


MASK32 = np.uint64(0xFFFFFFFF)
PHILOX_M0 = np.uint64(0xD2511F53)
PHILOX_M1 = np.uint64(0xCD9E8D57)
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85

# Random123 known-answer vectors for Philox4x32-10: (counter, key, expected output).
PHILOX_KAT = [
    ((0x00000000, 0x00000000, 0x00000000, 0x00000000), (0x00000000, 0x00000000),
     (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF),
     (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


def as_int64(value: int) -> int:
    """An unsigned 64-bit value as the int64 with the same bits (values >= 2^63 become negative)."""
    value &= 0xFFFFFFFFFFFFFFFF
    return value - (1 << 64) if value >= (1 << 63) else value


def seed_tensor(value: int, device="cpu") -> torch.Tensor:
    return torch.tensor([as_int64(value)], dtype=torch.int64, device=device)


def np_philox4x32_10(c0, c1, c2, c3, k0: int, k1: int):
    """Philox4x32-10 on numpy uint64 arrays holding 32-bit words (independent of bayes_ext)."""
    c0, c1, c2, c3 = (np.asarray(c, dtype=np.uint64) & MASK32 for c in (c0, c1, c2, c3))
    for _ in range(10):
        p0 = PHILOX_M0 * c0
        p1 = PHILOX_M1 * c2
        hi0, lo0 = p0 >> np.uint64(32), p0 & MASK32
        hi1, lo1 = p1 >> np.uint64(32), p1 & MASK32
        c0, c1, c2, c3 = hi1 ^ c1 ^ np.uint64(k0), lo1, hi0 ^ c3 ^ np.uint64(k1), lo0
        k0 = (k0 + PHILOX_W0) & 0xFFFFFFFF
        k1 = (k1 + PHILOX_W1) & 0xFFFFFFFF
    return c0, c1, c2, c3


def np_stream_words(seed: int, offset: int, first_block: int, num_blocks: int):
    """Philox words of blocks [first_block, first_block + num_blocks) as laid out in docs/design.md."""
    seed &= 0xFFFFFFFFFFFFFFFF
    offset &= 0xFFFFFFFFFFFFFFFF
    blocks = [(first_block + j) & 0xFFFFFFFFFFFFFFFF for j in range(num_blocks)]
    c0 = np.array([b & 0xFFFFFFFF for b in blocks], dtype=np.uint64)
    c1 = np.array([b >> 32 for b in blocks], dtype=np.uint64)
    c2 = np.full(num_blocks, offset & 0xFFFFFFFF, dtype=np.uint64)
    c3 = np.full(num_blocks, offset >> 32, dtype=np.uint64)
    return np_philox4x32_10(c0, c1, c2, c3, seed & 0xFFFFFFFF, seed >> 32)


def np_design_normals(numel: int, seed: int, offset: int, start: int = 0) -> np.ndarray:
    """The normals of elements [start, start + numel) of stream (seed, offset), in float64, from the
    formulas of docs/design.md (radius / angle uniforms and Box-Muller)."""
    first_block = start // 4
    last_block = (start + numel - 1) // 4
    x0, x1, x2, x3 = np_stream_words(seed, offset, first_block, last_block - first_block + 1)

    def radius(x):
        u = (2.0 * (x >> np.uint64(9)).astype(np.float64) + 1.0) * 2.0 ** -24
        return np.sqrt(-2.0 * np.log(u))

    def angle(x):
        return (x >> np.uint64(8)).astype(np.float64) * 2.0 ** -24 * 2.0 * math.pi

    r01, r23, a01, a23 = radius(x0), radius(x2), angle(x1), angle(x3)
    eps = np.stack([r01 * np.cos(a01), r01 * np.sin(a01), r23 * np.cos(a23), r23 * np.sin(a23)], axis=-1).reshape(-1)
    skip = start - 4 * first_block
    return eps[skip:skip + numel]


# ---- posterior / prior reference --------------------------------------------------------------

def ref_log_prior_terms(w: torch.Tensor, pi: float, s1: float, s2: float) -> torch.Tensor:
    """Elementwise log(pi N(w; 0, s1) + (1 - pi) N(w; 0, s2)) via torch.distributions and logsumexp."""
    n1 = torch.distributions.Normal(torch.zeros((), dtype=w.dtype, device=w.device), s1).log_prob(w)
    n2 = torch.distributions.Normal(torch.zeros((), dtype=w.dtype, device=w.device), s2).log_prob(w)
    if pi >= 1.0:
        return n1
    if pi <= 0.0:
        return n2
    return torch.logsumexp(torch.stack([n1 + math.log(pi), n2 + math.log(1.0 - pi)]), dim=0)


def ref_sample(mu: torch.Tensor, rho: torch.Tensor, eps: torch.Tensor, prior):
    """(w, log_q, log_p) from torch ops on a given eps; differentiable w.r.t. mu and rho."""
    pi, s1, s2 = prior
    sigma = F.softplus(rho)
    w = mu + sigma * eps
    log_q = torch.distributions.Normal(mu, sigma).log_prob(w).sum()
    log_p = ref_log_prior_terms(w, pi, s1, s2).sum()
    return w, log_q, log_p


def ref_grads(mu, rho, eps, prior, grad_w, a, b):
    """d/d(mu, rho) of (w * grad_w).sum() + a * log_q + b * log_p, eps held fixed, by autograd."""
    mu = mu.detach().clone().requires_grad_(True)
    rho = rho.detach().clone().requires_grad_(True)
    w, log_q, log_p = ref_sample(mu, rho, eps.detach(), prior)
    loss = a * log_q + b * log_p
    if grad_w is not None:
        loss = loss + (w * grad_w).sum()
    g_mu, g_rho = torch.autograd.grad(loss, (mu, rho))
    return g_mu, g_rho


def to64(*tensors):
    return tuple(t.detach().to(torch.float64) for t in tensors)


class SeedRecorder:
    """Wraps bayes_ext.functional.draw_seed to remember every seed a forward draws."""

    def __init__(self, monkeypatch):
        self.seeds = []
        original = BF.draw_seed

        def draw_seed(*args, **kwargs):
            seed = original(*args, **kwargs)
            self.seeds.append(seed.clone())
            return seed

        monkeypatch.setattr(BF, "draw_seed", draw_seed)


class OpsRecorder:
    """Routes bayes_ext._backend.ops() through a proxy that records the name of every op looked up
    (in order), to assert which kernels a forward / backward uses. ``real`` is the active backend's
    namespace itself."""

    def __init__(self, monkeypatch):
        self.calls = []
        self.real = _backend.ops()
        calls, real = self.calls, self.real

        class Proxy:
            def __getattr__(self, name):
                calls.append(name)
                return getattr(real, name)

        proxy = Proxy()
        monkeypatch.setattr(_backend, "ops", lambda: proxy)


# ---- blocked CPU paths ----------------------------------------------------------------------------

def posterior_7x9(seed: int, bias: bool = True):
    """(mu, rho, bias_mu, bias_rho) of a 7 x 9 float64 linear weight, requiring grad (bias: None)."""
    g = torch.Generator().manual_seed(seed)

    def param(shape, shift, scale):
        return (scale * torch.randn(shape, generator=g, dtype=torch.float64) + shift).requires_grad_()
    mu, rho = param((7, 9), 0.0, 0.3), param((7, 9), -2.0, 1.0)
    if not bias:
        return mu, rho, None, None
    return mu, rho, param((7,), 0.0, 0.3), param((7,), -2.0, 1.0)


def assert_row_blocks_match_whole(monkeypatch, weight_mu, run, tensors):
    """run() -> (outputs, loss) once with the whole weight in one block and once in blocks of one
    row (every block size forced down: both backends', the LRT's): the outputs and the gradients of loss w.r.t.
    `tensors` must agree to float64 rounding (each block draws the noise it has in the whole weight)."""
    results = []
    for elements, blocks in ((1 << 30, 1), (weight_mu.shape[1] + 1, weight_mu.shape[0])):
        monkeypatch.setattr(BF, "BLOCK_ELEMENTS", elements)
        monkeypatch.setattr(BF, "FALLBACK_BLOCK_ELEMENTS", elements)
        monkeypatch.setattr(BF, "LRT_BLOCK_ELEMENTS", elements)
        assert len(BF._row_blocks(weight_mu)) == blocks == len(BF._row_blocks(weight_mu, BF.LRT_BLOCK_ELEMENTS))
        outputs, loss = run()
        grads = torch.autograd.grad(loss, tensors)
        results.append(([o.detach() for o in outputs], grads))
    (outs1, grads1), (outs2, grads2) = results
    for a, b in zip(outs2, outs1):
        torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-11)
    for a, b in zip(grads2, grads1):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def layer_params(out_f, in_f, bias, dtype=torch.float64):
    """(weight_mu, weight_rho, bias_mu, bias_rho) leaves of a linear layer, mu ~ 0.3 N(0, 1) and
    rho ~ -2 + 0.3 N(0, 1) from a generator seeded by the shape (bias ones None without a bias)."""
    g = torch.Generator().manual_seed(out_f * 100 + in_f)

    def param(shape, shift):
        return (0.3 * torch.randn(shape, generator=g, dtype=dtype) + shift).requires_grad_()
    if not bias:
        return param((out_f, in_f), 0.0), param((out_f, in_f), -2.0), None, None
    return param((out_f, in_f), 0.0), param((out_f, in_f), -2.0), param((out_f,), 0.0), param((out_f,), -2.0)


def detached_as(params, dtype):
    """layer_params' tensors detached and cast to dtype (an absent bias stays None)."""
    return [None if p is None else p.detach().to(dtype) for p in params]


def check_layer_op_rejects_bad_inputs(op, prior):
    """The argument checks of the one-sample linear layer ops taking (x, weight_mu, weight_rho,
    bias_mu, bias_rho, seed, *prior, block_rows) (linear_reparam_rows and linear_flipout_rows with
    the mixture's three numbers, linear_lrt_rows with prior_sigma alone): each bad input raises an
    error that names the argument. Returns good arguments (x, params, seed)."""
    import pytest
    wm, wr, bm, br = (p.detach() for p in layer_params(4, 5, True, torch.float32))
    seed = torch.tensor([1])
    x = torch.randn(3, 5)
    with pytest.raises(ValueError, match="x must be"):
        op(torch.randn(3, 4), wm, wr, bm, br, seed, *prior, 4)
    with pytest.raises(TypeError, match="x must have the dtype"):
        op(x.double(), wm, wr, bm, br, seed, *prior, 4)
    with pytest.raises(ValueError, match="bias_mu and bias_rho"):
        op(x, wm, wr, bm, None, seed, *prior, 4)
    with pytest.raises(ValueError, match="weight_mu must be"):
        op(x, wm[0], wr[0], None, None, seed, *prior, 4)
    with pytest.raises(ValueError, match="block_rows must be positive"):
        op(x, wm, wr, bm, br, seed, *prior, 0)
    with pytest.raises(TypeError, match="seed"):
        op(x, wm, wr, bm, br, seed.float(), *prior, 4)
    return x, (wm, wr, bm, br), seed


def check_weight_bias_ops_are_two_calls(ops, weight_mu, weight_rho, bias_mu, bias_rho, seed, dtype,
                                        prior=(0.5, 0.1, 0.4)):
    """sample_weight_bias_as / sample_weight_bias_backward_ (the layer op's calls) against their
    definition, bit for bit: sample_weight_as / sample_weight_backward of the weight on stream
    (seed, 0) and of the bias on (seed, 1), the two log q and log p added, grad_weight overwritten
    by grad_weight_mu."""
    w, b, log_q, log_p = ops.sample_weight_bias_as(weight_mu, weight_rho, bias_mu, bias_rho, seed, *prior, dtype)
    ref_w, ref_q, ref_p = ops.sample_weight_as(weight_mu, weight_rho, seed, 0, *prior, dtype, True)
    ref_b, ref_q_b, ref_p_b = ops.sample_weight_as(bias_mu, bias_rho, seed, 1, *prior, dtype, True)
    assert w.dtype == b.dtype == dtype and log_q.dtype == weight_mu.dtype
    for got, want in ((w, ref_w), (b, ref_b), (log_q, ref_q + ref_q_b), (log_p, ref_p + ref_p_b)):
        assert got.shape == want.shape and torch.equal(got, want)
    gen = torch.Generator().manual_seed(8)
    grad_w = torch.randn(weight_mu.shape, generator=gen, dtype=weight_mu.dtype).to(weight_mu.device)
    grad_b = torch.randn(bias_mu.shape, generator=gen, dtype=bias_mu.dtype).to(bias_mu.device)
    glq = torch.tensor(0.3, dtype=weight_mu.dtype, device=weight_mu.device)
    glp = torch.tensor(-0.7, dtype=weight_mu.dtype, device=weight_mu.device)
    grad_weight = grad_w.clone()
    got = (grad_weight,) + tuple(ops.sample_weight_bias_backward_(grad_weight, grad_b, glq, glp, weight_mu, weight_rho,
                                                                  bias_mu, bias_rho, seed, *prior))
    want = (ops.sample_weight_backward(grad_w, glq, glp, weight_mu, weight_rho, seed, 0, *prior, False)[:2]
            + ops.sample_weight_backward(grad_b, glq, glp, bias_mu, bias_rho, seed, 1, *prior, False)[:2])
    for g, r in zip(got, want):
        assert g.shape == r.shape and torch.equal(g, r)


def check_two_forward_step_gradients(layer, x):
    """A step of two forwards (a sample_nbr=2 loop) gives every .grad the sum of two one-forward
    steps' gradients on the same seeds, each in a storage of the parameter's own size. (The weight
    gradients are halves of one allocation, layer_op::weight_grad_pair: as two views of one storage,
    autograd could not add the second sample's into the first's in place, and rho's .grad kept the
    whole pair, twice its size.)"""
    def step(forwards):
        layer.zero_grad(set_to_none=True)
        sum(layer(x).sum() + layer.kl_divergence() for _ in range(forwards)).backward()
        return {name: p.grad for name, p in layer.named_parameters()}

    torch.manual_seed(3)
    first, second = step(1), step(1)
    torch.manual_seed(3)
    both = step(2)
    for name, grad in both.items():
        torch.testing.assert_close(grad, first[name] + second[name], rtol=1e-6, atol=1e-6)
        assert grad.untyped_storage().nbytes() == grad.numel() * grad.element_size(), name


def saved_storage_bytes(model, inputs):
    """Bytes of the storages autograd saves for backward while `model` runs on each of `inputs`
    (each storage once: a tensor saved twice costs nothing more), excluding the model's parameters
    (they are alive anyway); and the outputs."""
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved, outputs = {}, []

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in param_ptrs:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        for x in inputs:
            outputs.append(model(x))
    return sum(saved.values()), outputs


# One small instance of every kind of layer, estimator and wrapper, with an input for it (the tests
# that go over all layers: test_low_precision.py, test_export.py).
SMALL_LAYERS = {
    "linear": (lambda: BayesianLinear(8, 4), lambda: torch.randn(3, 8)),
    "linear_lrt": (lambda: BayesianLinear(8, 4, estimator="lrt"), lambda: torch.randn(3, 8)),
    "linear_flipout": (lambda: BayesianLinear(8, 4, estimator="flipout"), lambda: torch.randn(3, 8)),
    "linear_closed_form": (lambda: BayesianLinear(8, 4, kl="closed_form"), lambda: torch.randn(3, 8)),
    "conv2d": (lambda: BayesianConv2d(2, 3, (3, 3), padding=1), lambda: torch.randn(2, 2, 6, 6)),
    "conv2d_lrt": (lambda: BayesianConv2d(2, 3, (3, 3), estimator="lrt"), lambda: torch.randn(2, 2, 6, 6)),
    "conv_transpose2d": (lambda: BayesianConvTranspose2d(2, 3, (3, 3), stride=2), lambda: torch.randn(2, 2, 5, 5)),
    "lstm": (lambda: BayesianLSTM(4, 5), lambda: torch.randn(2, 6, 4)),
    "gru": (lambda: BayesianGRU(4, 5), lambda: torch.randn(2, 6, 4)),
    "embedding": (lambda: BayesianEmbedding(10, 4, padding_idx=0), lambda: torch.tensor([[1, 2, 0], [3, 4, 9]])),
    "embedding_closed_form": (lambda: BayesianEmbedding(10, 4, kl="closed_form"), lambda: torch.tensor([[1, 5]])),
    "flipout_wrapper": (lambda: Flipout(BayesianLinear)(8, 4), lambda: torch.randn(3, 8)),
    "radial_wrapper": (lambda: Radial(BayesianConv2d)(2, 3, (3, 3)), lambda: torch.randn(2, 2, 6, 6)),
    "flipout_lstm": (lambda: Flipout(BayesianLSTM)(4, 5), lambda: torch.randn(2, 6, 4)),
}
