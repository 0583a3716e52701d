"""Layers whose parameters are bf16 / fp16 (model.half(), .to(torch.bfloat16), dtype=torch.float16),
as BLiTZ's layers allow: each forward is the float32 layer's under torch.autocast with that dtype
(modules/_low_precision.py). The reference here is that float32 layer, built from the upcast
parameters and run under autocast on the same seed."""
import copy

import pytest
import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from bayes_ext import bayesianize
from bayes_ext.modules import BayesianLinear
from bayes_ext.utils import variational_estimator
from helpers import SMALL_LAYERS as LAYERS

LOW = [torch.bfloat16, torch.float16]


def _output(out):
    return out[0] if isinstance(out, tuple) else out


def _step(layer, x, seed, autocast_dtype=None):
    """One forward on `seed` (under autocast when asked, without the cast cache, as the layer's own
    forward cannot cache its per-call float32 copies) and a backward of sum(out) + KL."""
    torch.manual_seed(seed)
    if autocast_dtype is None:
        out = layer(x)
    else:
        with torch.autocast(x.device.type, dtype=autocast_dtype, cache_enabled=False):
            out = layer(x)
    log_q, log_p = layer.log_variational_posterior, layer.log_prior
    (_output(out).float().sum() + log_q - log_p).backward()
    return out, log_q.detach(), log_p.detach()


def check_low_precision_layer(name, dtype, device="cpu"):
    """LAYERS[name] in `dtype` against its float32 self under autocast (tests/test_cuda_layers.py
    runs this on the GPU)."""
    make, make_x = LAYERS[name]
    layer = make().to(device=device, dtype=dtype)
    reference = copy.deepcopy(layer).float()
    x = make_x().to(device)
    x = x.to(dtype) if x.is_floating_point() else x
    out, log_q, log_p = _step(layer, x, seed=7)
    ref_out, ref_log_q, ref_log_p = _step(reference, x, seed=7, autocast_dtype=dtype)
    assert _output(out).dtype == dtype
    assert torch.equal(_output(out), _output(ref_out).to(dtype))
    if isinstance(out, tuple):  # the RNNs' (h, c) / h: in the low precision too
        for state, ref_state in zip(tree_leaves(out[1]), tree_leaves(ref_out[1])):
            assert state.dtype == dtype and torch.equal(state, ref_state.to(dtype))
    assert log_q.dtype == torch.float32 and torch.equal(log_q, ref_log_q)
    assert torch.equal(torch.as_tensor(log_p), torch.as_tensor(ref_log_p))
    for (pname, p), ref_p in zip(layer.named_parameters(), reference.parameters()):
        assert p.dtype == dtype and p.grad is not None and p.grad.dtype == dtype, pname
        assert torch.equal(p.grad, ref_p.grad.to(dtype)), pname


@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_low_precision_layer_is_its_float32_self_under_autocast(backend, name, dtype):
    """Output, KL terms and gradients, bit for bit; the output and the gradients in the parameters'
    dtype, the KL terms in float32."""
    check_low_precision_layer(name, dtype)


def test_the_layer_keeps_its_own_parameters_also_when_the_forward_raises(backend):
    """The float32 copies live only inside the forward: the registered Parameters (which an optimiser
    holds) are the same objects afterwards, also after a bad input raised."""
    layer = BayesianLinear(4, 3).half()
    before = dict(layer.named_parameters())
    layer(torch.randn(2, 4, dtype=torch.float16))
    with pytest.raises(ValueError, match="input must have 4 features"):
        layer(torch.randn(2, 5, dtype=torch.float16))
    after = dict(layer.named_parameters())
    assert after.keys() == before.keys()
    assert all(after[k] is before[k] and isinstance(after[k], nn.Parameter) for k in before)
    assert all(p.dtype == torch.float16 for p in after.values())


@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "fp16"])
def test_constructed_in_low_precision(backend, dtype):
    layer = BayesianLinear(6, 2, dtype=dtype)
    assert {p.dtype for p in layer.parameters()} == {dtype}
    out = layer(torch.randn(5, 6, dtype=dtype))
    assert out.dtype == dtype and out.shape == (5, 2) and torch.isfinite(out).all()
    assert torch.isfinite(layer.log_variational_posterior - layer.log_prior)


@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "fp16"])
def test_frozen_low_precision_layer_uses_the_means(backend, dtype):
    """freeze=True: w = mu in the low precision (F.linear on the layer's own values), and the KL
    terms of the means, read after the forward, in float32."""
    layer = BayesianLinear(6, 3).to(dtype)
    reference = copy.deepcopy(layer).float()
    layer.freeze = reference.freeze = True
    x = torch.randn(4, 6, dtype=dtype)
    assert torch.equal(layer(x), nn.functional.linear(x, layer.weight_mu, layer.bias_mu))
    reference(x.float())
    assert layer.log_variational_posterior.dtype == torch.float32
    assert torch.equal(layer.log_variational_posterior, reference.log_variational_posterior)
    assert torch.equal(layer.log_prior, reference.log_prior)


