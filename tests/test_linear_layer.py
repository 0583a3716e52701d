"""BayesianLinear: parameters, defaults, the KL terms, freeze, prior_dist, reproducibility, the
output against F.linear on weights rebuilt from the seed, and the memory saved for backward."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bayes_ext
from bayes_ext import _backend
from bayes_ext import functional as BF
from bayes_ext.modules import BayesianLinear
from helpers import (SeedRecorder, assert_row_blocks_match_whole, posterior_7x9, ref_log_prior_terms, ref_sample,
                     saved_storage_bytes, seed_tensor, to64)

HALF_LOG_2PI = 0.5 * math.log(2 * math.pi)


def rebuild(layer, seed):
    """W and b of the forward that used `seed`: weight on stream (seed, 0), bias on (seed, 1)."""
    ops = _backend.ops()
    w = layer.weight_mu + F.softplus(layer.weight_rho) * ops.philox_normal(layer.weight_mu.detach(), seed, 0)
    b = None
    if layer.bias_mu is not None:
        b = layer.bias_mu + F.softplus(layer.bias_rho) * ops.philox_normal(layer.bias_mu.detach(), seed, 1)
    return w.detach(), None if b is None else b.detach()


def make_layer(in_f=6, out_f=4, **kwargs):
    torch.manual_seed(1)
    kwargs.setdefault("posterior_rho_init", -2.0)
    return BayesianLinear(in_f, out_f, **kwargs)


# ---- parameters and defaults ------------------------------------------------------------------------

def test_parameter_names():
    layer = BayesianLinear(5, 3)
    assert list(layer.state_dict().keys()) == ["weight_mu", "weight_rho", "bias_mu", "bias_rho"]
    names = [n for n, _ in layer.named_parameters()]
    assert names == ["weight_mu", "weight_rho", "bias_mu", "bias_rho"]
    params = list(layer.parameters())
    assert len(params) == 4 and len({id(p) for p in params}) == 4
    assert len({p.data_ptr() for p in params}) == 4  # no storage registered twice
    assert layer.weight_mu.shape == (3, 5) and layer.weight_rho.shape == (3, 5)
    assert layer.bias_mu.shape == (3,) and layer.bias_rho.shape == (3,)
    assert sum(p.numel() for p in layer.parameters()) == 2 * (15 + 3)


def test_parameter_names_without_bias():
    layer = BayesianLinear(5, 3, bias=False)
    assert list(layer.state_dict().keys()) == ["weight_mu", "weight_rho"]
    assert [n for n, _ in layer.named_parameters()] == ["weight_mu", "weight_rho"]


def test_state_dict_round_trip():
    a, b = BayesianLinear(5, 3), BayesianLinear(5, 3)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 5)
    a.freeze = b.freeze = True
    assert torch.equal(a(x), b(x))


def test_blitz_defaults():
    torch.manual_seed(0)
    layer = BayesianLinear(300, 200)
    assert (layer.prior_sigma_1, layer.prior_sigma_2, layer.prior_pi) == (0.1, 0.4, 1)
    assert layer.posterior_mu_init == 0 and layer.posterior_rho_init == -7.0
    assert layer.freeze is False and layer.prior_dist is None
    assert layer.in_features == 300 and layer.out_features == 200 and layer.bias
    for p in layer.parameters():
        assert p.dtype == torch.get_default_dtype()
    mu, rho = layer.weight_mu.detach(), layer.weight_rho.detach()
    assert abs(mu.mean().item()) < 0.005 and abs(mu.std().item() - 0.1) < 0.005
    assert abs(rho.mean().item() + 7.0) < 0.005 and abs(rho.std().item() - 0.1) < 0.005
    assert abs(layer.bias_rho.detach().mean().item() + 7.0) < 0.05


def test_init_arguments():
    torch.manual_seed(0)
    layer = BayesianLinear(100, 100, posterior_mu_init=1.5, posterior_rho_init=-3.0, prior_sigma_1=0.3,
                           prior_sigma_2=0.01, prior_pi=0.25)
    assert abs(layer.weight_mu.mean().item() - 1.5) < 0.01
    assert abs(layer.weight_rho.mean().item() + 3.0) < 0.01
    assert (layer.prior_sigma_1, layer.prior_sigma_2, layer.prior_pi) == (0.3, 0.01, 0.25)


# ---- forward vs weights rebuilt from the seed ----------------------------------------------------------

@pytest.mark.parametrize("bias", [True, False])
def test_output_equals_linear_with_rebuilt_weights(backend, monkeypatch, bias):
    layer = make_layer(bias=bias, prior_pi=0.5, prior_sigma_1=0.3, prior_sigma_2=1.5)
    rec = SeedRecorder(monkeypatch)
    x = torch.randn(7, 6)
    y = layer(x)
    assert len(rec.seeds) == 1
    w, b = rebuild(layer, rec.seeds[0])
    torch.testing.assert_close(y, F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    # the KL terms are those of the same sample
    eps_w = _backend.ops().philox_normal(layer.weight_mu.detach(), rec.seeds[0], 0)
    _, q, p = ref_sample(*to64(layer.weight_mu, layer.weight_rho, eps_w), layer.prior)
    if bias:
        eps_b = _backend.ops().philox_normal(layer.bias_mu.detach(), rec.seeds[0], 1)
        _, qb, pb = ref_sample(*to64(layer.bias_mu, layer.bias_rho, eps_b), layer.prior)
        q, p = q + qb, p + pb
    torch.testing.assert_close(layer.log_variational_posterior.double(), q, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(layer.log_prior.double(), p, rtol=1e-5, atol=1e-4)


def test_functional_explicit_seed(backend):
    layer = make_layer()
    x = torch.randn(3, 6)
    seed = seed_tensor(2 ** 63 + 12345)
    y, log_q, log_p = BF.bayesian_linear(x, layer.weight_mu, layer.weight_rho, layer.bias_mu, layer.bias_rho, seed=seed,
                                         prior=layer.prior)
    w, b = rebuild(layer, seed)
    torch.testing.assert_close(y, F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    y2, q2, p2 = BF.bayesian_linear(x, layer.weight_mu, layer.weight_rho, layer.bias_mu, layer.bias_rho, seed=seed,
                                    prior=layer.prior)
    assert torch.equal(y, y2) and torch.equal(log_q, q2) and torch.equal(log_p, p2)
    # the weight and the bias come from different streams
    wq = BF.sample_weight(layer.weight_mu, layer.weight_rho, seed, 0, layer.prior)
    bq = BF.sample_weight(layer.bias_mu, layer.bias_rho, seed, 1, layer.prior)
    torch.testing.assert_close(log_q, wq[1] + bq[1])
    torch.testing.assert_close(log_p, wq[2] + bq[2])


def test_gradients_match_unfused_reference(backend, monkeypatch):
    # the fused sample+matmul backward (W rebuilt from the seed) against autograd through
    # F.linear on explicitly sampled weights
    layer = make_layer(in_f=9, out_f=5, prior_pi=0.5, prior_sigma_1=0.3, prior_sigma_2=1.5, dtype=torch.float64)
    rec = SeedRecorder(monkeypatch)
    x = torch.randn(4, 3, 9, dtype=torch.float64, requires_grad=True)
    g_out = torch.randn(4, 3, 5, dtype=torch.float64)
    y = layer(x)
    ((y * g_out).sum() + 0.3 * layer.log_variational_posterior - 0.7 * layer.log_prior).backward()
    seed = rec.seeds[0]
    ops = _backend.ops()
    params = {n: p.detach().clone().requires_grad_() for n, p in layer.named_parameters()}
    x_ref = x.detach().clone().requires_grad_()
    eps_w = ops.philox_normal(params["weight_mu"].detach(), seed, 0)
    eps_b = ops.philox_normal(params["bias_mu"].detach(), seed, 1)
    w, q, p = ref_sample(params["weight_mu"], params["weight_rho"], eps_w, layer.prior)
    b, qb, pb = ref_sample(params["bias_mu"], params["bias_rho"], eps_b, layer.prior)
    ((F.linear(x_ref, w, b) * g_out).sum() + 0.3 * (q + qb) - 0.7 * (p + pb)).backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    for name, param in layer.named_parameters():
        torch.testing.assert_close(param.grad, params[name].grad, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("bias", [True, False])
def test_row_blocks_give_the_whole_weights_values_and_gradients(backend, monkeypatch, bias):
    # Large CPU weights are sampled and differentiated in blocks of rows, each block with the noise
    # it has in the whole weight: outputs, KL terms and gradients equal the one-block computation.
    params = posterior_7x9(1, bias)
    x = torch.randn(4, 3, 9, dtype=torch.float64, requires_grad=True)
    g_out = torch.randn(4, 3, 7, dtype=torch.float64)

    def run():
        y, log_q, log_p = BF.bayesian_linear(x, *params, seed=seed_tensor(2 ** 62 + 77), prior=(0.5, 0.3, 1.5))
        return (y, log_q, log_p), (y * g_out).sum() + 0.3 * log_q - 0.7 * log_p
    assert_row_blocks_match_whole(monkeypatch, params[0], run, [x] + [p for p in params if p is not None])


@pytest.mark.parametrize("which", ["output", "kl"])
def test_backward_through_one_output_only(backend, which):
    layer = make_layer(dtype=torch.float64)
    x = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    loss = y.sum() if which == "output" else layer.kl_divergence()
    loss.backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    if which == "kl":
        # KL does not depend on x; mu gradients come only from log p (log q is free of mu)
        assert x.grad is None or torch.count_nonzero(x.grad) == 0
        assert torch.count_nonzero(layer.weight_rho.grad) > 0
    else:
        assert torch.count_nonzero(x.grad) > 0


# ---- KL terms ---------------------------------------------------------------------------------------

def test_kl_terms_set_every_forward(backend):
    layer = make_layer()
    x = torch.randn(3, 6)
    layer(x)
    q1, p1 = layer.log_variational_posterior, layer.log_prior
    for t in (q1, p1):
        assert isinstance(t, torch.Tensor) and t.shape == () and t.grad_fn is not None and torch.isfinite(t)
    layer(x)
    q2, p2 = layer.log_variational_posterior, layer.log_prior
    assert q2.grad_fn is not None and p2.grad_fn is not None
    assert q1.item() != q2.item() and p1.item() != p2.item()
    torch.testing.assert_close(layer.kl_divergence(), q2 - p2)


def _kl_at_mean(layer):
    q = p = 0.0
    for name in ("weight", "bias"):
        mu = getattr(layer, f"{name}_mu")
        if mu is None:
            continue
        rho = getattr(layer, f"{name}_rho")
        mu64, rho64 = to64(mu, rho)
        q = q + torch.distributions.Normal(mu64, F.softplus(rho64)).log_prob(mu64).sum()
        if layer.prior_dist is not None:
            p = p + layer.prior_dist.log_prob(mu64).sum()
        else:
            p = p + ref_log_prior_terms(mu64, *layer.prior).sum()
    return q, p


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("prior_dist", [None, "normal"])
def test_freeze_uses_means_and_fresh_kl_terms(backend, bias, prior_dist):
    dist = torch.distributions.Normal(0.0, 1.0) if prior_dist else None
    layer = make_layer(bias=bias, prior_pi=0.5, prior_sigma_1=0.3, prior_sigma_2=1.5, prior_dist=dist)
    x = torch.randn(5, 6)
    layer(x)
    sampled_q, sampled_p = layer.log_variational_posterior.item(), layer.log_prior.item()
    layer.freeze = True
    y1, y2 = layer(x), layer(x)
    expected = F.linear(x, layer.weight_mu, layer.bias_mu)
    assert torch.equal(y1, expected) and torch.equal(y2, expected)
    q, p = _kl_at_mean(layer)
    torch.testing.assert_close(layer.log_variational_posterior.double(), q, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(layer.log_prior.double(), p, rtol=1e-5, atol=1e-4)
    assert layer.log_variational_posterior.item() != sampled_q and layer.log_prior.item() != sampled_p
    torch.testing.assert_close(layer.kl_divergence().double(), q - p, rtol=1e-5, atol=1e-4)
    # unfreeze: sampling again
    layer.freeze = False
    y3, y4 = layer(x), layer(x)
    assert not torch.equal(y3, expected) and not torch.equal(y3, y4)
    assert layer.log_prior.grad_fn is not None


def test_forward_frozen_method(backend):
    layer = make_layer()
    x = torch.randn(2, 6)
    assert torch.equal(layer.forward_frozen(x), F.linear(x, layer.weight_mu, layer.bias_mu))
    assert layer.freeze is False
    assert not torch.equal(layer(x), layer.forward_frozen(x))


def test_frozen_then_sampled_kl_terms_not_stale(backend, monkeypatch):
    layer = make_layer()
    x = torch.randn(2, 6)
    layer.freeze = True
    layer(x)
    q_mean = layer.log_variational_posterior.item()
    layer.freeze = False
    rec = SeedRecorder(monkeypatch)
    layer(x)
    eps = _backend.ops().philox_normal(layer.weight_mu.detach(), rec.seeds[0], 0)
    eps_b = _backend.ops().philox_normal(layer.bias_mu.detach(), rec.seeds[0], 1)
    _, q, _ = ref_sample(*to64(layer.weight_mu, layer.weight_rho, eps), layer.prior)
    _, qb, _ = ref_sample(*to64(layer.bias_mu, layer.bias_rho, eps_b), layer.prior)
    torch.testing.assert_close(layer.log_variational_posterior.double(), q + qb, rtol=1e-5, atol=1e-4)
    assert layer.log_variational_posterior.item() != q_mean


@pytest.mark.parametrize("dist", [torch.distributions.Normal(0.0, 1.0), torch.distributions.Laplace(0.1, 0.5)],
                         ids=["normal", "laplace"])
@pytest.mark.parametrize("bias", [True, False])
def test_prior_dist(backend, monkeypatch, dist, bias):
    layer = make_layer(bias=bias, prior_dist=dist)
    rec = SeedRecorder(monkeypatch)
    x = torch.randn(3, 6)
    y = layer(x)
    w, b = rebuild(layer, rec.seeds[0])
    torch.testing.assert_close(y, F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    expected = dist.log_prob(w).sum() + (dist.log_prob(b).sum() if bias else 0.0)
    torch.testing.assert_close(layer.log_prior, expected, rtol=1e-5, atol=1e-5)
    assert layer.log_prior.grad_fn is not None
    # the scale-mixture value would be different: the distribution is really used
    mixture = ref_log_prior_terms(w.double(), *layer.prior).sum()
    assert abs(layer.log_prior.item() - mixture.item()) > 1.0
    layer.log_prior.backward()
    assert layer.weight_mu.grad is not None and torch.count_nonzero(layer.weight_mu.grad) > 0


# ---- reproducibility -------------------------------------------------------------------------------

def test_manual_seed_reproducibility(backend):
    layer = make_layer()
    x = torch.randn(4, 6)
    torch.manual_seed(123)
    a = [layer(x) for _ in range(3)]
    qa = layer.log_variational_posterior.item()
    torch.manual_seed(123)
    b = [layer(x) for _ in range(3)]
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert layer.log_variational_posterior.item() == qa
    assert not torch.equal(a[0], a[1])
    torch.manual_seed(124)
    assert not torch.equal(layer(x), a[0])


def test_same_seed_same_model_on_both_backends():
    if not bayes_ext.extension_available():
        pytest.skip("needs the compiled extension")
    layer = make_layer()
    x = torch.randn(4, 6)
    outs = {}
    for name in ("compiled", "python"):
        with bayes_ext.use_backend(name):
            torch.manual_seed(7)
            outs[name] = layer(x)
    torch.testing.assert_close(outs["compiled"], outs["python"], rtol=1e-5, atol=1e-5)


# ---- memory saved for backward -------------------------------------------------------------------------


@pytest.mark.parametrize("sample_nbr", [1, 3])
@pytest.mark.parametrize("bias", [True, False])
def test_saved_memory_like_nn_linear(backend, sample_nbr, bias):
    in_f, out_f = 256, 128
    torch.manual_seed(0)
    inputs = [torch.randn(32, in_f, requires_grad=True) for _ in range(sample_nbr)]
    bayes = BayesianLinear(in_f, out_f, bias=bias)
    plain = nn.Linear(in_f, out_f, bias=bias)
    bayes_bytes, outs = saved_storage_bytes(bayes, inputs)
    linear_bytes, _ = saved_storage_bytes(plain, inputs)
    weight_bytes = in_f * out_f * 4
    assert linear_bytes == sample_nbr * 32 * in_f * 4  # nn.Linear saves its input
    assert linear_bytes <= bayes_bytes <= linear_bytes + 300 * sample_nbr, (bayes_bytes, linear_bytes, weight_bytes)
    # and the saved state is enough for backward
    sum(o.sum() for o in outs).backward()
    assert bayes.weight_mu.grad is not None and inputs[0].grad is not None


# ---- shapes, dtypes, composition --------------------------------------------------------------------

def test_bias_false(backend, monkeypatch):
    layer = make_layer(bias=False)
    rec = SeedRecorder(monkeypatch)
    x = torch.randn(3, 6)
    y = layer(x)
    w, _ = rebuild(layer, rec.seeds[0])
    torch.testing.assert_close(y, F.linear(x, w), rtol=1e-5, atol=1e-5)
    y.sum().backward()
    assert layer.weight_mu.grad is not None
    layer.freeze = True
    torch.testing.assert_close(layer(x), x @ layer.weight_mu.t())


def test_float64_layer(backend, monkeypatch):
    layer = make_layer(dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in layer.parameters())
    rec = SeedRecorder(monkeypatch)
    x = torch.randn(3, 6, dtype=torch.float64)
    y = layer(x)
    assert y.dtype == torch.float64
    assert layer.log_prior.dtype == torch.float64 and layer.log_variational_posterior.dtype == torch.float64
    w, b = rebuild(layer, rec.seeds[0])
    torch.testing.assert_close(y, F.linear(x, w, b), rtol=1e-12, atol=1e-12)


def test_to_float64_after_construction(backend):
    layer = make_layer().double()
    x = torch.randn(3, 6, dtype=torch.float64)
    y = layer(x)
    assert y.dtype == torch.float64
    layer.freeze = True
    assert torch.equal(layer(x), F.linear(x, layer.weight_mu, layer.bias_mu))


@pytest.mark.parametrize("shape", [(6,), (2, 3, 6), (2, 1, 3, 6)])
def test_leading_batch_dims(backend, monkeypatch, shape):
    layer = make_layer()
    rec = SeedRecorder(monkeypatch)
    x = torch.randn(shape, requires_grad=True)
    y = layer(x)
    assert y.shape == shape[:-1] + (4,)
    w, b = rebuild(layer, rec.seeds[0])
    torch.testing.assert_close(y, F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    g = torch.randn(y.shape)
    (y * g).sum().backward()
    torch.testing.assert_close(x.grad, g @ w, rtol=1e-5, atol=1e-5)
    gw = g.reshape(-1, 4).t() @ x.detach().reshape(-1, 6)
    # grad of weight_mu is d(output)/dW only (prior pi = 1, no KL term in the loss)
    torch.testing.assert_close(layer.weight_mu.grad, gw, rtol=1e-5, atol=1e-5)


def test_non_contiguous_input(backend, monkeypatch):
    layer = make_layer()
    rec = SeedRecorder(monkeypatch)
    x = torch.randn(6, 5).t()
    y = layer(x)
    w, b = rebuild(layer, rec.seeds[0])
    torch.testing.assert_close(y, F.linear(x.contiguous(), w, b), rtol=1e-5, atol=1e-5)


def test_zero_size_batch(backend):
    layer = make_layer()
    x = torch.randn(0, 6, requires_grad=True)
    y = layer(x)
    assert y.shape == (0, 4)
    assert torch.isfinite(layer.log_prior) and torch.isfinite(layer.log_variational_posterior)
    (y.sum() + layer.kl_divergence()).backward()
    assert x.grad.shape == (0, 6)
    assert torch.isfinite(layer.weight_rho.grad).all()


def test_inside_sequential_with_relu(backend):
    torch.manual_seed(0)
    model = nn.Sequential(BayesianLinear(6, 16, posterior_rho_init=-3.0), nn.ReLU(), BayesianLinear(16, 2))
    x = torch.randn(8, 6, requires_grad=True)
    y = model(x)
    assert y.shape == (8, 2)
    loss = y.pow(2).mean() + 1e-3 * bayes_ext.losses.kl_divergence_from_nn(model)
    loss.backward()
    assert x.grad is not None and torch.count_nonzero(x.grad) > 0
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    assert sorted(model.state_dict().keys()) == sorted(
        f"{i}.{n}" for i in (0, 2) for n in ("weight_mu", "weight_rho", "bias_mu", "bias_rho"))


def test_training_reduces_loss(backend):
    torch.manual_seed(0)
    layer = BayesianLinear(4, 1, posterior_rho_init=-5.0)
    x = torch.randn(64, 4)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5], [3.0]]) + 0.3
    opt = torch.optim.Adam(layer.parameters(), lr=0.05)
    losses = []
    for _ in range(150):
        opt.zero_grad()
        loss = F.mse_loss(layer(x), y) + layer.kl_divergence() / 1e4
        loss.backward()
        opt.step()
        losses.append(F.mse_loss(layer(x), y).item())
    assert losses[-1] < 0.05 * losses[0]
    torch.testing.assert_close(layer.weight_mu.detach(), torch.tensor([[1.0, -2.0, 0.5, 3.0]]), atol=0.1, rtol=0)


# ---- autocast (BLiTZ layers work under torch.autocast: they are plain F.linear) ---------------------

def test_autocast_cpu_backward(backend):
    layer = make_layer()
    x = torch.randn(3, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16  # like nn.Linear under autocast
    y.float().sum().backward()
    assert layer.weight_mu.grad.dtype == torch.float32 and torch.isfinite(layer.weight_mu.grad).all()


def test_autocast_cpu_low_precision_input(backend):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), BayesianLinear(6, 4))
    x = torch.randn(3, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = model(x)
    assert y.shape == (3, 4)


def test_deepcopy_and_pickle_after_forward(backend):
    import copy
    import io
    layer = make_layer()
    layer(torch.randn(2, 6)).sum().backward()
    clone = copy.deepcopy(layer)
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    for other in (clone, torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)):
        assert torch.equal(other.weight_mu, layer.weight_mu) and other.weight_mu is not layer.weight_mu
        assert other.log_prior == 0 and other.log_variational_posterior == 0
        other.freeze = True
        x = torch.randn(2, 6)
        layer.freeze = True
        torch.testing.assert_close(other(x), layer(x))
        layer.freeze = False
