"""bayes_ext.utils.Flipout and Radial: they do what their names promise (BLiTZ's did not)."""
import pytest
import torch
import torch.nn as nn

from bayes_ext.modules import BayesianConv2d, BayesianEmbedding, BayesianGRU, BayesianLinear, BayesianLSTM
from bayes_ext.utils import Flipout, Radial, variational_estimator


def linear(cls, **kwargs):
    torch.manual_seed(0)
    return cls(5, 3, posterior_rho_init=-1.0, **kwargs)


def test_flipout_output_is_mean_when_sigma_vanishes(backend):
    layer = linear(Flipout(BayesianLinear))
    with torch.no_grad():
        layer.weight_rho.fill_(-60.0)
        layer.bias_rho.fill_(-60.0)
    x = torch.randn(4, 5)
    torch.testing.assert_close(layer(x), layer.forward_frozen(x))


def test_flipout_decorrelates_identical_examples_and_keeps_marginals(backend):
    """Two identical inputs get the same output under plain sampling (one W per batch) but
    different outputs under Flipout; each example's mean and variance over many draws match."""
    plain, flip = linear(BayesianLinear), linear(Flipout(BayesianLinear))
    flip.load_state_dict(plain.state_dict())
    x = torch.randn(1, 5).repeat(2, 1)
    torch.manual_seed(1)
    with torch.no_grad():
        plain_draws = torch.stack([plain(x) for _ in range(1000)])
        flip_draws = torch.stack([flip(x) for _ in range(1000)])
    assert torch.equal(plain_draws[:, 0], plain_draws[:, 1])
    corr = torch.corrcoef(torch.stack([flip_draws[:, 0, 0], flip_draws[:, 1, 0]]))[0, 1]
    assert abs(corr) < 0.1, corr
    torch.testing.assert_close(flip_draws.mean(0), plain_draws.mean(0), atol=0.08, rtol=0)
    torch.testing.assert_close(flip_draws.var(0), plain_draws.var(0), rtol=0.2, atol=0)


def test_flipout_trains_and_reports_kl(backend):
    @variational_estimator
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = Flipout(BayesianConv2d)(1, 2, 3, posterior_rho_init=-3.0)
            self.head = Flipout(BayesianLinear)(2 * 4 * 4, 1, posterior_rho_init=-3.0)

        def forward(self, x):
            return self.head(self.conv(x).flatten(1))

    torch.manual_seed(0)
    net = Net()
    x, y = torch.randn(8, 1, 6, 6), torch.randn(8, 1)
    loss = net.sample_elbo(x, y, nn.functional.mse_loss, sample_nbr=2, complexity_cost_weight=1e-3)
    loss.backward()
    assert torch.isfinite(loss) and net.conv.weight_rho.grad.abs().sum() > 0
    assert net.nn_kl_divergence().requires_grad


def test_radial_samples_on_a_sphere_scaled_by_sigma(backend):
    """With sigma the same everywhere, (W - mu) / sigma = r * unit direction: its norm is |r|."""
    layer = linear(Radial(BayesianLinear), bias=False)
    with torch.no_grad():
        layer.weight_rho.fill_(0.0)  # sigma = log 2 everywhere
    torch.manual_seed(3)
    with torch.no_grad():
        radii = torch.stack([((layer(torch.eye(5)).t() - layer.weight_mu) / torch.log(torch.tensor(2.0))).norm()
                             for _ in range(1000)])
    # |r| with r ~ N(0, 1): mean sqrt(2 / pi) = 0.798, E[r^2] = 1
    assert abs(radii.mean().item() - 0.798) < 0.06, radii.mean()
    assert abs(radii.square().mean().item() - 1.0) < 0.12


def test_radial_kl_terms_and_gradients(backend):
    layer = linear(Radial(BayesianLinear))
    out = layer(torch.randn(4, 5))
    (out.sum() + layer.log_variational_posterior - layer.log_prior).backward()
    sigma_w = torch.nn.functional.softplus(layer.weight_rho.detach())
    sigma_b = torch.nn.functional.softplus(layer.bias_rho.detach())
    expected_log_q = -(sigma_w.log().sum() + sigma_b.log().sum())
    torch.testing.assert_close(layer.log_variational_posterior.detach(), expected_log_q)
    assert layer.weight_mu.grad is not None and layer.weight_rho.grad.abs().sum() > 0


@pytest.mark.parametrize("wrapper", [Flipout, Radial])
@pytest.mark.parametrize("cls", [BayesianEmbedding, nn.Linear, "BayesianLSTM"])
def test_wrappers_reject_layers_they_cannot_wrap(wrapper, cls):
    with pytest.raises(TypeError, match="wrap"):
        wrapper(cls)


# ---- recurrent layers ------------------------------------------------------------------------------------

RNNS = [(BayesianLSTM, {}), (BayesianLSTM, {"peephole": True}), (BayesianGRU, {})]


def rnn(cls, kwargs, wrapper=None, rho=-1.5):
    torch.manual_seed(0)
    layer = (wrapper(cls) if wrapper else cls)(3, 4, posterior_rho_init=rho, dtype=torch.float64, **kwargs)
    return layer


def last_h(out):
    return out[1][0] if isinstance(out[1], tuple) else out[1]


