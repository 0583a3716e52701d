"""Derivatives of every order: a backward recorded with create_graph=True (gradient penalties,
double backprop, second-order meta-learning) differentiates the layer's forward rebuilt from
differentiable compositions on the same noise (bayes_ext/_recorded.py, csrc/cpu/recorded_backward.h),
so its gradients are themselves exact. gradgradcheck holds the recorded second derivatives of every
layer, estimator and KL to finite differences of the first-order kernels' gradients (float64, both
backends; on the CPU with the compiled kernels the linear layers run their C++ ops)."""
import pytest
import torch
from torch.func import functional_call

from bayes_ext.losses import kl_divergence_from_nn
from bayes_ext.modules import (BayesianConv1d, BayesianConvTranspose1d, BayesianEmbedding, BayesianGRU,
                               BayesianLinear, BayesianLSTM)
from helpers import CUSTOM_OPS_UNDER_TORCH_FUNC, require_torch

F64 = torch.float64
CASES = {
    "linear": (lambda: BayesianLinear(3, 2), lambda: torch.randn(2, 3, dtype=F64)),
    "linear_mixture_prior": (lambda: BayesianLinear(3, 2, prior_pi=0.5, prior_sigma_1=0.5, prior_sigma_2=0.05),
                             lambda: torch.randn(2, 3, dtype=F64)),
    "linear_closed_form": (lambda: BayesianLinear(3, 2, kl="closed_form"), lambda: torch.randn(2, 3, dtype=F64)),
    "linear_lrt": (lambda: BayesianLinear(3, 2, estimator="lrt"), lambda: torch.randn(2, 3, dtype=F64)),
    "linear_lrt_mc": (lambda: BayesianLinear(3, 2, estimator="lrt", kl="mc", prior_pi=0.5),
                      lambda: torch.randn(2, 3, dtype=F64)),
    "linear_flipout": (lambda: BayesianLinear(3, 2, estimator="flipout"), lambda: torch.randn(2, 3, dtype=F64)),
    # without a bias the C++ ops' autograd nodes have no edges for it (needs_input_grad(3) is out of range)
    "linear_no_bias": (lambda: BayesianLinear(3, 2, bias=False), lambda: torch.randn(2, 3, dtype=F64)),
    "linear_lrt_no_bias": (lambda: BayesianLinear(3, 2, estimator="lrt", bias=False),
                           lambda: torch.randn(2, 3, dtype=F64)),
    "linear_flipout_no_bias": (lambda: BayesianLinear(3, 2, estimator="flipout", bias=False),
                               lambda: torch.randn(2, 3, dtype=F64)),
    "conv": (lambda: BayesianConv1d(1, 2, 2), lambda: torch.randn(1, 1, 4, dtype=F64)),
    "conv_lrt": (lambda: BayesianConv1d(1, 2, 2, estimator="lrt"), lambda: torch.randn(1, 1, 4, dtype=F64)),
    "conv_flipout": (lambda: BayesianConv1d(1, 2, 2, estimator="flipout"), lambda: torch.randn(1, 1, 4, dtype=F64)),
    "conv_transpose": (lambda: BayesianConvTranspose1d(1, 2, 2), lambda: torch.randn(1, 1, 3, dtype=F64)),
    "lstm": (lambda: BayesianLSTM(2, 2), lambda: torch.randn(1, 2, 2, dtype=F64)),
    "gru": (lambda: BayesianGRU(2, 2), lambda: torch.randn(1, 2, 2, dtype=F64)),
    "embedding": (lambda: BayesianEmbedding(4, 2), lambda: torch.tensor([[1, 3], [0, 1]])),
    "embedding_closed_form": (lambda: BayesianEmbedding(4, 2, kl="closed_form", padding_idx=0),
                              lambda: torch.tensor([[1, 3], [0, 1]])),
}


def output(result):
    return result[0] if isinstance(result, tuple) else result


def layer_function(name, device="cpu"):
    """(f, inputs): f(*inputs) = (the layer's output, its KL) on a fixed seed, as a function of
    the input (when it is differentiable) and the parameters, all float64, on `device`."""
    make_layer, make_input = CASES[name]
    torch.manual_seed(0)
    layer = make_layer().double().to(device)
    x = make_input().to(device)
    names = [n for n, _ in layer.named_parameters()]
    params = [p.detach().clone().requires_grad_() for _, p in layer.named_parameters()]
    with_x = x.is_floating_point()

    def f(*tensors):
        torch.manual_seed(7)  # the same noise on every call
        inp, ps = (tensors[0], tensors[1:]) if with_x else (x, tensors)
        y = output(functional_call(layer, dict(zip(names, ps)), (inp,)))
        return y, kl_divergence_from_nn(layer)

    inputs = ([x.requires_grad_()] if with_x else []) + params
    return f, tuple(inputs)


