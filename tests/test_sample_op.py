"""The fused sampling op against an independent torch reference on the same eps, its gradients
(hand-written backward, registered autograd, gradcheck, opcheck), extreme values, compiled vs
fallback parity and the CPU instruction-set variants."""
import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import bayes_ext
from bayes_ext import functional as BF
from bayes_ext.modules import BayesianLinear
from helpers import ref_grads, ref_sample, seed_tensor, to64

PRIORS = [(1.0, 0.1, 0.4), (0.5, 0.3, 1.5), (0.0, 0.1, 0.4), (0.25, 1e-3, 2.0)]
SHAPES = [(1,), (7,), (3, 5), (2, 3, 4), (2, 3, 2, 5), (33, 65)]
DTYPES = [torch.float32, torch.float64]


def _tol(dtype):
    # float32 results compared with a float64 reference computed from the same (float32) eps
    return dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)


def _assert_grad_close(got, ref, dtype, prior):
    """float32 gradients vs a float64 reference. With a narrow prior component (sigma ~1e-3) the
    problem is ill-conditioned: w = mu + sigma eps loses digits to cancellation (an ulp of mu), and
    d log p / dw amplifies that by |d2 log p / dw2| ~ 1 / sigma^2, so compare on the gradient's scale."""
    got = got.double()
    if dtype == torch.float32 and min(prior[1], prior[2]) < 0.01:
        torch.testing.assert_close(got, ref, rtol=2e-4, atol=2e-4 * ref.abs().max().item())
    else:
        torch.testing.assert_close(got, ref, **_tol(dtype))


def _params(shape, dtype, seed=0, rho_shift=-2.0):
    gen = torch.Generator().manual_seed(seed)
    mu = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    rho = (torch.randn(shape, generator=gen, dtype=torch.float64) + rho_shift).to(dtype)
    return mu, rho


def _scalar(v, dtype):
    return torch.tensor(v, dtype=dtype)


# ---- forward vs reference -----------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("prior", PRIORS)
def test_forward_matches_reference(ops, dtype, shape, prior):
    mu, rho = _params(shape, dtype)
    seed, offset = seed_tensor(1234), 3
    w, log_q, log_p = ops.sample_weight(mu, rho, seed, offset, *prior)
    assert w.shape == mu.shape and w.dtype == dtype and w.is_contiguous()
    assert log_q.shape == () and log_p.shape == () and log_q.dtype == dtype and log_p.dtype == dtype
    eps = ops.philox_normal(mu, seed, offset)
    rw, rq, rp = ref_sample(*to64(mu, rho, eps), prior)
    tol = _tol(dtype)
    torch.testing.assert_close(w.double(), rw, **tol)
    torch.testing.assert_close(log_q.double(), rq, rtol=tol["rtol"], atol=1e-9)
    torch.testing.assert_close(log_p.double(), rp, rtol=tol["rtol"], atol=1e-9)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7,), (2, 3, 4), (33, 65)])
@pytest.mark.parametrize("prior", PRIORS)
def test_backward_matches_reference(ops, dtype, shape, prior):
    mu, rho = _params(shape, dtype, seed=1)
    gen = torch.Generator().manual_seed(2)
    grad_w = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    a, b = 0.7, -1.3
    seed, offset = seed_tensor(2 ** 63 + 5), 1
    eps = ops.philox_normal(mu, seed, offset)
    r_mu, r_rho = ref_grads(*to64(mu, rho, eps), prior, grad_w.double(), a, b)

    g_mu, g_rho, w_bw = ops.sample_weight_backward(grad_w, _scalar(a, dtype), _scalar(b, dtype), mu, rho, seed, offset,
                                                   *prior, True)
    _assert_grad_close(g_mu, r_mu, dtype, prior)
    _assert_grad_close(g_rho, r_rho, dtype, prior)
    w, _, _ = ops.sample_weight(mu, rho, seed, offset, *prior)
    torch.testing.assert_close(w_bw, w, rtol=1e-6, atol=1e-7)  # the regenerated sample is the forward's

    g_mu2, g_rho2, empty = ops.sample_weight_backward(grad_w, _scalar(a, dtype), _scalar(b, dtype), mu, rho, seed,
                                                      offset, *prior, False)
    assert empty.numel() == 0
    torch.testing.assert_close(g_mu2, g_mu, rtol=0, atol=0)
    torch.testing.assert_close(g_rho2, g_rho, rtol=0, atol=0)

    # the registered autograd of sample_weight gives the same gradients
    mu_r, rho_r = mu.clone().requires_grad_(), rho.clone().requires_grad_()
    w, log_q, log_p = ops.sample_weight(mu_r, rho_r, seed, offset, *prior)
    ((w * grad_w).sum() + a * log_q + b * log_p).backward()
    _assert_grad_close(mu_r.grad, r_mu, dtype, prior)
    _assert_grad_close(rho_r.grad, r_rho, dtype, prior)


