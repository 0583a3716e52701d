"""torch.func transforms over bayes_ext layers: grad, jacrev, jvp, vmap, vmap of grad (per-sample
gradients), Hessians (jacrev / jacfwd of jacrev), ensembles over stacked parameters, on both
backends. torch.library's autograd wrapper
is refused by these transforms (pytorch/pytorch#170834), so bayes_ext routes calls made inside
them through new-style twins of its ops (bayes_ext/_func_transforms.py); these tests hold them to
the eager results on the same seed."""
import copy
import warnings

import pytest
import torch
from torch.func import functional_call, grad, jacfwd, jacrev, jvp, stack_module_state, vmap

from bayes_ext.losses import kl_divergence_from_nn
from bayes_ext.modules import (BayesianConv2d, BayesianConvTranspose2d, BayesianEmbedding, BayesianGRU,
                               BayesianLinear, BayesianLSTM)
from helpers import CUSTOM_OPS_UNDER_TORCH_FUNC, require_torch

CASES = {
    "linear": (lambda: BayesianLinear(4, 3), lambda: torch.randn(2, 4)),
    "linear_closed_form": (lambda: BayesianLinear(4, 3, kl="closed_form"), lambda: torch.randn(2, 4)),
    "linear_lrt": (lambda: BayesianLinear(4, 3, estimator="lrt"), lambda: torch.randn(2, 4)),
    "linear_lrt_mc": (lambda: BayesianLinear(4, 3, estimator="lrt", kl="mc"), lambda: torch.randn(2, 4)),
    "linear_flipout": (lambda: BayesianLinear(4, 3, estimator="flipout"), lambda: torch.randn(2, 4)),
    "conv": (lambda: BayesianConv2d(2, 3, (3, 3)), lambda: torch.randn(2, 2, 5, 5)),
    "conv_lrt": (lambda: BayesianConv2d(2, 3, (3, 3), estimator="lrt"), lambda: torch.randn(2, 2, 5, 5)),
    "conv_flipout": (lambda: BayesianConv2d(2, 3, (3, 3), estimator="flipout"), lambda: torch.randn(2, 2, 5, 5)),
    "conv_transpose": (lambda: BayesianConvTranspose2d(2, 3, (3, 3)), lambda: torch.randn(2, 2, 4, 4)),
    "lstm": (lambda: BayesianLSTM(4, 5), lambda: torch.randn(2, 3, 4)),
    "gru": (lambda: BayesianGRU(4, 5), lambda: torch.randn(2, 3, 4)),
    "embedding": (lambda: BayesianEmbedding(7, 3), lambda: torch.tensor([[1, 2], [3, 1]])),
    "embedding_closed_form_padding": (lambda: BayesianEmbedding(7, 3, kl="closed_form", padding_idx=0),
                                      lambda: torch.tensor([[1, 2], [3, 0]])),
    "embedding_scale_grad_by_freq": (lambda: BayesianEmbedding(7, 3, scale_grad_by_freq=True),
                                     lambda: torch.tensor([[1, 1], [3, 1]])),
}
# torch has no batching rule for aten::lstm / aten::gru: nn.LSTM and nn.GRU cannot be vmapped either
VMAPPABLE = [name for name in CASES if name not in ("lstm", "gru")]


def output(result):
    return result[0] if isinstance(result, tuple) else result  # the RNNs return (sequence, state)


def make(name):
    make_layer, make_input = CASES[name]
    torch.manual_seed(0)
    return make_layer(), make_input()


def detached_params(layer):
    return {k: v.detach() for k, v in layer.named_parameters()}


def assert_grads_close(actual, expected):
    assert actual.keys() == expected.keys()
    for k in expected:
        torch.testing.assert_close(actual[k], expected[k], rtol=1e-5, atol=1e-5, msg=lambda m: f"{k}: {m}")


@pytest.fixture(autouse=True)
def _quiet_vmap_fallback():
    # vmap runs the kernels once per batch element and warns that a batching rule is missing
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="There is a performance drop")
        yield


