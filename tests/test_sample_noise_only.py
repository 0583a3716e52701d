"""sample_weight's noise_only mode (Flipout's dW = W - mu, written by the sampling pass itself):
exactly the plain op's sample minus mu with W's log q / log p; its backward sends grad_w (of the
noise) to rho only. Both backends, against the plain op and an autograd reference on the same eps."""
import pytest
import torch

from helpers import ref_sample, seed_tensor

PRIOR = (0.5, 0.3, 1.2)
DTYPES = [torch.float32, torch.float64]


def _params(shape, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mu = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    rho = (torch.randn(shape, generator=gen, dtype=torch.float64) - 2.0).to(dtype)
    grad = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    return mu, rho, grad


def _scalar(v, dtype):
    return torch.tensor(v, dtype=dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("start", [0, 6])
def test_noise_is_the_sample_minus_mu(ops, dtype, start):
    mu, rho, _ = _params((9, 11), dtype)
    seed = seed_tensor(2024)
    w, log_q, log_p = ops.sample_weight(mu, rho, seed, 3, *PRIOR, start)
    dw, q, p = ops.sample_weight(mu, rho, seed, 3, *PRIOR, start, True)
    assert torch.equal(dw, w - mu)  # rounded as the subtraction: bit for bit
    assert torch.equal(q, log_q) and torch.equal(p, log_p)  # still W's KL terms


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("return_weight", [True, False])
def test_backward_keeps_grad_w_out_of_grad_mu(ops, dtype, return_weight):
    mu, rho, grad_w = _params((9, 11), dtype, seed=1)
    seed, glq, glp = seed_tensor(7), _scalar(0.4, dtype), _scalar(-1.3, dtype)
    args = (glq, glp, mu, rho, seed, 1, *PRIOR, return_weight, 0)
    g_mu, g_rho, w = ops.sample_weight_backward(grad_w, *args)
    n_mu, n_rho, dw = ops.sample_weight_backward(grad_w, *args, True)
    assert torch.equal(n_mu, g_mu - grad_w) and torch.equal(n_rho, g_rho)
    assert torch.equal(dw, w - mu) if return_weight else dw.numel() == 0
    # without grad_w the two modes are the same backward (the KL's terms)
    none = ops.sample_weight_backward(None, *args)
    none_noise = ops.sample_weight_backward(None, *args, True)
    assert torch.equal(none[0], none_noise[0]) and torch.equal(none[1], none_noise[1])


def test_backward_into_row_blocks_and_grad_mu_sharing_grad_w(ops):
    mu, rho, grad_w = _params((12, 7), torch.float64, seed=2)
    seed, glq, glp = seed_tensor(31), _scalar(0.4, torch.float64), _scalar(-1.1, torch.float64)
    g_mu, g_rho, dw = ops.sample_weight_backward(grad_w, glq, glp, mu, rho, seed, 2, *PRIOR, True, 0, True)
    out_mu, out_rho = torch.full_like(mu, float("nan")), torch.full_like(rho, float("nan"))
    blocks = [ops.sample_weight_backward_into(out_mu[r0:r1], out_rho[r0:r1], grad_w[r0:r1], glq, glp, mu[r0:r1],
                                              rho[r0:r1], seed, 2, *PRIOR, True, r0 * 7, True)
              for r0, r1 in ((0, 5), (5, 12))]
    assert torch.equal(out_mu, g_mu) and torch.equal(out_rho, g_rho) and torch.equal(torch.cat(blocks), dw)
    # grad_mu in grad_w's memory (as the linear backward passes them): grad_w is read before it is overwritten
    shared = grad_w.clone()
    out_rho = torch.empty_like(rho)
    ops.sample_weight_backward_into(shared, out_rho, shared, glq, glp, mu, rho, seed, 2, *PRIOR, False, 0, True)
    assert torch.equal(shared, g_mu) and torch.equal(out_rho, g_rho)


@pytest.mark.parametrize("dtype", DTYPES)
def test_autograd_matches_a_reference_on_the_same_eps(ops, dtype):
    """d/d(mu, rho) of sum(c dW) + a log q + b log p with dW = softplus(rho) eps and the KL terms of
    W = mu + dW: the noise carries no gradient to mu."""
    mu, rho, c = _params((6, 5), dtype, seed=3)
    seed, a, b = seed_tensor(99), 0.7, -0.4
    mu_r, rho_r = mu.clone().requires_grad_(), rho.clone().requires_grad_()
    dw, log_q, log_p = ops.sample_weight(mu_r, rho_r, seed, 0, *PRIOR, 0, True)
    ((dw * c).sum() + a * log_q + b * log_p).backward()

    eps = ops.philox_normal(mu, seed, 0).double()
    ref_mu, ref_rho = mu.double().requires_grad_(), rho.double().requires_grad_()
    w, q, p = ref_sample(ref_mu, ref_rho, eps, PRIOR)
    ((torch.nn.functional.softplus(ref_rho) * eps * c.double()).sum() + a * q + b * p).backward()
    tol = dict(rtol=1e-4, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(mu_r.grad.double(), ref_mu.grad, **tol)
    torch.testing.assert_close(rho_r.grad.double(), ref_rho.grad, **tol)


def test_gradcheck_and_opcheck(ops):
    mu, rho, grad_w = _params((4, 5), torch.float64, seed=4)
    seed = seed_tensor(5)
    fn = lambda m, r: ops.sample_weight(m, r, seed, 1, *PRIOR, 0, True)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (mu.clone().requires_grad_(), rho.clone().requires_grad_()), eps=1e-6,
                                    atol=1e-6, rtol=1e-5)
    z = _scalar(0.3, torch.float64)
    for op, args in ((ops.sample_weight, (mu, rho, seed, 1, *PRIOR, 0, True)),
                     (ops.sample_weight_backward, (grad_w, z, z, mu, rho, seed, 1, *PRIOR, True, 0, True)),
                     (ops.sample_weight_backward_into, (torch.zeros_like(mu), torch.zeros_like(mu), grad_w, z, z, mu,
                                                        rho, seed, 1, *PRIOR, True, 0, True))):
        result = torch.library.opcheck(op, args)
        assert all(v == "SUCCESS" for v in result.values()), (op, result)


@pytest.mark.parametrize("dtype", DTYPES)
def test_compiled_matches_fallback(compiled, dtype):
    import bayes_ext
    mu, rho, grad_w = _params((33, 65), dtype, seed=6)
    seed, g = seed_tensor(11), _scalar(0.5, dtype)
    results = []
    for backend in ("compiled", "python"):
        with bayes_ext.use_backend(backend):
            from bayes_ext import _backend
            ops = _backend.ops()
            results.append((ops.sample_weight(mu, rho, seed, 0, *PRIOR, 0, True),
                            ops.sample_weight_backward(grad_w, g, g, mu, rho, seed, 0, *PRIOR, True, 0, True)))
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    for got, want in zip(results[0][0] + results[0][1], results[1][0] + results[1][1]):
        torch.testing.assert_close(got, want, **tol)
