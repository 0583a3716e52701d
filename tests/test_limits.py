"""Numerical limits on both backends (the `backend` / `ops` fixtures).

Within the supported range -- rho anywhere in [-100, 100], mu and weights up to +/-1e4, prior
sigmas down to 1e-8 (and up to 10), inputs up to +/-1e6 -- w, log q, log p and every gradient are
finite, on the op and through BayesianLinear.

Where finiteness is not possible, the rule is (tested below):
- NaN propagates, elementwise: a NaN in mu[i] or rho[i] makes w[i], grad_mu[i] and grad_rho[i]
  NaN and leaves every other element exactly as without it; log p (a sum over w) is NaN, and log q
  is NaN for a NaN rho (log sigma) but unaffected by a NaN mu (log q depends on eps and rho only).
  A NaN in a layer's input makes the outputs of that sample NaN (and the weight gradients, which
  sum over the batch); nothing crashes or raises.
- Infinite values are outside the supported range and give non-finite results without crashing:
  mu[i] = +/-inf gives w[i] = +/-inf and a non-finite log p (-inf; the compiled kernels give NaN,
  see test_compiled_log_p_of_infinite_weight_is_minus_inf) while log q stays finite; an infinite input gives
  non-finite outputs. Overflow of the user's own loss (e.g. squaring outputs of 1e20) is not the
  library's to prevent.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from bayes_ext.modules import BayesianLinear
from helpers import seed_tensor

DTYPES = [torch.float32, torch.float64]
RHOS = [-100.0, -60.0, -30.0, -20.0001, -20.0, -19.9999, -5.0, 0.0, 5.0, 20.0, 20.5, 50.0, 100.0]
MUS = [0.0, 1e-3, -1.0, 1e4, -1e4]
# (pi, sigma1, sigma2): the narrowest and widest supported components, one-component limits
PRIORS = [(0.5, 0.1, 1e-8), (0.5, 1e-8, 10.0), (1.0, 1e-8, 0.4), (0.0, 0.1, 1e-8), (0.25, 10.0, 1e-8),
          (1.0, 10.0, 10.0), (0.5, 1e-8, 1e-8)]


def _grid(dtype):
    mu = torch.tensor([m for m in MUS for _ in RHOS], dtype=dtype)
    rho = torch.tensor([r for _ in MUS for r in RHOS], dtype=dtype)
    return mu, rho


def _finite(*tensors):
    return all(bool(torch.isfinite(t).all()) for t in tensors)


@pytest.mark.parametrize("prior", PRIORS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_op_extremes_finite(ops, dtype, prior):
    """Every (mu, rho) pair of the grid under the extreme priors: forward, backward (with large
    upstream gradients) and autograd all finite; w equals mu + softplus(rho) eps."""
    mu, rho = _grid(dtype)
    seed = seed_tensor(0xDEADBEEF12345678)
    w, log_q, log_p = ops.sample_weight(mu, rho, seed, 1, *prior)
    assert _finite(w, log_q, log_p), (w, log_q, log_p)
    eps = ops.philox_normal(mu, seed, 1).double()
    ref_w = mu.double() + F.softplus(rho.double()) * eps
    tol = 1e-5 if dtype == torch.float32 else 1e-9
    torch.testing.assert_close(w.double(), ref_w, rtol=tol, atol=tol)
    gen = torch.Generator().manual_seed(1)
    for gw_scale in (0.0, 1.0, 1e4):
        grad_w = (gw_scale * torch.randn(mu.shape, generator=gen, dtype=torch.float64)).to(dtype)
        for glq, glp in ((1.0, 1.0), (-1.0, 0.0), (0.0, -1.0)):
            g_mu, g_rho, w2 = ops.sample_weight_backward(grad_w, torch.tensor(glq, dtype=dtype),
                                                         torch.tensor(glp, dtype=dtype), mu, rho, seed, 1, *prior,
                                                         True)
            assert _finite(g_mu, g_rho, w2), (gw_scale, glq, glp, g_mu, g_rho)
            assert torch.equal(w2, w)
    m = mu.clone().requires_grad_(True)
    r = rho.clone().requires_grad_(True)
    w, log_q, log_p = ops.sample_weight(m, r, seed, 1, *prior)
    (w.sum() + log_q - log_p).backward()
    assert _finite(m.grad, r.grad)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("x_scale", [1.0, 1e4, 1e6])
def test_layer_extremes_finite(backend, dtype, x_scale):
    """BayesianLinear with weights at +/-1e4, rho at both ends of [-100, 100], sigma_2 = 1e-8 and
    large inputs: output, KL terms and every gradient finite."""
    torch.manual_seed(0)
    layer = BayesianLinear(6, 4, prior_pi=0.5, prior_sigma_1=1.0, prior_sigma_2=1e-8, dtype=dtype)
    with torch.no_grad():
        layer.weight_mu.copy_(torch.tensor([1e4, -1e4, 0.0, 1.0, -3.0, 1e4]).repeat(4, 1))
        layer.weight_rho.copy_(torch.tensor([-100.0, 100.0, -20.0, 0.0, 30.0, -50.0]).repeat(4, 1))
        layer.bias_mu.copy_(torch.tensor([1e4, -1e4, 0.0, 2.0]))
        layer.bias_rho.copy_(torch.tensor([100.0, -100.0, 0.0, -30.0]))
    x = (x_scale * torch.randn(5, 6, dtype=dtype)).requires_grad_(True)
    y = layer(x)
    kl = layer.log_variational_posterior - layer.log_prior
    assert _finite(y, layer.log_variational_posterior, layer.log_prior)
    loss = y.mean() + 1e-30 * kl
    loss.backward()
    assert _finite(x.grad), x.grad
    for name, p in layer.named_parameters():
        assert p.grad is not None and _finite(p.grad), (name, p.grad)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("where", ["mu", "rho"])
def test_nan_parameter_propagates_elementwise(ops, backend, dtype, where):
    """NaN in mu[i] or rho[i]: w[i], grad_mu[i], grad_rho[i] are NaN, every other element is exactly
    what it is without the NaN; log p is NaN; log q is NaN iff rho holds the NaN."""
    mu, rho = _grid(dtype)
    seed, prior = seed_tensor(42), (0.5, 0.1, 1e-3)
    i = 7
    bad_mu, bad_rho = mu.clone(), rho.clone()
    (bad_mu if where == "mu" else bad_rho)[i] = float("nan")
    w, log_q, log_p = ops.sample_weight(mu, rho, seed, 0, *prior)
    bw, blog_q, blog_p = ops.sample_weight(bad_mu, bad_rho, seed, 0, *prior)
    others = torch.arange(mu.numel()) != i
    assert torch.isnan(bw[i])
    assert torch.equal(bw[others], w[others])
    assert torch.isnan(blog_p)
    if where == "rho":
        assert torch.isnan(blog_q)
    else:
        assert torch.equal(blog_q, log_q)
    grad_w = torch.randn(mu.shape, dtype=dtype)
    one = torch.tensor(1.0, dtype=dtype)
    good = ops.sample_weight_backward(grad_w, one, one, mu, rho, seed, 0, *prior, True)
    got = ops.sample_weight_backward(grad_w, one, one, bad_mu, bad_rho, seed, 0, *prior, True)
    for name, g, b in zip(("grad_mu", "grad_rho", "w"), good, got):
        assert torch.isnan(b[i]), name
        assert torch.equal(b[others], g[others]), name


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_in_upstream_gradient_propagates(ops, dtype):
    """NaN grad_log_p / grad_log_q (a NaN loss) make the gradients NaN, without raising."""
    mu, rho = _grid(dtype)
    seed, nan, one = seed_tensor(3), torch.tensor(float("nan"), dtype=dtype), torch.tensor(1.0, dtype=dtype)
    for glq, glp in ((nan, one), (one, nan)):
        g_mu, g_rho, _ = ops.sample_weight_backward(None, glq, glp, mu, rho, seed, 0, 0.5, 0.1, 0.4, False)
        assert torch.isnan(g_rho).all()
        if glp is nan:
            assert torch.isnan(g_mu).all()


@pytest.mark.parametrize("dtype", DTYPES)
def test_nan_input_propagates_through_layer(backend, dtype):
    """A NaN in one sample of the input: that sample's outputs are NaN, the others are untouched;
    backward runs (weight gradients, summed over the batch, are NaN in that input's column)."""
    torch.manual_seed(0)
    layer = BayesianLinear(5, 3, dtype=dtype)
    x = torch.randn(4, 5, dtype=dtype)
    torch.manual_seed(1)
    y_ref = layer(x).detach()
    x_bad = x.clone()
    x_bad[2, 1] = float("nan")
    x_bad.requires_grad_(True)
    torch.manual_seed(1)
    y = layer(x_bad)
    assert torch.isnan(y[2]).all()
    keep = [0, 1, 3]
    assert torch.equal(y[keep].detach(), y_ref[keep])
    assert _finite(layer.log_variational_posterior, layer.log_prior)
    y.sum().backward()
    assert torch.isnan(layer.weight_mu.grad[:, 1]).all()
    assert _finite(layer.weight_mu.grad[:, [0, 2, 3, 4]])
    assert _finite(layer.bias_mu.grad)
    assert torch.isnan(x_bad.grad[2]).all() == False  # noqa: E712  (grad_x = grad_y W: finite)
    assert _finite(x_bad.grad)


@pytest.mark.parametrize("dtype", DTYPES)
def test_infinite_values_follow_the_documented_rule(ops, dtype):
    """Outside the supported range: mu[i] = +/-inf gives w[i] = +/-inf, log p = -inf, log q finite
    (no crash, no exception); the other elements are unaffected."""
    mu, rho = _grid(dtype)
    seed, prior = seed_tensor(11), (0.5, 0.1, 0.4)
    w, log_q, _ = ops.sample_weight(mu, rho, seed, 0, *prior)
    for sign in (1.0, -1.0):
        bad = mu.clone()
        bad[3] = sign * math.inf
        bw, blog_q, blog_p = ops.sample_weight(bad, rho, seed, 0, *prior)
        assert bw[3].item() == sign * math.inf
        others = torch.arange(mu.numel()) != 3
        assert torch.equal(bw[others], w[others])
        assert torch.equal(blog_q, log_q)
        assert blog_p.item() == -math.inf
        g_mu, g_rho, _ = ops.sample_weight_backward(torch.ones_like(mu), torch.tensor(1.0, dtype=dtype),
                                                    torch.tensor(1.0, dtype=dtype), bad, rho, seed, 0, *prior, False)
        assert _finite(g_mu[others], g_rho[others])


@pytest.mark.parametrize("dtype", DTYPES)
def test_infinite_input_does_not_crash(backend, dtype):
    """An infinite input gives non-finite outputs for that sample (inf * w, and inf - inf = NaN in
    the sum over features), finite outputs for the others, and backward runs."""
    torch.manual_seed(0)
    layer = BayesianLinear(5, 3, dtype=dtype)
    x = torch.randn(4, 5, dtype=dtype)
    x[1, 0] = math.inf
    x.requires_grad_(True)
    y = layer(x)
    assert not torch.isfinite(y[1]).any()
    assert _finite(y[[0, 2, 3]])
    y.sum().backward()
    assert _finite(x.grad)  # grad_x = grad_y W does not involve x
    assert _finite(layer.bias_mu.grad, layer.bias_rho.grad)


@pytest.mark.parametrize("dtype", DTYPES)
def test_backends_agree_at_the_extremes(compiled, dtype):
    """The compiled and pure-PyTorch ops give the same w and KL terms on the extreme grid."""
    mu, rho = _grid(dtype)
    seed = seed_tensor(-12345)
    for prior in PRIORS:
        a = compiled.sample_weight(mu, rho, seed, 0, *prior)
        b = torch.ops.bayes_ext_py.sample_weight(mu, rho, seed, 0, *prior)
        scale = mu.double().abs() + F.softplus(rho.double()) * 6
        tol = 2e-5 if dtype == torch.float32 else 1e-9
        assert ((a[0].double() - b[0].double()).abs() <= tol * scale + 1e-37).all(), prior
        for x, y in zip(a[1:], b[1:]):
            assert math.isclose(x.item(), y.item(), rel_tol=1e-4 if dtype == torch.float32 else 1e-9, abs_tol=1e-3), \
                (prior, x, y)


# ---- once library bugs, kept as regression tests -------------------------------------------------

def test_compiled_float32_nan_rho_makes_log_q_nan(compiled):
    """The CPU float32 log used to read NaN's exponent bits as a number (log q finite)."""
    mu = torch.zeros(20)
    rho = torch.full((20,), -3.0)
    rho[10] = float("nan")
    _, log_q, _ = compiled.sample_weight(mu, rho, seed_tensor(42), 0, 0.5, 0.1, 1e-3)
    assert torch.isnan(log_q), log_q


@pytest.mark.parametrize("dtype", DTYPES)
def test_compiled_log_p_of_infinite_weight_is_minus_inf(compiled, dtype):
    """The compiled log-sum-exp used to give NaN for w = +-inf (-inf - -inf)."""
    mu = torch.zeros(8, dtype=dtype)
    mu[3] = math.inf
    rho = torch.full((8,), -3.0, dtype=dtype)
    _, _, log_p = compiled.sample_weight(mu, rho, seed_tensor(11), 0, 0.5, 0.1, 0.4)
    assert log_p.item() == -math.inf, log_p