@pytest.mark.parametrize("name", CASES)
def test_grad_of_the_elbo_terms_matches_autograd(backend, name):
    if name in ("embedding", "embedding_scale_grad_by_freq", "lstm", "gru"):
        require_torch(*CUSTOM_OPS_UNDER_TORCH_FUNC)
    layer, x = make(name)

    def loss(params):
        return output(functional_call(layer, params, (x,))).sum() + kl_divergence_from_nn(layer)

    torch.manual_seed(7)
    eager_loss = output(layer(x)).sum() + kl_divergence_from_nn(layer)
    eager_loss.backward()
    expected = {k: v.grad for k, v in layer.named_parameters()}
    torch.manual_seed(7)  # the same seed: the same noise
    assert_grads_close(grad(loss)(detached_params(layer)), expected)


@pytest.mark.parametrize("name", VMAPPABLE)
def test_vmap_draws_one_noise_for_same_and_one_per_element_for_different(backend, name):
    layer, x = make(name)
    batch = torch.stack([x, x, x])
    call = lambda xx: output(layer(xx))  # noqa: E731
    torch.manual_seed(7)
    eager = call(x)
    torch.manual_seed(7)
    same = vmap(call, randomness="same")(batch)
    different = vmap(call, randomness="different")(batch)
    for i in range(3):
        torch.testing.assert_close(same[i], eager)
    assert not torch.allclose(different[0], different[1]) and not torch.allclose(different[1], different[2])


@pytest.mark.parametrize("name", ["linear", "linear_lrt", "linear_flipout", "conv_lrt", "conv_flipout",
                                  "embedding_closed_form_padding"])
def test_per_sample_gradients_from_vmap_of_grad_match_one_by_one(backend, name):
    layer, x = make(name)
    params = detached_params(layer)

    def sample_loss(p, sample):
        return output(functional_call(layer, p, (sample[None],))).square().sum() + kl_divergence_from_nn(layer)

    torch.manual_seed(7)
    per_sample = vmap(grad(sample_loss), in_dims=(None, 0), randomness="same")(params, x)
    for i in range(x.shape[0]):
        torch.manual_seed(7)
        assert_grads_close({k: v[i] for k, v in per_sample.items()}, grad(sample_loss)(params, x[i]))


@pytest.mark.parametrize("name", ["linear", "linear_lrt", "linear_flipout", "conv", "lstm"])
def test_jacrev_with_respect_to_the_input_matches_autograd(backend, name):
    layer, x = make(name)
    torch.manual_seed(7)
    jac = jacrev(lambda xx: output(layer(xx)).sum())(x)
    x_leaf = x.clone().requires_grad_()
    torch.manual_seed(7)
    output(layer(x_leaf)).sum().backward()
    torch.testing.assert_close(jac, x_leaf.grad)


@pytest.mark.parametrize("estimator", ["reparam", "lrt", "flipout"])
def test_an_ensemble_vmapped_over_stacked_parameters_matches_each_member(backend, estimator):
    torch.manual_seed(0)
    members = [BayesianLinear(4, 3, estimator=estimator) for _ in range(3)]
    params, buffers = stack_module_state(members)
    skeleton = copy.deepcopy(members[0]).to("meta")
    x = torch.randn(5, 4)
    torch.manual_seed(7)
    outputs = vmap(lambda p, b: functional_call(skeleton, (p, b), (x,)), randomness="same")(params, buffers)
    for i, member in enumerate(members):
        torch.manual_seed(7)
        torch.testing.assert_close(outputs[i], member(x))


