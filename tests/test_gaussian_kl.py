"""The closed-form KL ops (gaussian_kl, gaussian_kl_backward) and the accumulating row backward
(sample_rows_backward_add_): values against torch.distributions on both backends, float64
gradcheck, compiled vs fallback parity, thread-count independence, opcheck, bad inputs."""
import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal, kl_divergence

from helpers import seed_tensor


def params(n=3000, dtype=torch.float64, low=-30.0, high=25.0):
    gen = torch.Generator().manual_seed(7)
    mu = torch.randn(n, generator=gen, dtype=dtype)
    rho = torch.empty(n, dtype=dtype).uniform_(low, high, generator=gen)
    return mu, rho


def reference_kl(mu, rho, sigma):
    prior = Normal(torch.tensor(0.0, dtype=mu.dtype), torch.tensor(sigma, dtype=mu.dtype))  # not float32 0.3
    return kl_divergence(Normal(mu, F.softplus(rho)), prior).sum()


@pytest.mark.parametrize("shape", [(1,), (63,), (5, 7), (3000,), (40001,)])
def test_value_matches_torch_distributions(ops, shape):
    mu, rho = params(int(torch.tensor(shape).prod()), low=-15.0, high=15.0)
    mu, rho = mu.reshape(shape), rho.reshape(shape)
    got = ops.gaussian_kl(mu, rho, 0.3)
    assert got.dtype == torch.float64 and got.dim() == 0
    torch.testing.assert_close(got, reference_kl(mu, rho, 0.3), rtol=1e-12, atol=1e-9)


def test_exact_for_tiny_and_large_sigma(ops):
    """Below rho = -20 softplus underflows relative to 1: log sigma must be rho, not log(0) = -inf."""
    mu = torch.tensor([0.1, -0.2, 0.0, 1.0], dtype=torch.float32)
    rho = torch.tensor([-30.0, -100.0, 25.0, 0.0], dtype=torch.float32)
    got = ops.gaussian_kl(mu, rho, 1.0)
    sigma = F.softplus(rho.double())
    log_sigma = torch.where(rho.double() < -20, rho.double(), sigma.log())
    expected = (-log_sigma + (sigma ** 2 + mu.double() ** 2) / 2 - 0.5).sum()
    assert torch.isfinite(got)
    torch.testing.assert_close(got.double(), expected, rtol=1e-6, atol=1e-4)
    grad_mu, grad_rho = ops.gaussian_kl_backward(torch.tensor(1.0), mu, rho, 1.0)
    assert torch.isfinite(grad_mu).all() and torch.isfinite(grad_rho).all()
    torch.testing.assert_close(grad_rho[:2], torch.tensor([-1.0, -1.0]), rtol=1e-6, atol=0)  # d(-log sigma)/drho


def test_backward_matches_autograd_of_the_reference(ops):
    mu, rho = params(2000, low=-25.0, high=20.0)
    g = torch.tensor(-1.7, dtype=torch.float64)
    grad_mu, grad_rho = ops.gaussian_kl_backward(g, mu, rho, 0.25)
    m, r = mu.clone().requires_grad_(), rho.clone().requires_grad_()
    # the reference's log softplus loses the tiny-sigma limit below -20 in float64 only by ~1e-9
    (g * reference_kl(m, r, 0.25)).backward()
    torch.testing.assert_close(grad_mu, m.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_rho, r.grad, rtol=1e-8, atol=1e-8)


def test_gradcheck_float64(ops):
    mu, rho = params(11, low=-4.0, high=3.0)
    mu.requires_grad_()
    rho.requires_grad_()
    assert torch.autograd.gradcheck(lambda m, r: ops.gaussian_kl(m, r, 0.6), (mu, rho), eps=1e-6, atol=1e-6)


def test_compiled_and_fallback_agree_in_float32(compiled):
    mu, rho = params(100_003, dtype=torch.float32, low=-12.0, high=6.0)
    g = torch.tensor(0.5)
    a = torch.ops.bayes_ext.gaussian_kl(mu, rho, 0.1)
    b = torch.ops.bayes_ext_py.gaussian_kl(mu, rho, 0.1)
    torch.testing.assert_close(a, b, rtol=2e-6, atol=0)
    for x, y in zip(torch.ops.bayes_ext.gaussian_kl_backward(g, mu, rho, 0.1),
                    torch.ops.bayes_ext_py.gaussian_kl_backward(g, mu, rho, 0.1)):
        torch.testing.assert_close(x, y, rtol=2e-6, atol=1e-6)


