"""The eager fast path of the linear functionals in front of the one-call C++ layer ops
(functional._layer_op_input): on the compiled backend a plain eager call of bayesian_linear,
linear_lrt_with_kl or linear_flipout goes straight to its op, and the Python checks run only to word
an error the op raised. It must give the checked path's values and gradients, raise the checked path's
errors word for word, and use the parameters the module presents (parametrize, functional_call)."""
import pytest
import torch
from torch.nn.utils import parametrize

from bayes_ext import functional as BF
from bayes_ext import functional_estimators as BFE
from bayes_ext.modules import BayesianLinear

from helpers import layer_params

PRIOR = (0.5, 0.3, 1.5)
# name -> f(x, params, seed, prior) returning the functional's tensors; "lrt" takes prior[1] as its sigma
FUNCTIONALS = {
    "reparam": lambda x, p, seed, prior: BF.bayesian_linear(x, *p, seed=seed, prior=prior),
    "lrt": lambda x, p, seed, prior: BFE.linear_lrt_with_kl(x, *p, seed=seed, prior_sigma=prior[1]),
    "flipout": lambda x, p, seed, prior: BFE.linear_flipout(x, *p, seed=seed, prior=prior),
}
OPS = {"reparam": "linear_reparam_rows", "lrt": "linear_lrt_rows", "flipout": "linear_flipout_rows"}


def _checked_path_only(monkeypatch):
    monkeypatch.setattr(BF, "_layer_op_input", lambda *args: None)


@pytest.mark.parametrize("name", FUNCTIONALS)
def test_plain_eager_call_skips_the_python_checks(compiled, monkeypatch, name):
    monkeypatch.setattr(BF, "prepare_linear_call", lambda *a: pytest.fail("checked path taken"))
    with torch.profiler.profile() as prof:
        y = FUNCTIONALS[name](torch.randn(3, 5), layer_params(4, 5, True, torch.float32), None, PRIOR)[0]
    assert y.shape == (3, 4)
    assert f"bayes_ext::{OPS[name]}" in {e.key for e in prof.key_averages()}


