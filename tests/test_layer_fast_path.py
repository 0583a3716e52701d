"""The eager fast path of bayesian_linear (functional._layer_op_input): on the compiled backend a plain
eager call goes straight to bayes_ext::linear_reparam_rows, and the Python checks run only to word an
error the op raised. It must give the checked path's values and gradients, raise the checked path's
errors word for word, and use the parameters the module presents (parametrize, functional_call)."""
import pytest
import torch
from torch.nn.utils import parametrize

from bayes_ext import functional as BF
from bayes_ext.modules import BayesianLinear

from helpers import layer_params

PRIOR = (0.5, 0.3, 1.5)


def _checked_path_only(monkeypatch):
    monkeypatch.setattr(BF, "_layer_op_input", lambda *args: None)


def test_plain_eager_call_skips_the_python_checks(compiled, monkeypatch):
    calls = []
    monkeypatch.setattr(BF, "prepare_linear_call", lambda *a: calls.append(a) or pytest.fail("checked path taken"))
    y, _, _ = BF.bayesian_linear(torch.randn(3, 5), *layer_params(4, 5, True, torch.float32), prior=PRIOR)
    assert y.shape == (3, 4) and not calls


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fast_and_checked_paths_agree_bit_for_bit(compiled, monkeypatch, bias, dtype):
    def run():
        params = layer_params(6, 5, bias, dtype)
        x = torch.randn(2, 3, 5, dtype=dtype, generator=torch.Generator().manual_seed(1), requires_grad=True)
        torch.manual_seed(7)  # the seed drawn inside the call
        y, log_q, log_p = BF.bayesian_linear(x, *params, prior=PRIOR)
        leaves = [x] + [p for p in params if p is not None]
        grads = torch.autograd.grad((y * torch.arange(6.0, dtype=dtype)).sum() + 0.3 * log_q - 0.7 * log_p, leaves)
        return (y, log_q, log_p) + grads

    fast = run()
    _checked_path_only(monkeypatch)
    checked = run()
    for a, b in zip(fast, checked):
        assert a.dtype == b.dtype and torch.equal(a, b)


def _bad_calls():
    """(description, thunk) pairs of bayesian_linear calls that must fail."""
    wm, wr, bm, br = layer_params(4, 5, True, torch.float32)
    x, seed, prior = torch.randn(3, 5), torch.tensor([3]), (1.0, 0.1, 0.4)
    call = BF.bayesian_linear
    return [
        ("x features", lambda: call(torch.randn(3, 6), wm, wr, bm, br, seed, prior)),
        ("x 0-d", lambda: call(torch.tensor(1.0), wm, wr, bm, br, seed, prior)),
        ("x float64", lambda: call(x.double(), wm, wr, bm, br, seed, prior)),
        ("x int", lambda: call(torch.ones(3, 5, dtype=torch.int64), wm, wr, bm, br, seed, prior)),
        ("rho shape", lambda: call(x, wm, wr[:3], bm, br, seed, prior)),
        ("rho dtype", lambda: call(x, wm, wr.double(), bm, br, seed, prior)),
        ("weight 3-d", lambda: call(x, wm[None], wr[None], bm, br, seed, prior)),
        ("weight empty", lambda: call(x, wm[:0], wr[:0], bm[:0], br[:0], seed, prior)),
        ("bias shape", lambda: call(x, wm, wr, bm[:2], br[:2], seed, prior)),
        ("bias dtype", lambda: call(x, wm, wr, bm.double(), br.double(), seed, prior)),
        ("bias_rho missing", lambda: call(x, wm, wr, bm, None, seed, prior)),
        ("seed dtype", lambda: call(x, wm, wr, bm, br, torch.tensor([3.0]), prior)),
        ("seed size", lambda: call(x, wm, wr, bm, br, torch.tensor([3, 4]), prior)),
        ("prior_pi", lambda: call(x, wm, wr, bm, br, seed, (1.5, 0.1, 0.4))),
        ("prior_sigma1", lambda: call(x, wm, wr, bm, br, seed, (0.5, -0.1, 0.4))),
        ("prior_sigma2", lambda: call(x, wm, wr, bm, br, seed, (0.5, 0.1, float("inf")))),
    ]


def _error_of(thunk):
    with pytest.raises((TypeError, ValueError, RuntimeError)) as info:
        thunk()
    return type(info.value), str(info.value)


def test_errors_are_the_checked_paths_word_for_word(compiled, monkeypatch):
    fast = [(name, _error_of(thunk)) for name, thunk in _bad_calls()]
    _checked_path_only(monkeypatch)
    checked = [(name, _error_of(thunk)) for name, thunk in _bad_calls()]
    assert fast == checked


def test_the_op_rejects_an_empty_weight(compiled):
    """The op itself, not only the Python checks (an empty layer used to return an empty output)."""
    wm, wr, bm, br = layer_params(4, 5, True, torch.float32)
    with pytest.raises(ValueError, match=r"weight_mu must not be empty, got shape \[0, 5\]"):
        compiled.linear_reparam_rows(torch.randn(3, 5), wm[:0], wr[:0], bm[:0], br[:0], torch.tensor([1]),
                                     1.0, 0.1, 0.4, 4)


def test_a_prior_of_ints_takes_the_checked_path_with_the_same_values(backend):
    params = layer_params(4, 5, True, torch.float32)
    x, seed = torch.randn(3, 5), torch.tensor([11])
    y_ints = BF.bayesian_linear(x, *params, seed=seed, prior=(1, 2, 3))[0]
    y_floats = BF.bayesian_linear(x, *params, seed=seed, prior=(1.0, 2.0, 3.0))[0]
    assert torch.equal(y_ints, y_floats)


class _Scaled(torch.nn.Module):
    def forward(self, w):
        return 2.0 * w


def test_a_parametrized_weight_mu_is_the_one_sampled(backend):
    """torch.nn.utils.parametrize moves weight_mu out of _parameters: the forward must still see
    the parametrized tensor (2 * weight_mu here), as a layer holding that value does."""
    layer, reference = BayesianLinear(5, 4), BayesianLinear(5, 4)
    with torch.no_grad():
        reference.load_state_dict(layer.state_dict())
        reference.weight_mu.mul_(2.0)
    parametrize.register_parametrization(layer, "weight_mu", _Scaled())
    x = torch.randn(3, 5)
    torch.manual_seed(5)
    y = layer(x)
    torch.manual_seed(5)
    assert torch.equal(y, reference(x))
    y.sum().backward()  # the gradient reaches the original parameter through the parametrization
    assert layer.parametrizations.weight_mu.original.grad is not None


def test_functional_call_parameters_are_the_ones_used(backend):
    layer, reference = BayesianLinear(5, 4), BayesianLinear(5, 4)
    x = torch.randn(3, 5)
    swapped = {name: p.detach() * 0.5 for name, p in reference.named_parameters()}
    with torch.no_grad():
        for name, p in reference.named_parameters():
            p.copy_(swapped[name])
    torch.manual_seed(9)
    y = torch.func.functional_call(layer, swapped, (x,))
    torch.manual_seed(9)
    assert torch.equal(y, reference(x))


def test_a_layer_without_bias_takes_the_same_values_either_way(compiled, monkeypatch):
    layer = BayesianLinear(5, 4, bias=False)
    x = torch.randn(3, 5)
    torch.manual_seed(2)
    fast = layer(x)
    _checked_path_only(monkeypatch)
    torch.manual_seed(2)
    assert torch.equal(fast, layer(x))