@pytest.mark.parametrize("name", ["linear", "linear_lrt", "linear_flipout", "conv", "conv_lrt", "gru"])
def test_forward_mode_jvp_matches_the_jacobian_from_autograd(backend, name):
    """jvp (forward-mode AD) differentiates the op's forward rebuilt from differentiable
    compositions on the same noise (_recorded.forward_tangents)."""
    layer, x = make(name)
    tangent = torch.randn_like(x)
    torch.manual_seed(7)
    y, y_tangent = jvp(lambda xx: output(layer(xx)), (x,), (tangent,))
    x_leaf = x.clone().requires_grad_()
    torch.manual_seed(7)
    y_leaf = output(layer(x_leaf))
    rows = [torch.autograd.grad(y_leaf.reshape(-1)[k], x_leaf, retain_graph=True)[0] for k in range(y_leaf.numel())]
    expected = (torch.stack(rows).reshape(y_leaf.numel(), -1) @ tangent.reshape(-1)).reshape(y_leaf.shape)
    torch.testing.assert_close(y, y_leaf.detach())
    torch.testing.assert_close(y_tangent, expected)


@pytest.mark.parametrize("estimator", ["reparam", "lrt", "flipout"])
@pytest.mark.parametrize("hessian_of", ["jacrev(jacrev)", "jacfwd(jacrev)", "jacrev(grad)"])
def test_hessians_from_torch_func_match_the_recorded_double_backward(backend, estimator, hessian_of):
    """Every composition of reverse and forward mode (a vjp's backward even runs after its
    transform ended) against torch.autograd's double backward (tests/test_double_backward.py
    holds that one to finite differences)."""
    torch.manual_seed(0)
    layer, x = BayesianLinear(4, 3, estimator=estimator).double(), torch.randn(2, 4, dtype=torch.float64)
    f = lambda xx: layer(xx).tanh().sum()  # noqa: E731
    transforms = {"jacrev(jacrev)": lambda: jacrev(jacrev(f)), "jacrev(grad)": lambda: jacrev(grad(f)),
                  "jacfwd(jacrev)": lambda: jacfwd(jacrev(f), randomness="same")}
    torch.manual_seed(7)
    hessian = transforms[hessian_of]()(x)
    x_leaf = x.clone().requires_grad_()
    torch.manual_seed(7)
    (g,) = torch.autograd.grad(f(x_leaf), x_leaf, create_graph=True)
    rows = [torch.autograd.grad(g.reshape(-1)[k], x_leaf, retain_graph=True)[0] for k in range(g.numel())]
    torch.testing.assert_close(hessian, torch.stack(rows).reshape(x.shape + x.shape))


def test_calls_outside_transforms_keep_the_eager_op_namespace(backend):
    from bayes_ext import _backend
    outside = _backend.ops()
    inside = []
    layer, x = make("linear")
    grad(lambda p: (inside.append(_backend.ops()), functional_call(layer, p, (x,)).sum())[1])(detached_params(layer))
    assert outside is getattr(torch.ops, "bayes_ext" if backend == "compiled" else "bayes_ext_py")
    assert inside[0] is not outside and _backend.ops() is outside



@pytest.mark.parametrize("name", ["linear", "linear_lrt", "linear_flipout", "conv_lrt",
                                  "embedding_closed_form_padding"])
def test_grad_of_grad_matches_the_recorded_double_backward(backend, name):
    """Nested grad transforms take the exact recorded backward (tests/test_double_backward.py checks
    that one against finite differences); a lone grad takes the first-order kernels."""
    layer, x = make(name)
    params = detached_params(layer)

    def loss(p):
        return output(functional_call(layer, p, (x,))).tanh().sum() + kl_divergence_from_nn(layer)

    def penalty(p):
        return sum(g.square().sum() for g in grad(loss)(p).values())

    torch.manual_seed(7)
    nested = grad(penalty)(params)
    leaves = {k: v.clone().requires_grad_() for k, v in params.items()}
    torch.manual_seed(7)
    first = torch.autograd.grad(loss(leaves), list(leaves.values()), create_graph=True)
    expected = dict(zip(leaves, torch.autograd.grad(sum(g.square().sum() for g in first), list(leaves.values()))))
    assert_grads_close(nested, expected)