def test_sum_does_not_depend_on_thread_count(compiled):
    mu, rho = params(200_000, dtype=torch.float32)
    results = []
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        results.append(torch.ops.bayes_ext.gaussian_kl(mu, rho, 0.2))
    assert all(torch.equal(results[0], r) for r in results[1:])


@pytest.mark.parametrize("name", ["gaussian_kl", "gaussian_kl_backward", "sample_rows_backward_add_"])
def test_opcheck(ops, name):
    mu, rho = params(24, low=-5.0, high=2.0)
    mu, rho = mu.reshape(6, 4), rho.reshape(6, 4)
    indices = torch.tensor([[1, 5, 1], [0, 1, 3]])
    args = {
        "gaussian_kl": (mu.clone().requires_grad_(), rho.clone().requires_grad_(), 0.4),
        "gaussian_kl_backward": (torch.tensor(0.3, dtype=torch.float64), mu, rho, 0.4),
        "sample_rows_backward_add_": (torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64),
                                      torch.randn(2, 3, 4, dtype=torch.float64), mu, rho, indices, seed_tensor(5), 0),
    }[name]
    result = torch.library.opcheck(getattr(ops, name), args)
    assert all(v == "SUCCESS" for v in result.values()), result


def test_rows_backward_add_adds_what_rows_backward_returns(ops):
    mu, rho = params(60, low=-5.0, high=2.0)
    mu, rho = mu.reshape(12, 5), rho.reshape(12, 5)
    indices = torch.tensor([[3, 0, 3, 11], [7, 3, 0, 2]])
    grad_rows = torch.randn(2, 4, 5, dtype=torch.float64)
    seed = seed_tensor(99)
    base_mu, base_rho = torch.randn(12, 5, dtype=torch.float64), torch.randn(12, 5, dtype=torch.float64)
    acc_mu, acc_rho = base_mu.clone(), base_rho.clone()
    ops.sample_rows_backward_add_(acc_mu, acc_rho, grad_rows, mu, rho, indices, seed, 1)
    rows_mu, rows_rho = ops.sample_rows_backward(grad_rows, mu, rho, indices, seed, 1)
    torch.testing.assert_close(acc_mu, base_mu + rows_mu, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(acc_rho, base_rho + rows_rho, rtol=1e-14, atol=1e-14)
    untouched = torch.tensor([r not in (0, 2, 3, 7, 11) for r in range(12)])
    assert torch.equal(acc_mu[untouched], base_mu[untouched])


def test_bad_inputs(ops):
    mu, rho = torch.zeros(4), torch.zeros(4)
    for bad in (0.0, -1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="prior_sigma"):
            ops.gaussian_kl(mu, rho, bad)
    with pytest.raises(ValueError, match="rho must have the shape"):
        ops.gaussian_kl(mu, torch.zeros(5), 1.0)
    with pytest.raises(TypeError, match="mu must be a float32 or float64"):
        ops.gaussian_kl(torch.zeros(4, dtype=torch.int64), torch.zeros(4, dtype=torch.int64), 1.0)
    with pytest.raises(TypeError, match="rho must have the dtype"):
        ops.gaussian_kl(mu, torch.zeros(4, dtype=torch.float64), 1.0)
    with pytest.raises(ValueError, match="grad must hold exactly one value"):
        ops.gaussian_kl_backward(torch.ones(2), mu, rho, 1.0)
    table_mu, table_rho = torch.zeros(3, 2), torch.zeros(3, 2)
    args = (torch.zeros(1, 2), table_mu, table_rho, torch.tensor([1]), seed_tensor(1), 0)
    with pytest.raises(ValueError, match="grad_mu must have the shape"):
        ops.sample_rows_backward_add_(torch.zeros(3, 3), torch.zeros(3, 2), *args)
    with pytest.raises(TypeError, match="grad_rho must have the dtype"):
        ops.sample_rows_backward_add_(torch.zeros(3, 2), torch.zeros(3, 2, dtype=torch.float64), *args)
    with pytest.raises(ValueError, match="grad_mu must be contiguous"):
        ops.sample_rows_backward_add_(torch.zeros(2, 3).t(), torch.zeros(3, 2), *args)


def test_closed_form_kl_uses_the_op_on_both_backends(backend):
    """functional_embedding.closed_form_kl (what every closed-form layer KL goes through)."""
    from bayes_ext.functional_embedding import closed_form_kl
    mu, rho = params(40, low=-6.0, high=1.0)
    mu, rho = mu.reshape(8, 5).requires_grad_(), rho.reshape(8, 5).requires_grad_()
    kl = closed_form_kl(mu, rho, 0.5, exclude_row=3)
    keep = torch.arange(8) != 3
    m, r = mu.detach()[keep].requires_grad_(), rho.detach()[keep].requires_grad_()
    expected = reference_kl(m, r, 0.5)
    torch.testing.assert_close(kl, expected)
    kl.backward()
    expected.backward()
    torch.testing.assert_close(mu.grad[keep], m.grad)
    assert (mu.grad[3] == 0).all() and (rho.grad[3] == 0).all()


# ---- local reparameterisation's weight passes -------------------------------------------------------

@pytest.mark.parametrize("prior_sigma", [0.0, 0.35])
def test_lrt_weight_ops_match_torch(ops, prior_sigma):
    mu, rho = params(5000, low=-25.0, high=15.0)
    sigma2, kl = ops.lrt_weight_forward(mu, rho, prior_sigma)
    torch.testing.assert_close(sigma2, F.softplus(rho) ** 2, rtol=1e-12, atol=0)
    expected_kl = reference_kl(mu, rho, prior_sigma) if prior_sigma else torch.zeros((), dtype=torch.float64)
    torch.testing.assert_close(kl, expected_kl, rtol=1e-12, atol=1e-9)
    # backward: data gradients w.r.t. mu and sigma2 in, full gradients out
    gen = torch.Generator().manual_seed(1)
    data_mu, data_s2 = torch.randn(5000, generator=gen, dtype=torch.float64), torch.randn(5000, generator=gen,
                                                                                          dtype=torch.float64)
    g_kl = torch.tensor(-0.6, dtype=torch.float64)
    grad_mu, grad_rho = data_mu.clone(), data_s2.clone()
    s2_again = ops.lrt_weight_backward_(grad_mu, grad_rho, g_kl, mu, rho, prior_sigma)
    m, r = mu.clone().requires_grad_(), rho.clone().requires_grad_()
    loss = (data_mu * m).sum() + (data_s2 * F.softplus(r) ** 2).sum()
    if prior_sigma:
        loss = loss + g_kl * reference_kl(m, r, prior_sigma)
    loss.backward()
    torch.testing.assert_close(grad_mu, m.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grad_rho, r.grad, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(s2_again, sigma2, rtol=0, atol=0)


def test_lrt_weight_ops_backends_agree_in_float32(compiled):
    mu, rho = params(70_001, dtype=torch.float32, low=-12.0, high=6.0)
    a = torch.ops.bayes_ext.lrt_weight_forward(mu, rho, 0.2)
    b = torch.ops.bayes_ext_py.lrt_weight_forward(mu, rho, 0.2)
    torch.testing.assert_close(a[0], b[0], rtol=2e-6, atol=1e-12)
    torch.testing.assert_close(a[1], b[1], rtol=2e-6, atol=0)
    bufs = [(torch.ones_like(mu), torch.full_like(mu, 0.5)) for _ in range(2)]
    for namespace, (gm, gr) in zip((torch.ops.bayes_ext, torch.ops.bayes_ext_py), bufs):
        namespace.lrt_weight_backward_(gm, gr, torch.tensor(0.3), mu, rho, 0.2)
    torch.testing.assert_close(bufs[0][0], bufs[1][0], rtol=2e-6, atol=1e-6)
    torch.testing.assert_close(bufs[0][1], bufs[1][1], rtol=2e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["lrt_weight_forward", "lrt_weight_backward_"])
def test_lrt_weight_opcheck(ops, name):
    mu, rho = params(24, low=-5.0, high=2.0)
    mu, rho = mu.reshape(6, 4), rho.reshape(6, 4)
    args = {"lrt_weight_forward": (mu, rho, 0.4),
            "lrt_weight_backward_": (torch.randn(6, 4, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64),
                                     torch.tensor(0.5, dtype=torch.float64), mu, rho, 0.4)}[name]
    result = torch.library.opcheck(getattr(ops, name), args)
    assert all(v == "SUCCESS" for v in result.values()), result


def test_lrt_weight_bad_inputs(ops):
    mu, rho = torch.zeros(4), torch.zeros(4)
    for bad in (-1.0, float("inf"), float("nan")):
        with pytest.raises(ValueError, match="prior_sigma"):
            ops.lrt_weight_forward(mu, rho, bad)
    with pytest.raises(ValueError, match="grad_rho must have the shape"):
        ops.lrt_weight_backward_(torch.zeros(4), torch.zeros(5), torch.tensor(1.0), mu, rho, 1.0)
    with pytest.raises(ValueError, match="grad_kl must hold exactly one value"):
        ops.lrt_weight_backward_(torch.zeros(4), torch.zeros(4), torch.ones(2), mu, rho, 1.0)
