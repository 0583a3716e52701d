"""kl_divergence_from_nn: the model's KL summed over its Bayesian layers. From three layers on the
terms are stacked and summed in one pass (a fixed number of ops, not three per layer); these tests
hold that path to the layer-by-layer sum and to its gradients, and check where it must fall back."""
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from bayes_ext.losses import kl_divergence_from_nn
from bayes_ext.losses.kl_divergence import kl_divergence_of_layers
from bayes_ext.modules import BayesianConv2d, BayesianLinear
from helpers import needs_torch


def layers_with_terms(n, shape=(), dtype=torch.float32):
    """n layers whose KL terms are leaf tensors (their gradients are read back)."""
    gen = torch.Generator().manual_seed(n)
    model = nn.Sequential(*[BayesianLinear(2, 2) for _ in range(n)])
    for layer in model:
        layer._set_kl_terms(torch.randn(shape, generator=gen, dtype=dtype).mul(100).requires_grad_(),
                            torch.randn(shape, generator=gen, dtype=dtype).mul(100).requires_grad_())
    return model


def layer_by_layer(model):
    """BLiTZ's sum, in float64."""
    return sum(m.log_variational_posterior.double() - m.log_prior.double() for m in model)


@pytest.mark.parametrize("n", [1, 2, 3, 7, 48])
def test_value_and_gradients_are_the_layer_by_layer_sum(n):
    model = layers_with_terms(n)
    kl = kl_divergence_from_nn(model)
    assert kl.shape == () and kl.dtype == torch.float32
    torch.testing.assert_close(kl.double(), layer_by_layer(model), rtol=1e-6, atol=1e-4)
    (2.5 * kl).backward()
    for layer in model:  # d kl / d log q = 1, d kl / d log p = -1
        assert layer.log_variational_posterior.grad.item() == 2.5
        assert layer.log_prior.grad.item() == -2.5


def test_per_sample_terms_give_per_sample_kl():
    # the vectorised ELBO's layers hold one term per sample, shape (N,)
    model = layers_with_terms(5, shape=(4,))
    kl = kl_divergence_of_layers(list(model))
    assert kl.shape == (4,)
    torch.testing.assert_close(kl.double(), layer_by_layer(model), rtol=1e-6, atol=1e-4)


def test_real_layers_after_a_forward(backend):
    torch.manual_seed(0)
    model = nn.Sequential(BayesianConv2d(1, 2, 3), nn.Flatten(), BayesianLinear(8, 4), BayesianLinear(4, 3),
                          BayesianLinear(3, 1))
    x = torch.randn(2, 1, 4, 4)
    torch.manual_seed(1)
    (model(x).sum() + kl_divergence_from_nn(model)).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    # the same sample's graph summed layer by layer gives the same gradients
    torch.manual_seed(1)
    model(x).sum().add(sum(m.log_variational_posterior - m.log_prior for m in model
                           if hasattr(m, "log_prior"))).backward()
    for got, want in zip(grads, [p.grad for p in model.parameters()]):
        torch.testing.assert_close(got, want)


def test_mixed_dtypes_promote_as_the_sum_does():
    model = layers_with_terms(4)
    model[1]._set_kl_terms(torch.tensor(3.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    kl = kl_divergence_from_nn(model)
    assert kl.dtype == torch.float64
    torch.testing.assert_close(kl, layer_by_layer(model), rtol=1e-6, atol=1e-4)


@pytest.mark.parametrize("odd_term", ["number", "other_shape", "integer"])
def test_terms_that_cannot_be_stacked_are_added_one_by_one(odd_term):
    model = layers_with_terms(4, shape=(3,))
    odd = {"number": 0, "other_shape": torch.tensor(2.0), "integer": torch.tensor(2)}[odd_term]
    model[2]._set_kl_terms(odd, odd)  # say a layer deep-copied before its forward, or a closed-form 0-dim term
    expected = sum(m.log_variational_posterior - m.log_prior for m in model)
    torch.testing.assert_close(kl_divergence_from_nn(model), expected)


class CountComputeOps(TorchDispatchMode):
    """Counts the ops that compute (a kernel launch each on a GPU), not the views."""
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not any(r.alias_info is not None for r in func._schema.returns):
            self.count += 1
        return func(*args, **(kwargs or {}))


def ops_forward_and_backward(n):
    model = layers_with_terms(n)
    terms = [t for m in model for t in (m.log_variational_posterior, m.log_prior)]
    with CountComputeOps() as counter:
        # the gradients as the layers' backward nodes receive them (no leaf accumulation)
        torch.autograd.grad(kl_divergence_from_nn(model), terms)
    return counter.count


def test_number_of_ops_does_not_grow_with_the_layers():
    # each op is a kernel launch on a GPU: a 48-layer model paid 144 a step for its KL
    assert ops_forward_and_backward(48) == ops_forward_and_backward(3)
    assert ops_forward_and_backward(3) < 3 * 3


def test_no_bayesian_layers_is_zero():
    assert kl_divergence_from_nn(nn.Sequential(nn.Linear(2, 2), nn.ReLU())) == 0


@needs_torch((2, 5), "torch 2.4's dynamo cannot set an attribute (the KL terms) on a module inside "
                         "nn.Sequential / nn.ModuleList")
def test_compiles_without_graph_breaks(backend):
    torch.manual_seed(0)
    model = nn.Sequential(*[BayesianLinear(8, 8) for _ in range(4)])
    x = torch.randn(2, 8)

    def loss(inp):
        return model(inp).sum() + kl_divergence_from_nn(model)

    torch._dynamo.reset()
    assert torch._dynamo.explain(loss)(x).graph_break_count == 0
    torch.manual_seed(3)
    compiled = torch.compile(loss, fullgraph=True)(x)
    torch.manual_seed(3)
    torch.testing.assert_close(compiled, loss(x))