@pytest.mark.parametrize("name", FUNCTIONALS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fast_and_checked_paths_agree_bit_for_bit(compiled, monkeypatch, name, bias, dtype):
    def run():
        params = layer_params(6, 5, bias, dtype)
        x = torch.randn(2, 3, 5, dtype=dtype, generator=torch.Generator().manual_seed(1), requires_grad=True)
        torch.manual_seed(7)  # the seed drawn inside the call
        y, *kl_terms = FUNCTIONALS[name](x, params, None, PRIOR)
        leaves = [x] + [p for p in params if p is not None]
        loss = (y * torch.arange(6.0, dtype=dtype)).sum() + sum(c * t for c, t in zip((0.3, -0.7), kl_terms))
        return (y, *kl_terms) + torch.autograd.grad(loss, leaves)

    fast = run()
    _checked_path_only(monkeypatch)
    checked = run()
    assert len(fast) == len(checked)
    for a, b in zip(fast, checked):
        assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.parametrize("name", FUNCTIONALS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block_rows", [None, 2])  # None: the whole weight in one block
def test_cpu_autocast_takes_the_op_with_the_python_ops_values(compiled, monkeypatch, block_rows, low, bias, name):
    """Under CPU autocast the functionals hand x in bf16 / fp16 to their C++ op (fast path and checked
    path) and get the Python custom op's output, KL terms and float32 gradients bit for bit."""
    if block_rows is not None:
        for blocks in ("BLOCK_ELEMENTS", "LRT_BLOCK_ELEMENTS"):
            monkeypatch.setattr(BF, blocks, block_rows * 5)

    def run():
        params = layer_params(6, 5, bias, torch.float32)
        x = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(1), requires_grad=True)
        torch.manual_seed(7)  # the seed drawn inside the call
        with torch.profiler.profile() as prof, torch.autocast("cpu", dtype=low):
            y, *kl_terms = FUNCTIONALS[name](x, params, None, PRIOR)
        leaves = [x] + [p for p in params if p is not None]
        loss = (y.float() * torch.arange(6.0)).sum() + sum(c * t for c, t in zip((0.3, -0.7), kl_terms))
        return (y, *kl_terms) + torch.autograd.grad(loss, leaves), {e.key for e in prof.key_averages()}

    op = f"bayes_ext::{OPS[name]}"
    fast, fast_ops = run()
    _checked_path_only(monkeypatch)
    checked, checked_ops = run()
    monkeypatch.setattr(BF, "layer_op_takes", lambda *args: False)  # the rule every functional asks
    python_op, python_ops = run()
    assert op in fast_ops & checked_ops and op not in python_ops
    grads = fast[-(5 if bias else 3):]  # x's and the parameters'
    assert fast[0].dtype == low and all(g.dtype == torch.float32 for g in grads)
    for a, b, c in zip(fast, checked, python_op):
        assert a.dtype == b.dtype == c.dtype and torch.equal(a, b) and torch.equal(a, c)


def _bad_calls(name):
    """(description, thunk) pairs of calls of functional `name` that must fail."""
    wm, wr, bm, br = layer_params(4, 5, True, torch.float32)
    x, seed, prior = torch.randn(3, 5), torch.tensor([3]), (1.0, 0.1, 0.4)
    f = FUNCTIONALS[name]

    def call(x, wm, wr, bm, br, seed, prior):
        return f(x, (wm, wr, bm, br), seed, prior)
    calls = [
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
    ]
    if name == "lrt":  # its prior is prior[1], a Gaussian's sigma
        return calls + [("prior_sigma", lambda: call(x, wm, wr, bm, br, seed, (1.0, 0.0, 1.0)))]
    return calls + [
        ("prior_pi", lambda: call(x, wm, wr, bm, br, seed, (1.5, 0.1, 0.4))),
        ("prior_sigma1", lambda: call(x, wm, wr, bm, br, seed, (0.5, -0.1, 0.4))),
        ("prior_sigma2", lambda: call(x, wm, wr, bm, br, seed, (0.5, 0.1, float("inf")))),
    ]


def _error_of(thunk):
    with pytest.raises((TypeError, ValueError, RuntimeError)) as info:
        thunk()
    return type(info.value), str(info.value)


@pytest.mark.parametrize("name", FUNCTIONALS)
def test_errors_are_the_checked_paths_word_for_word(compiled, monkeypatch, name):
    fast = [(what, _error_of(thunk)) for what, thunk in _bad_calls(name)]
    _checked_path_only(monkeypatch)
    checked = [(what, _error_of(thunk)) for what, thunk in _bad_calls(name)]
    assert fast == checked


@pytest.mark.parametrize("name", FUNCTIONALS)
def test_the_ops_reject_an_empty_weight(compiled, name):
    """The ops themselves, not only the Python checks (an empty layer used to return an empty output)."""
    wm, wr, bm, br = layer_params(4, 5, True, torch.float32)
    args = (torch.randn(3, 5), wm[:0], wr[:0], bm[:0], br[:0], torch.tensor([1]))
    scalars = (0.1, 4) if name == "lrt" else (1.0, 0.1, 0.4, 4)
    with pytest.raises(ValueError, match=r"weight_mu must not be empty, got shape \[0, 5\]"):
        getattr(compiled, OPS[name])(*args, *scalars)


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


@pytest.mark.parametrize("estimator", ["reparam", "lrt", "flipout"])
def test_a_layer_without_bias_takes_the_same_values_either_way(compiled, monkeypatch, estimator):
    layer = BayesianLinear(5, 4, bias=False, estimator=estimator)
    x = torch.randn(3, 5)
    torch.manual_seed(2)
    fast = layer(x), layer.kl_divergence()
    _checked_path_only(monkeypatch)
    torch.manual_seed(2)
    for a, b in zip(fast, (layer(x), layer.kl_divergence())):
        assert torch.equal(a, b)