@variational_estimator
class _Regressor(nn.Module):
    def __init__(self):
        super().__init__()
        self.hidden = BayesianLinear(5, 16)
        self.out = BayesianLinear(16, 1)

    def forward(self, x):
        return self.out(torch.relu(self.hidden(x)))


def squared_error(out, target):
    """nn.MSELoss's value from elementwise ops: torch 2.4 has no bf16 CPU kernel for mse_loss."""
    return (out - target).pow(2).mean()


@pytest.mark.parametrize("vectorized", [False, True])
def test_sample_elbo_trains_a_bf16_model(backend, vectorized):
    """BLiTZ's training loop on a model cast with .to(torch.bfloat16): bf16 gradients, a falling loss."""
    torch.manual_seed(0)
    net = _Regressor().to(torch.bfloat16)
    x = torch.randn(64, 5)
    y = (x @ torch.randn(5, 1)).to(torch.bfloat16)
    x = x.to(torch.bfloat16)
    optimiser = torch.optim.Adam(net.parameters(), lr=0.02)
    losses = []
    for _ in range(40):
        optimiser.zero_grad()
        loss = net.sample_elbo(x, y, squared_error, sample_nbr=2, complexity_cost_weight=1e-4, vectorized=vectorized)
        loss.backward()
        assert all(p.grad.dtype == torch.bfloat16 for p in net.parameters())
        optimiser.step()
        losses.append(float(loss.detach()))
    assert sum(losses[-5:]) < 0.5 * sum(losses[:5])


def test_vectorised_elbo_of_a_bf16_model_matches_the_loop(backend):
    """The batched samples draw the loop's seeds: the same loss up to bf16 rounding of the outputs."""
    net = _Regressor().to(torch.bfloat16)
    x, y = torch.randn(16, 5, dtype=torch.bfloat16), torch.randn(16, 1, dtype=torch.bfloat16)
    losses = []
    for vectorized in (False, True):
        torch.manual_seed(3)
        losses.append(net.sample_elbo(x, y, squared_error, sample_nbr=3, vectorized=vectorized).detach())
    torch.testing.assert_close(losses[0], losses[1], rtol=2e-2, atol=0)


def test_compiled_low_precision_model_equals_eager(backend):
    torch._dynamo.reset()
    net = _Regressor().to(torch.bfloat16)
    compiled = torch.compile(net, fullgraph=True, backend="aot_eager")
    x = torch.randn(8, 5, dtype=torch.bfloat16)
    torch.manual_seed(11)
    eager = net(x)
    torch.manual_seed(11)
    assert torch.equal(compiled(x), eager)


@pytest.mark.parametrize("dtype", LOW, ids=["bf16", "fp16"])
def test_bayesianize_a_low_precision_model(backend, dtype):
    """The converted layers keep the model's dtype; frozen they give its outputs; MOPED's sigma is
    computed in float64, so tiny weights get a finite rho (1e-10 is 0 in fp16)."""
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 2)).to(dtype)
    with torch.no_grad():
        model[0].weight[0, 0] = 0.0
    bayes = bayesianize(model, delta=0.1)
    assert {p.dtype for p in bayes.parameters()} == {dtype}
    for layer, original in ((bayes[0], model[0]), (bayes[2], model[2])):
        rho = layer.weight_rho.float()
        assert torch.isfinite(rho).all()
        sigma = nn.functional.softplus(rho)
        expected = (0.1 * original.weight.float().abs()).clamp_min(1e-10)
        torch.testing.assert_close(sigma, expected, rtol=2e-2, atol=1e-10)
        layer.freeze = True
    x = torch.randn(3, 6, dtype=dtype)
    assert torch.equal(bayes(x), model(x))
    bayes[0].freeze = bayes[2].freeze = False
    out = bayes(x)
    assert out.dtype == dtype and torch.isfinite(out).all()


def test_functional_call_with_low_precision_tensors(backend):
    """torch.func.functional_call swaps bf16 tensors into a float32 layer: the layer reads the
    swapped tensors' dtype (not its own registered parameters') and runs as a bf16 layer."""
    layer = BayesianLinear(6, 3)
    half = copy.deepcopy(layer).to(torch.bfloat16)
    params = {name: p.detach().clone().requires_grad_(True) for name, p in half.named_parameters()}
    x = torch.randn(4, 6, dtype=torch.bfloat16)
    torch.manual_seed(9)
    out = torch.func.functional_call(layer, params, (x,))
    torch.manual_seed(9)
    assert out.dtype == torch.bfloat16 and torch.equal(out, half(x))
    out.sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.bfloat16 for p in params.values())
