"""linear_lrt_samples: N samples of the local-reparameterisation layer in one call (the vectorised
ELBO's LRT layers). Sample s must be linear_lrt_with_kl on its rows with seeds[s], values and
gradients, on both backends, with the weight whole or in row blocks; bad seeds and batches get
clear errors."""
import pytest
import torch

from bayes_ext import functional as BF
from bayes_ext import functional_estimators as BFE
from helpers import posterior_7x9

F64 = torch.float64


@pytest.mark.parametrize("blocks", [False, True], ids=["whole", "row_blocks"])
@pytest.mark.parametrize("bias", [True, False])
def test_each_sample_is_the_single_sample_op_on_its_seed(backend, monkeypatch, blocks, bias):
    if blocks:
        monkeypatch.setattr(BF, "LRT_BLOCK_ELEMENTS", 10)  # 7 x 9 weight: a block per row
    params = posterior_7x9(1, bias)
    n, b = 3, 4
    x = torch.randn(n * b, 2, 9, dtype=F64, requires_grad=True)
    seeds = torch.tensor([11, -2 ** 62, 2 ** 62 + 5], dtype=torch.int64)
    y, kl = BFE.linear_lrt_samples(x, *params, seeds, 0.3)
    assert y.shape == (n * b, 2, 7) and kl.shape == ()
    g_out = torch.randn_like(y)
    ((y * g_out).sum() + 0.7 * kl).backward()
    tensors = [t for t in (x,) + tuple(params) if t is not None]
    got = [t.grad.clone() for t in tensors]
    for t in tensors:
        t.grad = None
    total = 0
    for s in range(n):
        rows = slice(s * b, (s + 1) * b)
        y_s, kl_s = BFE.linear_lrt_with_kl(x[rows], *params, seed=seeds[s:s + 1], prior_sigma=0.3)
        torch.testing.assert_close(y_s, y[rows], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(kl_s, kl, rtol=1e-13, atol=1e-12)
        total = total + (y_s * g_out[rows]).sum()
    (total + 0.7 * kl_s).backward()  # the KL once: it is every sample's
    for g, t in zip(got, tensors):
        torch.testing.assert_close(g, t.grad, rtol=1e-10, atol=1e-12)


def test_gradcheck(backend):
    params = [p.detach().requires_grad_() for p in posterior_7x9(2)]
    x = torch.randn(6, 9, dtype=F64, requires_grad=True)
    seeds = torch.tensor([3, 4], dtype=torch.int64)
    fn = lambda *t: BFE.linear_lrt_samples(t[0], *t[1:], seeds, 0.5)  # noqa: E731
    assert torch.autograd.gradcheck(fn, [x] + params, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_bad_seeds_and_batches_are_refused():
    params = posterior_7x9(2)
    x = torch.randn(6, 9, dtype=F64)
    with pytest.raises(ValueError, match="seeds must be a 1-D tensor"):
        BFE.linear_lrt_samples(x, *params, torch.tensor([[1, 2]]), 0.5)
    with pytest.raises(TypeError, match="seeds must be an int64 tensor"):
        BFE.linear_lrt_samples(x, *params, torch.tensor([1.0, 2.0]), 0.5)
    with pytest.raises(ValueError, match="x must hold the 4 samples"):
        BFE.linear_lrt_samples(x, *params, torch.arange(4), 0.5)
    with pytest.raises(ValueError, match="prior_sigma must be positive"):
        BFE.linear_lrt_samples(x, *params, torch.arange(2), 0.0)
    with pytest.raises(ValueError, match="input must have 9 features"):
        BFE.linear_lrt_samples(x[:, :5], *params, torch.arange(2), 0.5)


def test_recorded_backward_gives_each_sample_its_noise(backend):
    """create_graph=True: dL/dx stays differentiable in the output gradient (the recorded backward
    redraws eps with torch ops), sample s with seeds[s]'s noise, as the single-sample op."""
    params = posterior_7x9(3)
    n, b = 2, 3
    x = torch.randn(n * b, 9, dtype=F64, requires_grad=True)
    seeds = torch.tensor([5, 6])
    y, _ = BFE.linear_lrt_samples(x, *params, seeds, 0.4)
    g = torch.randn_like(y, requires_grad=True)
    grad_x, = torch.autograd.grad(y, x, g, create_graph=True)
    got = torch.autograd.grad((grad_x ** 2).sum(), g)[0]
    for s in range(n):
        rows = slice(s * b, (s + 1) * b)
        x_s = x.detach()[rows].requires_grad_()
        y_s, _ = BFE.linear_lrt_with_kl(x_s, *params, seed=seeds[s:s + 1], prior_sigma=0.4)
        g_s = g.detach()[rows].clone().requires_grad_()
        grad_x_s, = torch.autograd.grad(y_s, x_s, g_s, create_graph=True)
        torch.testing.assert_close(grad_x_s, grad_x[rows], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(torch.autograd.grad((grad_x_s ** 2).sum(), g_s)[0], got[rows], rtol=1e-12,
                                   atol=1e-12)