@pytest.mark.parametrize("dtype", DTYPES)
def test_backward_without_grad_w(ops, dtype):
    mu, rho = _params((5, 6), dtype)
    seed = seed_tensor(77)
    prior = (0.5, 0.3, 1.5)
    args = (_scalar(0.4, dtype), _scalar(2.0, dtype), mu, rho, seed, 0, *prior, False)
    none = ops.sample_weight_backward(None, *args)
    zeros = ops.sample_weight_backward(torch.zeros_like(mu), *args)
    torch.testing.assert_close(none[0], zeros[0])
    torch.testing.assert_close(none[1], zeros[1])
    eps = ops.philox_normal(mu, seed, 0)
    r_mu, r_rho = ref_grads(*to64(mu, rho, eps), prior, None, 0.4, 2.0)
    torch.testing.assert_close(none[0].double(), r_mu, **_tol(dtype))
    torch.testing.assert_close(none[1].double(), r_rho, **_tol(dtype))


@pytest.mark.parametrize("which", ["log_q", "log_p", "w"])
def test_autograd_single_output(ops, which):
    # only one output feeds the loss: the others' gradients arrive as None / zeros
    mu, rho = _params((4, 9), torch.float64)
    seed, prior = seed_tensor(5), (0.5, 0.3, 1.5)
    mu_r, rho_r = mu.clone().requires_grad_(), rho.clone().requires_grad_()
    w, log_q, log_p = ops.sample_weight(mu_r, rho_r, seed, 0, *prior)
    out = {"w": w.sum() * 2, "log_q": log_q, "log_p": log_p}[which]
    out.backward()
    eps = ops.philox_normal(mu, seed, 0)
    coeffs = {"w": (torch.full_like(mu, 2.0), 0.0, 0.0), "log_q": (None, 1.0, 0.0), "log_p": (None, 0.0, 1.0)}[which]
    r_mu, r_rho = ref_grads(mu, rho, eps, prior, *coeffs)
    torch.testing.assert_close(mu_r.grad, r_mu)
    torch.testing.assert_close(rho_r.grad, r_rho)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("view", ["transposed", "sliced", "expanded_rho", "permuted_4d"])
def test_non_contiguous_inputs(ops, dtype, view):
    gen = torch.Generator().manual_seed(3)
    base_mu = torch.randn(8, 10, generator=gen, dtype=dtype)
    base_rho = torch.randn(8, 10, generator=gen, dtype=dtype) - 2
    if view == "transposed":
        mu, rho = base_mu.t(), base_rho.t()
    elif view == "sliced":
        mu, rho = base_mu[1::2, ::3], base_rho[::2, ::3]
    elif view == "expanded_rho":
        mu, rho = base_mu[:, 2:9], base_rho[0:1, :7].expand(8, 7)
    else:
        mu = base_mu.reshape(2, 4, 5, 2).permute(3, 1, 0, 2)
        rho = base_rho.reshape(2, 4, 5, 2).permute(3, 1, 0, 2)
    assert not mu.is_contiguous() or not rho.is_contiguous()
    seed, prior = seed_tensor(31), (0.5, 0.3, 1.5)
    grad_w = torch.randn(mu.shape, generator=gen, dtype=dtype).t().contiguous().t() if mu.dim() == 2 else \
        torch.randn(mu.shape, generator=gen, dtype=dtype)
    one = _scalar(1.0, dtype)
    w, log_q, log_p = ops.sample_weight(mu, rho, seed, 0, *prior)
    g_mu, g_rho, w_bw = ops.sample_weight_backward(grad_w, one, one, mu, rho, seed, 0, *prior, True)
    # element i of the logical row-major order always gets stream element i
    wc, qc, pc = ops.sample_weight(mu.contiguous(), rho.contiguous(), seed, 0, *prior)
    gc = ops.sample_weight_backward(grad_w.contiguous(), one, one, mu.contiguous(), rho.contiguous(), seed, 0, *prior,
                                    True)
    tight = dict(rtol=1e-6, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-13, atol=1e-14)
    assert w.shape == mu.shape and g_mu.shape == mu.shape and g_rho.shape == mu.shape and w_bw.shape == mu.shape
    torch.testing.assert_close(w, wc, **tight)
    torch.testing.assert_close(log_q, qc, **tight)
    torch.testing.assert_close(log_p, pc, **tight)
    for got, want in zip((g_mu, g_rho, w_bw), gc):
        torch.testing.assert_close(got, want, **tight)
    # and against the reference
    eps = ops.philox_normal(mu, seed, 0)
    rw, rq, rp = ref_sample(*to64(mu, rho, eps), prior)
    torch.testing.assert_close(w.double(), rw, **_tol(dtype))
    r_mu, r_rho = ref_grads(*to64(mu, rho, eps), prior, grad_w.double(), 1.0, 1.0)
    torch.testing.assert_close(g_rho.double(), r_rho, **_tol(dtype))
    torch.testing.assert_close(g_mu.double(), r_mu, **_tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(0,), (3, 0), (0, 4, 2)])
