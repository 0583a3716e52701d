"""BayesianLinear(estimator="lrt"): local reparameterisation with the exact KL."""
import pytest
import torch
import torch.nn.functional as F

import bayes_ext
from bayes_ext import functional as BF
from bayes_ext import functional_estimators as BFE
from bayes_ext.modules import BayesianLinear
from helpers import assert_row_blocks_match_whole, posterior_7x9, seed_tensor


def layer(**kwargs):
    torch.manual_seed(0)
    kwargs.setdefault("posterior_rho_init", -1.5)
    return BayesianLinear(6, 4, estimator="lrt", **kwargs)


def test_output_moments_match_the_weight_noise_model(backend):
    """E[y] = x mu^T + b_mu and Var[y] = x^2 (sigma^2)^T + sigma_b^2, the moments of y = x W^T + b."""
    lin = layer()
    x = torch.randn(3, 6, dtype=torch.float64)
    mu, rho = lin.weight_mu.detach().double(), lin.weight_rho.detach().double()
    b_mu, b_rho = lin.bias_mu.detach().double(), lin.bias_rho.detach().double()
    with torch.no_grad():
        draws = torch.stack([BF.linear_lrt(x, mu, rho, b_mu, b_rho, seed_tensor(s)) for s in range(4000)])
    mean = F.linear(x, mu, b_mu)
    var = F.linear(x * x, F.softplus(rho) ** 2, F.softplus(b_rho) ** 2)
    torch.testing.assert_close(draws.mean(0), mean, atol=4 * (var / 4000).sqrt().max().item(), rtol=0)
    torch.testing.assert_close(draws.var(0), var, rtol=0.1, atol=0)


def test_noise_is_the_philox_stream_and_the_same_on_both_backends(compiled):
    lin = layer()
    x, seed = torch.randn(5, 6), seed_tensor(7)
    args = (x, lin.weight_mu, lin.weight_rho, lin.bias_mu, lin.bias_rho, seed)
    with bayes_ext.use_backend("compiled"):
        a = BF.linear_lrt(*args)
    with bayes_ext.use_backend("python"):
        b = BF.linear_lrt(*args)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    mean = F.linear(x, lin.weight_mu, lin.bias_mu)
    std = F.linear(x * x, F.softplus(lin.weight_rho) ** 2, F.softplus(lin.bias_rho) ** 2).sqrt()
    eps = torch.ops.bayes_ext.philox_normal(mean, seed, BF.LRT_NOISE_OFFSET)
    torch.testing.assert_close(a, mean + std * eps)


def test_gradcheck(backend):
    gen = torch.Generator().manual_seed(3)
    tensors = [torch.randn(*shape, generator=gen, dtype=torch.float64) for shape in ((4, 3), (2, 3), (2, 3), (2,), (2,))]
    tensors[2] -= 1
    tensors[4] -= 1
    for t in tensors:
        t.requires_grad_()
    seed = seed_tensor(11)
    assert torch.autograd.gradcheck(lambda *a: BF.linear_lrt(*a, seed), tuple(tensors))


def test_kl_is_the_closed_form(backend):
    lin = layer(prior_sigma_1=0.5)
    lin(torch.randn(2, 6))
    prior = torch.distributions.Normal(0.0, 0.5)
    expected = sum(torch.distributions.kl_divergence(torch.distributions.Normal(m, F.softplus(r)), prior).sum()
                   for m, r in ((lin.weight_mu, lin.weight_rho), (lin.bias_mu, lin.bias_rho)))
    torch.testing.assert_close(lin.log_variational_posterior - lin.log_prior, expected)
    assert lin.log_variational_posterior.requires_grad


def test_freeze_and_errors(backend):
    lin = layer()
    lin.freeze = True
    x = torch.randn(2, 6)
    torch.testing.assert_close(lin(x), F.linear(x, lin.weight_mu, lin.bias_mu))
    with pytest.raises(ValueError, match="estimator"):
        BayesianLinear(6, 4, estimator="flipout-ish")
    with pytest.raises(ValueError, match="single Gaussian prior"):
        BayesianLinear(6, 4, estimator="lrt", kl="closed_form", prior_pi=0.5)
    BayesianLinear(6, 4, estimator="lrt", prior_pi=0.5)  # a mixture prior: MC KL (tests/test_estimators.py)
    with pytest.raises(ValueError, match="features"):
        layer()(torch.randn(2, 5))
    bias_free = layer(bias=False)
    assert bias_free(torch.randn(2, 6)).shape == (2, 4)


@pytest.mark.parametrize("need_x", [True, False])
def test_row_blocks_give_the_whole_weights_values_and_gradients(backend, monkeypatch, need_x):
    """A large CPU weight's sigma^2 is built block by block of rows (forward and backward): the
    output, the closed-form KL and every gradient equal the one-block computation."""
    params = posterior_7x9(3)
    x = torch.randn(4, 3, 9, dtype=torch.float64, requires_grad=need_x)
    g = torch.randn(4, 3, 7, dtype=torch.float64)

    def run():
        y, kl = BFE.linear_lrt_with_kl(x, *params, seed=seed_tensor(11), prior_sigma=0.7)
        return (y, kl), (y * g).sum() + 0.3 * kl
    assert_row_blocks_match_whole(monkeypatch, params[0], run, [t for t in (x,) + params if t.requires_grad])