@pytest.mark.parametrize("cls,kwargs", RNNS)
def test_flipout_rnn_with_positive_signs_is_the_plain_sample(backend, monkeypatch, cls, kwargs):
    """All signs +1 make every W_n = mu + dW = W: the plain layer's output on the same seed."""
    import bayes_ext.utils.layer_wrappers as wrappers
    plain, flip = rnn(cls, kwargs), rnn(cls, kwargs, Flipout)
    flip.load_state_dict(plain.state_dict())
    monkeypatch.setattr(wrappers, "_rademacher_like", lambda t: torch.ones_like(t))
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    state = (torch.randn(2, 4, dtype=torch.float64), torch.randn(2, 4, dtype=torch.float64))
    state = state if cls is BayesianLSTM else state[0]
    torch.manual_seed(3)
    seq, out_state = flip(x, state)
    kl = flip.kl_divergence()
    torch.manual_seed(3)
    ref_seq, ref_state = plain(x, state)
    torch.testing.assert_close(seq, ref_seq)
    torch.testing.assert_close(last_h((seq, out_state)), last_h((ref_seq, ref_state)))
    torch.testing.assert_close(kl, plain.kl_divergence())


@pytest.mark.parametrize("cls,kwargs", RNNS)
def test_flipout_rnn_antithetic_signs_flip_the_perturbation(backend, monkeypatch, cls, kwargs):
    """s = +1, r = -1 gives W_n = mu - dW: the plain recurrence on the mirrored weights 2 mu - W."""
    import bayes_ext.utils.layer_wrappers as wrappers
    plain, flip = rnn(cls, kwargs), rnn(cls, kwargs, Flipout)
    flip.load_state_dict(plain.state_dict())
    calls = []

    def signs(t):
        calls.append(t.shape)
        return torch.ones_like(t) if len(calls) % 2 else -torch.ones_like(t)

    monkeypatch.setattr(wrappers, "_rademacher_like", signs)
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    torch.manual_seed(3)
    seq, _ = flip(x)
    torch.manual_seed(3)
    w = plain.sample_weights()
    mu_ih, mu_hh, _ = plain.get_frozen_weights()
    ref_seq, _ = plain._run(x, 2 * mu_ih - w[0], 2 * mu_hh - w[1], w[2], None)  # the bias is not flipped
    torch.testing.assert_close(seq, ref_seq)


@pytest.mark.parametrize("cls,kwargs", RNNS)
def test_flipout_rnn_decorrelates_sequences_and_reduces_to_mean(backend, cls, kwargs):
    flip = rnn(cls, kwargs, Flipout)
    x = torch.randn(1, 6, 3, dtype=torch.float64).repeat(2, 1, 1)
    seq, _ = flip(x)
    assert not torch.allclose(seq[0], seq[1])  # one plain sample would give identical rows
    (seq.sum() + flip.kl_divergence()).backward()
    assert all(torch.isfinite(p.grad).all() for p in flip.parameters())
    tiny = rnn(cls, kwargs, Flipout, rho=-60.0)
    torch.testing.assert_close(tiny(x)[0], tiny.forward_frozen(x)[0])


def test_flipout_rnn_refuses_sharpening():
    layer = Flipout(BayesianLSTM)(3, 4, sharpen=True)
    with pytest.raises(ValueError, match="sharpening"):
        layer(torch.randn(2, 5, 3), sharpen_loss=torch.tensor(1.0))


@pytest.mark.parametrize("cls,kwargs", RNNS)
def test_radial_rnn_runs_the_recurrence_on_radial_samples(backend, cls, kwargs):
    from bayes_ext import _backend
    from bayes_ext import functional as BF
    layer = rnn(cls, kwargs, Radial)
    x = torch.randn(2, 5, 3, dtype=torch.float64)
    torch.manual_seed(4)
    seq, _ = layer(x)
    log_q = layer.log_variational_posterior
    torch.manual_seed(4)
    seed = BF.draw_seed()
    weights, expected_q = [], 0
    for offset, (mu, rho) in enumerate(zip(layer.get_frozen_weights(), (layer.weight_ih_rho, layer.weight_hh_rho,
                                                                         layer.bias_rho))):
        eps = _backend.ops().philox_normal(mu, seed, offset)
        radius = torch.randn((), dtype=mu.dtype)
        sigma = torch.nn.functional.softplus(rho)
        weights.append(mu + sigma * eps / eps.norm() * radius)
        expected_q = expected_q - torch.log(sigma).sum()
    torch.testing.assert_close(seq, layer._run(x, *weights, None)[0])
    torch.testing.assert_close(log_q, expected_q)
    (seq.sum() + layer.kl_divergence()).backward()
    assert torch.isfinite(layer.weight_hh_rho.grad).all()
    layer.freeze = True
    torch.testing.assert_close(layer(x)[0], layer._run(x, *layer.get_frozen_weights(), None)[0])


@pytest.mark.parametrize("wrapper", [Flipout, Radial])
def test_wrapped_layers_freeze_like_the_original(backend, wrapper):
    layer = linear(wrapper(BayesianLinear))
    layer.freeze = True
    x = torch.randn(2, 5)
    torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.weight_mu, layer.bias_mu))
    assert list(dict(layer.named_parameters())) == ["weight_mu", "weight_rho", "bias_mu", "bias_rho"]