def test_zero_element_tensors(ops, dtype, shape):
    mu = torch.empty(shape, dtype=dtype)
    rho = torch.empty(shape, dtype=dtype)
    seed = seed_tensor(1)
    w, log_q, log_p = ops.sample_weight(mu, rho, seed, 0, 0.5, 0.1, 0.4)
    assert w.shape == shape and log_q.item() == 0.0 and log_p.item() == 0.0
    g_mu, g_rho, w2 = ops.sample_weight_backward(torch.empty(shape, dtype=dtype), _scalar(1.0, dtype),
                                                 _scalar(1.0, dtype), mu, rho, seed, 0, 0.5, 0.1, 0.4, True)
    assert g_mu.shape == shape and g_rho.shape == shape and w2.shape == shape
    assert ops.philox_normal(mu, seed, 0).shape == shape


def test_seed_forms_and_offsets(ops):
    mu, rho = _params((6, 7), torch.float32)
    prior = (1.0, 0.1, 0.4)
    w1 = ops.sample_weight(mu, rho, torch.tensor(9), 0, *prior)[0]
    w2 = ops.sample_weight(mu, rho, torch.tensor([9]), 0, *prior)[0]
    w3 = ops.sample_weight(mu, rho, torch.tensor([[9]]), 0, *prior)[0]
    assert torch.equal(w1, w2) and torch.equal(w1, w3)
    assert not torch.equal(w1, ops.sample_weight(mu, rho, torch.tensor(10), 0, *prior)[0])
    assert not torch.equal(w1, ops.sample_weight(mu, rho, torch.tensor(9), 1, *prior)[0])
    assert not torch.equal(w1, ops.sample_weight(mu, rho, torch.tensor(9 + 2 ** 32), 0, *prior)[0])
    # same seed -> same sample, every call
    assert torch.equal(w1, ops.sample_weight(mu, rho, torch.tensor(9), 0, *prior)[0])


def test_philox_normal_output_does_not_require_grad(ops):
    like = torch.randn(3, 4, requires_grad=True)
    eps = ops.philox_normal(like, seed_tensor(1), 0)
    assert not eps.requires_grad


# ---- gradcheck / opcheck ---------------------------------------------------------------------------