@pytest.mark.parametrize("name", CASES)
def test_second_derivatives_match_finite_differences_of_the_gradients(backend, name):
    if name in ("linear_lrt_mc", "lstm", "gru", "embedding"):  # their recorded backward runs torch.func.vjp
        require_torch(*CUSTOM_OPS_UNDER_TORCH_FUNC)
    f, inputs = layer_function(name)
    assert torch.autograd.gradgradcheck(f, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("estimator", ["reparam", "lrt", "flipout"])
def test_an_input_gradient_penalty_trains_the_weights_exactly(backend, estimator):
    """A WGAN-GP style penalty |d sum(tanh(y)) / dx|^2: its gradient with respect to the weights
    runs through dL/dx = g W, which the first-order kernels alone treat as constant in W."""
    torch.manual_seed(0)
    layer = BayesianLinear(4, 3, estimator=estimator).double()
    x0 = torch.randn(2, 4, dtype=F64)

    def penalty(weight_mu):
        x = x0.clone().requires_grad_()
        torch.manual_seed(7)
        y = functional_call(layer, {"weight_mu": weight_mu}, (x,), strict=False)
        (g,) = torch.autograd.grad(y.tanh().sum(), x, create_graph=True)
        return g.square().sum()

    mu = layer.weight_mu.detach().clone().requires_grad_()
    (analytic,) = torch.autograd.grad(penalty(mu), mu)
    numeric = torch.zeros_like(mu)
    for i in range(mu.numel()):
        step = torch.zeros_like(mu).view(-1)
        step[i] = 1e-6
        numeric.view(-1)[i] = (penalty(mu + step.view_as(mu)) - penalty(mu - step.view_as(mu))) / 2e-6
    torch.testing.assert_close(analytic, numeric, atol=1e-6, rtol=1e-5)


def test_first_order_backwards_do_not_rebuild_the_forward(backend, monkeypatch):
    """The rebuild costs weight-sized temporaries: only recorded backwards take it."""
    from bayes_ext import _recorded
    calls = []
    original = _recorded.recorded_backward
    monkeypatch.setattr(_recorded, "recorded_backward", lambda *a: calls.append(1) or original(*a))
    for estimator in ("reparam", "lrt", "flipout"):
        layer = BayesianLinear(4, 3, estimator=estimator)
        x = torch.randn(2, 4, requires_grad=True)
        (layer(x).sum() + kl_divergence_from_nn(layer)).backward()
    assert calls == []
    (g,) = torch.autograd.grad(layer(x).tanh().sum(), x, create_graph=True)
    g.square().sum().backward()
    assert calls


def _params(out_features=2, in_features=3):
    torch.manual_seed(0)
    shapes = [(out_features, in_features)] * 2 + [(out_features,)] * 2
    return tuple((torch.randn(s, dtype=F64) * 0.3 - (2.0 if i % 2 else 0.0)).requires_grad_() for i, s in
                 enumerate(shapes))


@pytest.mark.parametrize("op", ["reparam", "flipout", "lrt"])
def test_the_vectorised_elbos_sample_ops_have_exact_second_derivatives(backend, op):
    """The ops that run N samples at once (sample_elbo(vectorized=True)), seed s on rows s."""
    from bayes_ext import functional_estimators as BFE
    from bayes_ext import functional_flipout_samples as FFS
    from bayes_ext import functional_samples as FS
    seeds = torch.tensor([4, 9], dtype=torch.int64)
    x = torch.randn(2, 2, 3, dtype=F64, requires_grad=True)
    prior = (0.5, 0.5, 0.05)
    calls = {"reparam": lambda *t: FS.bayesian_linear_samples(t[0], *t[1:], seeds, prior),
             "flipout": lambda *t: FFS.linear_flipout_samples(t[0].reshape(4, 3), *t[1:], seeds, prior),
             "lrt": lambda *t: BFE.linear_lrt_samples(t[0].reshape(4, 3), *t[1:], seeds, 0.5)}
    assert torch.autograd.gradgradcheck(calls[op], (x,) + _params(), eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("estimator", ["reparam", "lrt", "flipout"])
def test_weights_in_row_blocks_have_exact_second_derivatives(backend, monkeypatch, estimator):
    """A large weight runs block of rows by block of rows (functional._row_blocks); so does its
    rebuilt forward."""
    from bayes_ext import functional as BF
    for name in ("BLOCK_ELEMENTS", "FALLBACK_BLOCK_ELEMENTS", "LRT_BLOCK_ELEMENTS"):
        monkeypatch.setattr(BF, name, 3)
    layer = BayesianLinear(3, 3, estimator=estimator).double()
    assert len(BF._row_blocks(layer.weight_mu)) > 1
    names = [n for n, _ in layer.named_parameters()]

    def f(x, *params):
        torch.manual_seed(7)
        return functional_call(layer, dict(zip(names, params)), (x,)), kl_divergence_from_nn(layer)

    params = tuple(p.detach().clone().requires_grad_() for p in layer.parameters())
    assert torch.autograd.gradgradcheck(f, (torch.randn(2, 3, dtype=F64, requires_grad=True),) + params, eps=1e-6,
                                        atol=1e-5, rtol=1e-4)
