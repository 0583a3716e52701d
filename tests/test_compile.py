"""torch.compile(fullgraph=True) of models of Bayesian layers: no graph breaks, and the same samples,
outputs and gradients as eager for the same seed, on both backends (CPU, inductor).

The per-forward seed is drawn with torch.randint on the default CPU generator
(bayes_ext.functional.draw_seed); these tests also check that a compiled forward draws the same seed
values and leaves the generator where eager leaves it. opcheck of the ops is tested elsewhere.
"""
import pytest
import torch
from torch import nn

from bayes_ext.modules import (BayesianConv1d, BayesianConv2d, BayesianConvTranspose2d, BayesianEmbedding, BayesianGRU,
                               BayesianLinear, BayesianLSTM)
from bayes_ext.utils import variational_estimator


@variational_estimator
class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = BayesianLinear(6, 16)
        self.l2 = BayesianLinear(16, 3, bias=False)

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(x)))


@variational_estimator
class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = BayesianConv2d(2, 4, 3, padding=1)
        self.up = BayesianConvTranspose2d(4, 2, 2, stride=2)
        self.c3 = BayesianConv1d(2, 3, 3)
        self.head = BayesianLinear(3 * 62, 2)

    def forward(self, x):  # x (B, 2, 4, 4)
        h = torch.relu(self.c1(x))
        h = torch.relu(self.up(h))  # (B, 2, 8, 8)
        h = torch.relu(self.c3(h.flatten(2)))  # (B, 3, 62)
        return self.head(h.flatten(1))


@variational_estimator
class Recurrent(nn.Module):
    def __init__(self, cell):
        super().__init__()
        self.rnn = cell(3, 5)
        self.head = BayesianLinear(5, 1)

    def forward(self, x):
        seq, _ = self.rnn(x)
        return self.head(seq[:, -1])


@variational_estimator
class Embedded(nn.Module):
    def __init__(self, kl):
        super().__init__()
        self.emb = BayesianEmbedding(50, 8, padding_idx=0, kl=kl, posterior_rho_init=-3.0)
        self.head = BayesianLinear(8, 2)

    def forward(self, ids):
        return self.head(self.emb(ids).mean(1))


def _step(model, x, seed):
    """One training step's outputs: (y, loss, grads by name, the generator's next draw)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    y = model(x)
    kl = model.nn_kl_divergence()
    loss = y.pow(2).mean() + 1e-3 * kl
    loss.backward()
    after = torch.randint(0, 2 ** 62, (4,))  # where the compiled / eager forward left the generator
    grads = {name.removeprefix("_orig_mod."): p.grad.clone() for name, p in model.named_parameters()}
    return y.detach(), loss.detach(), grads, after


def _check_same_as_eager(model, x, atol=1e-6, rtol=1e-5):
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    for seed in (1, 2):
        y_c, loss_c, grads_c, after_c = _step(compiled, x, seed)
        y_e, loss_e, grads_e, after_e = _step(model, x, seed)
        # same seed values drawn (the generator ends in the same state) and the same samples
        assert torch.equal(after_c, after_e)
        torch.testing.assert_close(y_c, y_e, atol=atol, rtol=rtol)
        torch.testing.assert_close(loss_c, loss_e, atol=atol, rtol=rtol)
        assert grads_c.keys() == grads_e.keys()
        for name in grads_e:
            torch.testing.assert_close(grads_c[name], grads_e[name], atol=atol, rtol=rtol, msg=name)
    # a fresh seed on every call: the seed is not baked into the compiled graph
    torch.manual_seed(3)
    first, second = compiled(x), compiled(x)
    assert not torch.allclose(first, second)
    # frozen (mean) forward compiles too and is deterministic
    model.freeze_()
    torch._dynamo.reset()
    frozen = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(frozen(x), model(x), atol=atol, rtol=rtol)
    model.unfreeze_()


def test_compile_linear(backend):
    torch.manual_seed(0)
    _check_same_as_eager(MLP().train(), torch.randn(5, 6))


@pytest.mark.slow
def test_compile_conv(backend):
    torch.manual_seed(0)
    _check_same_as_eager(ConvNet().train(), torch.randn(2, 2, 4, 4))


@pytest.mark.slow
@pytest.mark.parametrize("kl", ["mc", "closed_form"])
def test_compile_embedding(backend, kl):
    """The index checks read no values while compiling (the ops check the range), so no graph break."""
    torch.manual_seed(0)
    ids = torch.randint(0, 50, (4, 6))
    _check_same_as_eager(Embedded(kl), ids)


def test_compile_gru(backend):
    torch.manual_seed(0)
    _check_same_as_eager(Recurrent(BayesianGRU).train(), torch.randn(2, 4, 3))


def test_lstm_traces_without_graph_breaks():
    explanation = torch._dynamo.explain(Recurrent(BayesianLSTM))(torch.randn(2, 4, 3))
    assert explanation.graph_break_count == 0, explanation.break_reasons


def test_compile_lstm_training(backend):
    """Training compiles too: on the CPU the compiled graph runs the LSTM equations as a loop over
    time, because inductor's lowering of the fused kernel (mkldnn_rnn_layer) fails in training on
    torch 2.13 (nn.LSTM itself cannot even be traced: dynamo refuses RNN modules)."""
    torch.manual_seed(0)
    _check_same_as_eager(Recurrent(BayesianLSTM).train(), torch.randn(2, 4, 3))


def test_compile_lstm_inference(backend):
    torch.manual_seed(0)
    model, x = Recurrent(BayesianLSTM), torch.randn(2, 4, 3)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        torch.manual_seed(1)
        y_c, after_c = compiled(x), torch.randint(0, 2 ** 62, (4,))
        torch.manual_seed(1)
        y_e, after_e = model(x), torch.randint(0, 2 ** 62, (4,))
    assert torch.equal(after_c, after_e)
    torch.testing.assert_close(y_c, y_e, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("wrapper", ["Flipout", "Radial"])
@pytest.mark.parametrize("cls", [BayesianLinear, BayesianLSTM])
def test_wrapped_layers_trace_without_graph_breaks(backend, wrapper, cls):
    """Flipout / Radial layers read no tensor values in their forward (the fallback's exact-limit
    test of rho, which does, is skipped while tracing)."""
    from bayes_ext import utils
    layer = getattr(utils, wrapper)(cls)(3, 4)
    x = torch.randn(2, 5, 3) if cls is BayesianLSTM else torch.randn(2, 3)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(layer)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