@pytest.mark.parametrize("prior", [(1.0, 0.7, 0.4), (0.5, 0.5, 2.0), (0.0, 0.1, 1.3)])
def test_gradcheck_sample_weight(backend, prior):
    mu, rho = _params((3, 4), torch.float64, rho_shift=-0.5)
    mu.requires_grad_()
    rho.requires_grad_()
    seed = seed_tensor(4242)

    def fn(m, r):
        return BF.sample_weight(m, r, seed, 2, prior)

    assert torch.autograd.gradcheck(fn, (mu, rho), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("bias", [True, False])
def test_gradcheck_bayesian_linear(backend, bias):
    gen = torch.Generator().manual_seed(8)
    x = torch.randn(4, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    w_mu = torch.randn(5, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    w_rho = (torch.randn(5, 3, generator=gen, dtype=torch.float64) - 1).requires_grad_()
    b_mu = torch.randn(5, generator=gen, dtype=torch.float64, requires_grad=True)
    b_rho = (torch.randn(5, generator=gen, dtype=torch.float64) - 1).requires_grad_()
    seed = seed_tensor(1001)
    prior = (0.5, 0.5, 2.0)
    inputs = (x, w_mu, w_rho, b_mu, b_rho) if bias else (x, w_mu, w_rho)

    def fn(*args):
        return BF.bayesian_linear(*args, seed=seed, prior=prior)

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5)


def _opcheck_args():
    mu, rho = _params((5, 7), torch.float64)
    mu.requires_grad_()
    rho.requires_grad_()
    seed = seed_tensor(123)
    gw = torch.randn(5, 7, dtype=torch.float64)
    return {
        "sample_weight": (mu, rho, seed, 3, 0.5, 0.3, 1.2),
        "sample_weight_backward": (gw, _scalar(0.7, torch.float64), _scalar(-0.3, torch.float64), mu.detach(),
                                   rho.detach(), seed, 3, 0.5, 0.3, 1.2, True),
        "philox_normal": (mu.detach(), seed, 2),
    }


@pytest.mark.parametrize("name", ["sample_weight", "sample_weight_backward", "philox_normal"])
def test_opcheck_ops(ops, name):
    result = torch.library.opcheck(getattr(ops, name), _opcheck_args()[name])
    assert all(v == "SUCCESS" for v in result.values()), result


@pytest.mark.parametrize("bias", [True, False])
def test_opcheck_linear_reparam(backend, bias):
    gen = torch.Generator().manual_seed(9)
    x = torch.randn(4, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    mu, rho = _params((5, 7), torch.float64)
    b_mu = torch.randn(5, generator=gen, dtype=torch.float64) if bias else None
    b_rho = torch.randn(5, generator=gen, dtype=torch.float64) - 2 if bias else None
    args = [x, mu.requires_grad_(), rho.requires_grad_(), b_mu, b_rho, seed_tensor(5), 0.5, 0.3, 1.2]
    if bias:
        args[3].requires_grad_()
        args[4].requires_grad_()
    result = torch.library.opcheck(torch.ops.bayes_ext.linear_reparam, tuple(args))
    assert all(v == "SUCCESS" for v in result.values()), result


# ---- extreme values --------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES)
def test_extreme_values_finite(ops, dtype):
    rhos = [-100.0, -30.0, -20.5, 0.0, 30.0, 100.0]
    mus = [0.0, 1.0, -3.0, 1e4, -1e4]
    rho = torch.tensor([r for _ in mus for r in rhos], dtype=dtype)
    mu = torch.tensor([m for m in mus for _ in rhos], dtype=dtype)
    seed = seed_tensor(2718)
    for prior in [(0.5, 0.1, 1e-8), (0.5, 1e-8, 0.1), (1.0, 1e-8, 0.4), (0.0, 0.1, 1e-8), (1.0, 0.1, 0.4)]:
        w, log_q, log_p = ops.sample_weight(mu, rho, seed, 0, *prior)
        assert torch.isfinite(w).all() and torch.isfinite(log_q) and torch.isfinite(log_p), prior
        one = _scalar(1.0, dtype)
        g_mu, g_rho, _ = ops.sample_weight_backward(torch.ones_like(mu), one, one, mu, rho, seed, 0, *prior, False)
        assert torch.isfinite(g_mu).all() and torch.isfinite(g_rho).all(), prior
        # log q = sum(-log sqrt(2 pi) - log sigma - eps^2 / 2) exactly, even where sigma underflows
        eps = ops.philox_normal(mu, seed, 0).double()
        rho64 = rho.double()
        log_sigma = torch.where(rho64 < -30, rho64, torch.log(F.softplus(rho64)))
        ref_q = (-0.5 * math.log(2 * math.pi) - log_sigma - 0.5 * eps ** 2).sum()
        torch.testing.assert_close(log_q.double(), ref_q, rtol=1e-6, atol=1e-6)
        # d log q / d rho -> -1 for very negative rho (sigmoid / softplus -> 1)
        g_q = ops.sample_weight_backward(None, one, _scalar(0.0, dtype), mu, rho, seed, 0, *prior, False)[1]
        ref_g_q = -torch.sigmoid(rho64) / F.softplus(rho64)
        ref_g_q = torch.where(rho64 < -30, torch.full_like(rho64, -1.0), ref_g_q)
        torch.testing.assert_close(g_q.double(), ref_g_q, rtol=1e-5, atol=1e-7)
    # the sampled weight itself: rho = 100 means sigma = 100
    w = ops.sample_weight(mu, rho, seed, 0, 1.0, 0.1, 0.4)[0]
    eps = ops.philox_normal(mu, seed, 0)
    torch.testing.assert_close(w.double(), mu.double() + F.softplus(rho.double()) * eps.double(), rtol=1e-5, atol=1e-6)


def test_large_weight_log_prior_has_gradient(ops):
    # w ~ 1e3 under a mixture: the logsumexp keeps log p and its gradient exact (BLiTZ's +1e-6 zeroes it)
    mu = torch.full((4,), 1e3, dtype=torch.float64, requires_grad=True)
    rho = torch.full((4,), -30.0, dtype=torch.float64, requires_grad=True)
    prior = (0.5, 0.1, 2.0)
    w, _, log_p = ops.sample_weight(mu, rho, seed_tensor(3), 0, *prior)
    log_p.backward()
    ref = torch.distributions.Normal(0.0, 2.0).log_prob(w.detach()).sum() + 4 * math.log(0.5)
    torch.testing.assert_close(log_p, ref)
    torch.testing.assert_close(mu.grad, -w.detach() / 4.0)


# ---- compiled vs fallback ---------------------------------------------------------------------------

PARITY_TOL = {torch.float32: dict(rtol=1e-5, atol=1e-6), torch.float64: dict(rtol=1e-12, atol=1e-12)}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("prior", PRIORS)
@pytest.mark.parametrize("shape", [(5,), (64, 33), (3, 100, 70)])
def test_compiled_matches_fallback_op(compiled, dtype, prior, shape):
    py = torch.ops.bayes_ext_py
    mu, rho = _params(shape, dtype, seed=4)
    seed = seed_tensor(2 ** 62 + 17)
    tol = PARITY_TOL[dtype]
    a = compiled.sample_weight(mu, rho, seed, 1, *prior)
    b = py.sample_weight(mu, rho, seed, 1, *prior)
    torch.testing.assert_close(a[0], b[0], **tol)
    torch.testing.assert_close(a[1], b[1], rtol=tol["rtol"], atol=1e-4 if dtype == torch.float32 else 1e-9)
    torch.testing.assert_close(a[2], b[2], rtol=tol["rtol"], atol=1e-4 if dtype == torch.float32 else 1e-9)
    gw = torch.randn(shape, dtype=dtype)
    args = (gw, _scalar(0.3, dtype), _scalar(-0.8, dtype), mu, rho, seed, 1, *prior, True)
    for x, y in zip(compiled.sample_weight_backward(*args), py.sample_weight_backward(*args)):
        if dtype == torch.float32 and min(prior[1:]) < 0.01:
            # ill-conditioned (see _assert_grad_close): compare on the scale of the gradient
            torch.testing.assert_close(x, y, rtol=2e-4, atol=2e-4 * y.abs().max().item())
        else:
            torch.testing.assert_close(x, y, rtol=tol["rtol"] * 10, atol=tol["atol"] * 10)


def _train_step(backend_name, dtype, seed=0):
    with bayes_ext.use_backend(backend_name):
        torch.manual_seed(seed)
        layer = BayesianLinear(37, 19, prior_sigma_1=0.5, prior_sigma_2=0.05, prior_pi=0.3, posterior_rho_init=-3.0,
                               dtype=dtype)
        x = torch.randn(11, 37, dtype=dtype, requires_grad=True)
        y = layer(x)
        loss = (y ** 2).mean() + 1e-3 * (layer.log_variational_posterior - layer.log_prior)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
        return y.detach(), layer.log_variational_posterior.detach(), layer.log_prior.detach(), x.grad, grads


@pytest.mark.parametrize("dtype", DTYPES)
def test_compiled_matches_fallback_layer_training_step(compiled, dtype):
    a = _train_step("compiled", dtype)
    b = _train_step("python", dtype)
    tol = PARITY_TOL[dtype]
    loose = dict(rtol=tol["rtol"] * 10, atol=tol["atol"] * 10)
    torch.testing.assert_close(a[0], b[0], **loose)
    torch.testing.assert_close(a[1], b[1], rtol=tol["rtol"], atol=1e-9)
    torch.testing.assert_close(a[2], b[2], rtol=tol["rtol"], atol=1e-9)
    torch.testing.assert_close(a[3], b[3], **loose)
    assert a[4].keys() == b[4].keys() == {"weight_mu", "weight_rho", "bias_mu", "bias_rho"}
    for name in a[4]:
        torch.testing.assert_close(a[4][name], b[4][name], **loose, msg=lambda m, name=name: f"{name}: {m}")


# ---- CPU instruction-set variants -------------------------------------------------------------------

_ISA_SCRIPT = r"""
import json, sys, torch
import bayes_ext
from bayes_ext import functional as BF
ops = torch.ops.bayes_ext
isa = ops.cpu_kernel_isa()
gen = torch.Generator().manual_seed(0)
shape = (37, 1001)
mu = torch.randn(shape, generator=gen)
rho = torch.randn(shape, generator=gen) - 3
seed = torch.tensor([123456789])
eps = ops.philox_normal(mu, seed, 1)
w, lq, lp = ops.sample_weight(mu, rho, seed, 1, 0.5, 0.1, 0.4)
gw = torch.randn(shape, generator=gen)
g = ops.sample_weight_backward(gw, torch.tensor(0.5), torch.tensor(-2.0), mu, rho, seed, 1, 0.5, 0.1, 0.4, True)
# unaligned sub-ranges of the stream (the kernels align each tile to its Philox block)
odd = ops.philox_normal(torch.empty(4099), seed, 2)
# the LRT output-noise ops (odd-sized, so the last tile is partial)
lrt_std = torch.rand(33, 1001, generator=gen)
lrt_y = ops.lrt_output_(lrt_std, torch.randn(33, 1001, generator=gen), seed, 2)
lrt_half_u = ops.lrt_noise_grad(torch.randn(33, 1001, generator=gen), lrt_std, seed, 2)
torch.save(dict(isa=isa, eps=eps, w=w, lq=lq, lp=lp, g_mu=g[0], g_rho=g[1], w_bw=g[2], odd=odd, lrt_y=lrt_y,
                lrt_std=lrt_std, lrt_half_u=lrt_half_u), sys.argv[1])
"""


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def _run_isa(cap, path, env_extra=None):
    env = dict(os.environ)
    env.pop("BAYES_EXT_FORCE_PYTHON", None)
    if cap is None:
        env.pop("BAYES_EXT_CPU_ISA", None)
    else:
        env["BAYES_EXT_CPU_ISA"] = cap
    return subprocess.run([sys.executable, "-c", _ISA_SCRIPT, str(path)], env=env, capture_output=True, text=True,
                          timeout=120)


def test_cpu_isa_variants_agree(compiled, tmp_path):
    results = {}
    for cap in ["portable", "avx2", "avx512", None]:
        path = tmp_path / f"{cap}.pt"
        proc = _run_isa(cap, path)
        assert proc.returncode == 0, proc.stderr
        results[cap] = torch.load(path)
    flags = _cpu_flags()
    assert results["portable"]["isa"] == "portable"
    if flags is not None:
        has_avx2 = {"avx2", "fma"} <= flags
        has_avx512 = {"avx512f", "avx512dq", "avx512vl", "avx512bw"} <= flags
        assert results["avx2"]["isa"] == ("avx2" if has_avx2 else "portable")
        assert results["avx512"]["isa"] == ("avx512" if has_avx512 else "avx2" if has_avx2 else "portable")
    assert results["avx2"]["isa"] in ("avx2", "portable")
    assert results[None]["isa"] == results["avx512"]["isa"]  # no cap = the best the CPU has
    ref = results["portable"]
    for cap in ["avx2", "avx512", None]:
        for key in ["eps", "w", "lq", "lp", "g_mu", "g_rho", "w_bw", "odd", "lrt_y", "lrt_std", "lrt_half_u"]:
            # relative to the tensor's scale: g_mu = grad_w + grad_log_p * dlog p/dw cancels in places
            scale = max(1.0, ref[key].abs().max().item())
            torch.testing.assert_close(results[cap][key], ref[key], rtol=1e-6, atol=1e-6 * scale,
                                       msg=lambda m, cap=cap, key=key: f"{cap} vs portable, {key}: {m}")
    # and the portable float32 kernel against the fallback in this process
    py = torch.ops.bayes_ext_py
    gen = torch.Generator().manual_seed(0)
    mu = torch.randn(37, 1001, generator=gen)
    rho = torch.randn(37, 1001, generator=gen) - 3
    w, lq, lp = py.sample_weight(mu, rho, torch.tensor([123456789]), 1, 0.5, 0.1, 0.4)
    torch.testing.assert_close(ref["w"], w, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ref["lq"], lq, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(ref["lp"], lp, rtol=1e-5, atol=1e-3)


def test_cpu_isa_invalid_value_is_rejected(compiled, tmp_path):
    proc = _run_isa("sse9", tmp_path / "x.pt")
    assert proc.returncode != 0
    assert "BAYES_EXT_CPU_ISA" in proc.stderr


# ---- start: sampling a block of rows with the noise it has in the whole weight --------------------

@pytest.mark.parametrize("rows", [(0, 5), (3, 4), (5, 37), (10, 21)])
def test_start_samples_rows_with_their_noise_in_the_whole_tensor(ops, rows):
    r0, r1 = rows
    cols, prior, seed = 11, (0.5, 0.1, 0.4), seed_tensor(99)
    mu, rho = _params((37, cols), torch.float64, rho_shift=-1.0)
    w, _, _ = ops.sample_weight(mu, rho, seed, 2, *prior)
    block, log_q, log_p = ops.sample_weight(mu[r0:r1], rho[r0:r1], seed, 2, *prior, r0 * cols)
    torch.testing.assert_close(block, w[r0:r1], rtol=0, atol=1e-12)
    eps = ops.philox_normal(mu, seed, 2)[r0:r1]
    assert torch.equal(ops.philox_normal(mu[r0:r1], seed, 2, r0 * cols), eps)
    sigma = torch.nn.functional.softplus(rho[r0:r1])
    torch.testing.assert_close(log_q, torch.distributions.Normal(mu[r0:r1], sigma).log_prob(block).sum())
    grad_w = torch.randn(r1 - r0, cols, dtype=torch.float64)
    full_grad_w = torch.zeros(37, cols, dtype=torch.float64)
    full_grad_w[r0:r1] = grad_w
    zero = torch.zeros((), dtype=torch.float64)
    g_block = ops.sample_weight_backward(grad_w, zero, zero, mu[r0:r1], rho[r0:r1], seed, 2, *prior, True, r0 * cols)
    g_full = ops.sample_weight_backward(full_grad_w, zero, zero, mu, rho, seed, 2, *prior, True)
    for block_part, full_part in zip(g_block, g_full):
        torch.testing.assert_close(block_part, full_part[r0:r1], rtol=0, atol=1e-12)


def test_start_out_of_range_is_rejected(ops):
    mu = torch.zeros(4)
    with pytest.raises(ValueError, match="start"):
        ops.sample_weight(mu, mu, seed_tensor(1), 0, 1.0, 0.1, 0.4, -1)
    with pytest.raises(ValueError, match="start"):
        ops.philox_normal(mu, seed_tensor(1), 0, 2 ** 62)


# ---- sample_kl: the KL terms without the sample ----------------------------------------------------

@pytest.mark.parametrize("prior", [(1.0, 0.7, 0.4), (0.5, 0.5, 2.0), (0.0, 0.1, 1.3)])
@pytest.mark.parametrize("start", [0, 3])
def test_sample_kl_equals_sample_weight_terms(ops, prior, start):
    """Same (log q, log p) as sample_weight on the same stream, and the same gradients."""
    mu, rho = _params((37, 41), torch.float64)
    seed = seed_tensor(77)
    m1, r1 = mu.clone().requires_grad_(), rho.clone().requires_grad_()
    q1, p1 = ops.sample_kl(m1, r1, seed, 2, *prior, start)
    (0.3 * q1 - 0.8 * p1).backward()
    m2, r2 = mu.clone().requires_grad_(), rho.clone().requires_grad_()
    _, q2, p2 = ops.sample_weight(m2, r2, seed, 2, *prior, start)
    (0.3 * q2 - 0.8 * p2).backward()
    torch.testing.assert_close(q1, q2, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(p1, p2, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(m1.grad, m2.grad)
    torch.testing.assert_close(r1.grad, r2.grad)


def test_sample_kl_float32_matches_sample_weight(compiled):
    mu, rho = _params((300, 301), torch.float32)
    seed = seed_tensor(5)
    q, p = compiled.sample_kl(mu, rho, seed, 0, 0.5, 0.3, 1.2)
    _, q2, p2 = compiled.sample_weight(mu, rho, seed, 0, 0.5, 0.3, 1.2)
    assert torch.equal(q, q2) and torch.equal(p, p2)  # the same kernel loop, minus the store


def test_sample_kl_opcheck_and_gradcheck(ops):
    mu, rho = _params((5, 7), torch.float64)
    mu.requires_grad_()
    rho.requires_grad_()
    seed = seed_tensor(123)
    result = torch.library.opcheck(ops.sample_kl, (mu, rho, seed, 3, 0.5, 0.3, 1.2))
    assert all(v == "SUCCESS" for v in result.values()), result
    assert torch.autograd.gradcheck(lambda m, r: ops.sample_kl(m, r, seed, 1, 0.5, 0.5, 2.0), (mu, rho),
                                    eps=1e-6, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="prior_pi"):
        ops.sample_kl(mu, rho, seed, 0, 1.5, 0.3, 1.2)


# ---- multi-seed ops (the vectorised multi-sample ELBO) ---------------------------------------------

def _seeds(*values):
    return torch.tensor(values, dtype=torch.int64)


@pytest.mark.parametrize("shape", [(7,), (37, 41), (130, 300)])
def test_sample_weight_samples_equal_per_seed_calls(ops, shape):
    mu, rho = _params(shape, torch.float32)
    seeds = _seeds(3, -5, 2 ** 62, 11)
    w, log_q, log_p = ops.sample_weight_samples(mu, rho, seeds, 1, 0.5, 0.3, 1.2)
    assert w.shape == (4,) + shape and log_q.shape == log_p.shape == (4,)
    for s in range(4):
        w_s, q_s, p_s = ops.sample_weight(mu, rho, seeds[s], 1, 0.5, 0.3, 1.2)
        assert torch.equal(w[s], w_s) and torch.equal(log_q[s], q_s) and torch.equal(log_p[s], p_s)


# (64, 200): one chunk and >= 32768 sample-elements, the CPU kernel's sample-parallel path.
# float32 runs the vectorised (AVX2 / AVX-512) kernels with softplus shared between the samples.
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(37, 41), (64, 200), (130, 300)])
def test_sample_weight_samples_backward_sums_per_seed_gradients(ops, shape, dtype):
    mu, rho = _params(shape, dtype)
    seeds = _seeds(9, 10, 12)
    gen = torch.Generator().manual_seed(2)
    grad_w = torch.randn((3,) + shape, generator=gen, dtype=torch.float64).to(dtype)
    glq, glp = torch.tensor([0.2, -0.1, 0.5], dtype=dtype), torch.tensor([1.0, 0.3, -0.7], dtype=dtype)
    grad_mu, grad_rho, w = ops.sample_weight_samples_backward(grad_w, glq, glp, mu, rho, seeds, 0, 1.0, 0.4, 0.4, True)
    expected_mu = expected_rho = 0
    for s in range(3):
        g_mu, g_rho, w_s = ops.sample_weight_backward(grad_w[s], glq[s], glp[s], mu, rho, seeds[s], 0, 1.0, 0.4, 0.4,
                                                      True)
        expected_mu, expected_rho = expected_mu + g_mu, expected_rho + g_rho
        assert torch.equal(w[s], w_s)
    tol = 1e-12 if dtype == torch.float64 else 1e-6  # float32: the same sums, summed in the same order
    torch.testing.assert_close(grad_mu, expected_mu, rtol=tol, atol=tol)
    torch.testing.assert_close(grad_rho, expected_rho, rtol=tol, atol=tol)
    no_w = ops.sample_weight_samples_backward(None, glq, glp, mu, rho, seeds, 0, 1.0, 0.4, 0.4, False)
    assert no_w[2].numel() == 0


@pytest.mark.parametrize("shape", [(64, 200), (130, 300)])
def test_sample_weight_samples_backward_same_for_any_thread_count(compiled, shape):
    """The compiled kernel runs the samples (small weights) or the chunks (large ones) in parallel
    and adds the sums in sample order either way: bitwise the same on 1 and 3 threads. (The
    fallback's torch ops need not be: their vector/scalar split moves with the thread count.)"""
    ops = compiled
    mu, rho = _params(shape, torch.float32)
    seeds = _seeds(4, 5, 6, 7)
    grad_w = torch.randn((4,) + shape, generator=torch.Generator().manual_seed(3))
    glq, glp = torch.tensor([0.2, -0.1, 0.5, 0.3]), torch.tensor([1.0, 0.3, -0.7, 0.1])
    results = []
    for threads in (1, 3):
        torch.set_num_threads(threads)
        results.append(ops.sample_weight_samples_backward(grad_w, glq, glp, mu, rho, seeds, 0, 0.5, 0.3, 1.2, True))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_sample_weight_samples_autograd_opcheck_gradcheck(ops):
    mu, rho = _params((5, 7), torch.float64)
    mu.requires_grad_()
    rho.requires_grad_()
    seeds = _seeds(1, 2)
    result = torch.library.opcheck(ops.sample_weight_samples, (mu, rho, seeds, 3, 0.5, 0.3, 1.2))
    assert all(v == "SUCCESS" for v in result.values()), result
    fn = lambda m, r: ops.sample_weight_samples(m, r, seeds, 0, 0.5, 0.5, 2.0)
    assert torch.autograd.gradcheck(fn, (mu, rho), eps=1e-6, atol=1e-6, rtol=1e-5)
    args = (None, torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64), mu.detach(), rho.detach(),
            seeds, 0, 0.5, 0.3, 1.2, True)
    result = torch.library.opcheck(ops.sample_weight_samples_backward, args)
    assert all(v == "SUCCESS" for v in result.values()), result


def test_sample_weight_samples_bad_inputs(ops):
    mu, rho = torch.zeros(3, 2), torch.zeros(3, 2)
    with pytest.raises(TypeError, match="seeds must be an int64"):
        ops.sample_weight_samples(mu, rho, torch.tensor([1, 2], dtype=torch.int32), 0, 1.0, 0.1, 0.1)
    with pytest.raises(ValueError, match="seeds must be a 1-D"):
        ops.sample_weight_samples(mu, rho, torch.tensor([[1, 2]]), 0, 1.0, 0.1, 0.1)
    with pytest.raises(ValueError, match="seeds must be a 1-D"):
        ops.sample_weight_samples(mu, rho, torch.tensor([], dtype=torch.int64), 0, 1.0, 0.1, 0.1)
    seeds = _seeds(1, 2)
    with pytest.raises(ValueError, match="grad_log_q must have shape"):
        ops.sample_weight_samples_backward(None, torch.zeros(3), torch.zeros(2), mu, rho, seeds, 0, 1.0, 0.1, 0.1,
                                           False)
    with pytest.raises(ValueError, match="grad_w must"):
        ops.sample_weight_samples_backward(torch.zeros(2, 3, 3), torch.zeros(2), torch.zeros(2), mu, rho, seeds, 0, 1.0,
                                           0.1, 0.1, False)


# ---- sample_weight_backward_into: the blocked linear backward's writer ------------------------------

def test_backward_into_writes_what_backward_returns_into_row_blocks(ops):
    mu, rho = _params((12, 7), torch.float64)
    seed = seed_tensor(31)
    gen = torch.Generator().manual_seed(4)
    grad_w = torch.randn(12, 7, generator=gen, dtype=torch.float64)
    glq, glp = _scalar(0.4, torch.float64), _scalar(-1.1, torch.float64)
    g_mu, g_rho, w = ops.sample_weight_backward(grad_w, glq, glp, mu, rho, seed, 2, 0.5, 0.3, 1.2, True)
    out_mu, out_rho = torch.full_like(mu, float("nan")), torch.full_like(rho, float("nan"))
    blocks = []
    for r0, r1 in ((0, 5), (5, 12)):  # each block with the noise it has in the whole weight
        blocks.append(ops.sample_weight_backward_into(out_mu[r0:r1], out_rho[r0:r1], grad_w[r0:r1], glq, glp,
                                                      mu[r0:r1], rho[r0:r1], seed, 2, 0.5, 0.3, 1.2, True, r0 * 7))
    assert torch.equal(out_mu, g_mu) and torch.equal(out_rho, g_rho)
    assert torch.equal(torch.cat(blocks), w)
    empty = ops.sample_weight_backward_into(out_mu, out_rho, None, glq, glp, mu, rho, seed, 2, 0.5, 0.3, 1.2, False)
    assert empty.numel() == 0


def test_backward_into_opcheck_and_bad_outputs(ops):
    mu, rho = _params((5, 7), torch.float64)
    args = (torch.zeros(5, 7, dtype=torch.float64), torch.zeros(5, 7, dtype=torch.float64),
            torch.randn(5, 7, dtype=torch.float64), _scalar(0.7, torch.float64), _scalar(-0.3, torch.float64), mu, rho,
            seed_tensor(123), 3, 0.5, 0.3, 1.2, True)
    result = torch.library.opcheck(ops.sample_weight_backward_into, args)
    assert all(v == "SUCCESS" for v in result.values()), result
    z = _scalar(0.0, torch.float64)
    with pytest.raises(ValueError, match="grad_mu must have the shape"):
        ops.sample_weight_backward_into(torch.zeros(4, 7, dtype=torch.float64), torch.zeros(5, 7, dtype=torch.float64),
                                        None, z, z, mu, rho, seed_tensor(1), 0, 1.0, 0.1, 0.1, False)
    with pytest.raises(ValueError, match="grad_rho must be contiguous"):
        ops.sample_weight_backward_into(torch.zeros(5, 7, dtype=torch.float64),
                                        torch.zeros(7, 5, dtype=torch.float64).t(), None, z, z, mu, rho,
                                        seed_tensor(1), 0, 1.0, 0.1, 0.1, False)
