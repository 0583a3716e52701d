"""Bayesian convolutions (BayesianConv1d/2d/3d, BayesianConvTranspose1d/2d/3d and the fused
``bayes_ext::conv_reparam`` op): shapes against nn, the output against F.conv*d on weights rebuilt
from the seed, gradients against autograd through a plain-torch reference, the KL terms against
torch.distributions, gradcheck / opcheck, freeze, prior_dist, composition with BayesianLinear,
the memory saved for backward, BLiTZ's argument order and argument errors."""
import inspect

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

import bayes_ext
from bayes_ext import _backend
from bayes_ext import functional_conv as BFC
from bayes_ext.losses import kl_divergence_from_nn
from bayes_ext.modules import (BayesianConv1d, BayesianConv2d, BayesianConv3d, BayesianConvTranspose1d,
                               BayesianConvTranspose2d, BayesianConvTranspose3d, BayesianLinear)
from bayes_ext.utils import variational_estimator
from helpers import (SeedRecorder, needs_torch, ref_log_prior_terms, ref_sample, saved_storage_bytes, seed_tensor,
                     to64)

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")

PRIOR = (0.5, 0.3, 1.5)  # a real mixture, so both components and their gradients matter

NN_CLASS = {BayesianConv1d: nn.Conv1d, BayesianConv2d: nn.Conv2d, BayesianConv3d: nn.Conv3d,
            BayesianConvTranspose1d: nn.ConvTranspose1d, BayesianConvTranspose2d: nn.ConvTranspose2d,
            BayesianConvTranspose3d: nn.ConvTranspose3d}

# (layer class, keyword arguments shared with the nn class, input shape)
CONFIGS = [
    (BayesianConv1d, dict(in_channels=4, out_channels=6, kernel_size=3, stride=2, padding=1), (3, 4, 11)),
    (BayesianConv1d, dict(in_channels=4, out_channels=6, kernel_size=(5,), dilation=2, groups=2, bias=False),
     (2, 4, 16)),
    (BayesianConv2d, dict(in_channels=3, out_channels=5, kernel_size=3, padding=1), (2, 3, 8, 8)),
    (BayesianConv2d, dict(in_channels=4, out_channels=6, kernel_size=(3, 2), stride=(2, 1), padding=(1, 0),
                          dilation=(1, 2), groups=2), (2, 4, 9, 7)),
    (BayesianConv2d, dict(in_channels=3, out_channels=4, kernel_size=4, padding="same"), (2, 3, 7, 6)),
    (BayesianConv2d, dict(in_channels=3, out_channels=4, kernel_size=(3, 2), padding="same", dilation=(2, 1)),
     (2, 3, 7, 6)),
    (BayesianConv2d, dict(in_channels=3, out_channels=4, kernel_size=3, padding="valid", bias=False), (2, 3, 6, 6)),
    (BayesianConv2d, dict(in_channels=2, out_channels=4, kernel_size=3, padding=1, padding_mode="reflect"),
     (2, 2, 5, 6)),
    (BayesianConv2d, dict(in_channels=2, out_channels=4, kernel_size=3, padding=(2, 1), padding_mode="circular"),
     (2, 2, 5, 6)),
    (BayesianConv3d, dict(in_channels=2, out_channels=3, kernel_size=(2, 3, 1), padding=(1, 0, 0)), (2, 2, 4, 5, 3)),
    (BayesianConv3d, dict(in_channels=4, out_channels=2, kernel_size=2, stride=2, groups=2, padding="valid"),
     (1, 4, 4, 5, 4)),
    (BayesianConvTranspose1d, dict(in_channels=3, out_channels=4, kernel_size=3, stride=2, output_padding=1),
     (2, 3, 6)),
    (BayesianConvTranspose2d, dict(in_channels=4, out_channels=6, kernel_size=(3, 2), stride=2, padding=1,
                                   output_padding=(1, 0), groups=2), (2, 4, 5, 4)),
    (BayesianConvTranspose2d, dict(in_channels=3, out_channels=2, kernel_size=3, dilation=2, bias=False), (2, 3, 4, 5)),
    (BayesianConvTranspose3d, dict(in_channels=2, out_channels=3, kernel_size=2, stride=2, padding=(0, 1, 0)),
     (1, 2, 3, 3, 2)),
]
CONFIG_IDS = [f"{cls.__name__[8:]}-{i}" for i, (cls, _, _) in enumerate(CONFIGS)]


@pytest.fixture(autouse=True)
def _one_thread():
    """These tensors are tiny: with two intra-op threads on a loaded machine every convolution
    waits on an OpenMP barrier (25 ms instead of 0.03 ms). conftest restores the thread count."""
    torch.set_num_threads(1)


def make_layer(cls, kwargs, dtype=torch.float32, **extra):
    torch.manual_seed(1)
    kwargs = dict(kwargs, **extra)
    kwargs.setdefault("posterior_rho_init", -2.0)  # sigma ~ 0.13: the noise is visible in every check
    kwargs.setdefault("prior_pi", PRIOR[0])
    kwargs.setdefault("prior_sigma_1", PRIOR[1])
    kwargs.setdefault("prior_sigma_2", PRIOR[2])
    return cls(**kwargs, dtype=dtype)


def make_nn(cls, kwargs, dtype=torch.float32):
    return NN_CLASS[cls](**kwargs, dtype=dtype)


def eps_of(layer, seed):
    ops = _backend.ops()
    # philox_normal is not differentiable (and has no autograd kernel): give it detached tensors
    eps_w = ops.philox_normal(layer.weight_mu.detach(), seed, 0)
    eps_b = ops.philox_normal(layer.bias_mu.detach(), seed, 1) if layer.bias_mu is not None else None
    return eps_w, eps_b


def rebuild(layer, seed):
    """W and b of the forward that used `seed`: weight on stream (seed, 0), bias on (seed, 1)."""
    eps_w, eps_b = eps_of(layer, seed)
    w = layer.weight_mu + F.softplus(layer.weight_rho) * eps_w
    b = None if eps_b is None else layer.bias_mu + F.softplus(layer.bias_rho) * eps_b
    return w.detach(), None if b is None else b.detach()


def nn_apply(nn_layer, x, w, b):
    """nn_layer's forward (F.conv*d / F.conv_transpose*d) with the given weight and bias."""
    params = {"weight": w}
    if b is not None:
        params["bias"] = b
    return functional_call(nn_layer, params, (x,))


def ref_kl_terms(layer, seed):
    """(log q, log p) of the sample of `seed` in float64, from torch.distributions (helpers.ref_sample)."""
    eps_w, eps_b = eps_of(layer, seed)
    _, q, p = ref_sample(*to64(layer.weight_mu, layer.weight_rho, eps_w), layer.prior)
    if eps_b is not None:
        _, qb, pb = ref_sample(*to64(layer.bias_mu, layer.bias_rho, eps_b), layer.prior)
        q, p = q + qb, p + pb
    return q, p


# ---- shapes, forward, KL terms --------------------------------------------------------------------------

@pytest.mark.parametrize("cls,kwargs,shape", CONFIGS, ids=CONFIG_IDS)
def test_forward_matches_nn_on_rebuilt_weights(backend, monkeypatch, cls, kwargs, shape):
    layer = make_layer(cls, kwargs)
    ref = make_nn(cls, kwargs)
    assert layer.weight_mu.shape == ref.weight.shape
    assert (layer.bias_mu is None) == (ref.bias is None)
    rec = SeedRecorder(monkeypatch)
    x = torch.randn(shape)
    y = layer(x)
    assert len(rec.seeds) == 1
    assert y.shape == ref(x).shape
    w, b = rebuild(layer, rec.seeds[0])
    torch.testing.assert_close(y, nn_apply(ref, x, w, b), rtol=1e-5, atol=1e-5)
    # the KL terms are those of the same sample, against torch.distributions
    q, p = ref_kl_terms(layer, rec.seeds[0])
    torch.testing.assert_close(layer.log_variational_posterior.double(), q, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(layer.log_prior.double(), p, rtol=1e-5, atol=1e-3)
    # a new forward draws a new sample
    y2 = layer(x)
    assert not torch.allclose(y, y2)


@pytest.mark.parametrize("cls,kwargs,shape", CONFIGS, ids=CONFIG_IDS)
def test_gradients_match_autograd_reference(backend, monkeypatch, cls, kwargs, shape):
    """x, weight_mu/rho, bias_mu/rho gradients of sum(y * g) + a log q + b log p, against autograd
    through W = mu + softplus(rho) * eps built with plain torch ops (float64)."""
    dtype = torch.float64
    layer = make_layer(cls, kwargs, dtype=dtype)
    ref = make_nn(cls, kwargs, dtype=dtype)
    rec = SeedRecorder(monkeypatch)
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=gen, dtype=dtype, requires_grad=True)
    y = layer(x)
    g = torch.randn(y.shape, generator=gen, dtype=dtype)
    a, c = 0.7, -1.3
    ((y * g).sum() + a * layer.log_variational_posterior + c * layer.log_prior).backward()

    eps_w, eps_b = eps_of(layer, rec.seeds[0])
    x_ref = x.detach().clone().requires_grad_(True)
    leaves = [p.detach().clone().requires_grad_(True) for p in (layer.weight_mu, layer.weight_rho)]
    w, q, p = ref_sample(leaves[0], leaves[1], eps_w, layer.prior)
    b = None
    if eps_b is not None:
        leaves += [p_.detach().clone().requires_grad_(True) for p_ in (layer.bias_mu, layer.bias_rho)]
        b, qb, pb = ref_sample(leaves[2], leaves[3], eps_b, layer.prior)
        q, p = q + qb, p + pb
    ((nn_apply(ref, x_ref, w, b) * g).sum() + a * q + c * p).backward()

    tol = dict(rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(x.grad, x_ref.grad, **tol)
    params = [layer.weight_mu, layer.weight_rho] + ([layer.bias_mu, layer.bias_rho] if eps_b is not None else [])
    for got, want in zip(params, leaves):
        torch.testing.assert_close(got.grad, want.grad, **tol)


@pytest.mark.parametrize("use", ["output", "kl"])
def test_backward_through_one_output_only(backend, monkeypatch, use):
    """Only y (log terms unused), or only the KL (y unused: grad_out is undefined in backward)."""
    layer = make_layer(BayesianConv2d, dict(in_channels=2, out_channels=3, kernel_size=3), dtype=torch.float64)
    rec = SeedRecorder(monkeypatch)
    x = torch.randn(2, 2, 5, 5, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    loss = y.sum() if use == "output" else layer.kl_divergence()
    loss.backward()
    eps_w, eps_b = eps_of(layer, rec.seeds[0])
    mu = layer.weight_mu.detach().clone().requires_grad_(True)
    rho = layer.weight_rho.detach().clone().requires_grad_(True)
    w, q, p = ref_sample(mu, rho, eps_w, layer.prior)
    ref_loss = F.conv2d(x.detach(), w, layer.bias_mu.detach()).sum() if use == "output" else q - p
    ref_loss.backward()
    torch.testing.assert_close(layer.weight_mu.grad, mu.grad, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(layer.weight_rho.grad, rho.grad, rtol=1e-9, atol=1e-9)
    if use == "kl":
        assert x.grad is None or torch.count_nonzero(x.grad) == 0
    else:
        torch.testing.assert_close(x.grad, F.conv_transpose2d(torch.ones_like(y), w.detach()), rtol=1e-9, atol=1e-9)


def test_input_grad_with_frozen_parameters(backend, monkeypatch):
    """Parameters that do not require grad: the backward still rebuilds W for grad_input."""
    layer = make_layer(BayesianConvTranspose2d, dict(in_channels=2, out_channels=3, kernel_size=3, stride=2))
    for p in layer.parameters():
        p.requires_grad_(False)
    rec = SeedRecorder(monkeypatch)
    x = torch.randn(2, 2, 4, 4, requires_grad=True)
    y = layer(x)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    w, _ = rebuild(layer, rec.seeds[0])
    torch.testing.assert_close(x.grad, F.conv2d(g, w, stride=2), rtol=1e-5, atol=1e-5)


def test_unbatched_input(backend, monkeypatch):
    layer = make_layer(BayesianConv2d, dict(in_channels=3, out_channels=4, kernel_size=3, padding=1))
    rec = SeedRecorder(monkeypatch)
    x = torch.randn(3, 6, 5, requires_grad=True)
    y = layer(x)
    assert y.shape == (4, 6, 5)
    w, b = rebuild(layer, rec.seeds[0])
    torch.testing.assert_close(y, F.conv2d(x, w, b, padding=1), rtol=1e-5, atol=1e-5)
    y.sum().backward()
    assert x.grad.shape == x.shape


def test_non_contiguous_and_channels_last_input(backend, monkeypatch):
    layer = make_layer(BayesianConv2d, dict(in_channels=3, out_channels=4, kernel_size=3))
    rec = SeedRecorder(monkeypatch)
    base = torch.randn(2, 7, 7, 3)
    for x in (base.permute(0, 3, 1, 2), base.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last),
              torch.randn(2, 3, 14, 7)[:, :, ::2]):
        x = x.detach().requires_grad_(True)
        y = layer(x)
        w, b = rebuild(layer, rec.seeds[-1])
        torch.testing.assert_close(y, F.conv2d(x, w, b), rtol=1e-5, atol=1e-5)
        y.sum().backward()
        torch.testing.assert_close(x.grad, F.conv_transpose2d(torch.ones_like(y), w), rtol=1e-5, atol=1e-5)


def test_conv_transpose_output_size(backend, monkeypatch):
    layer = make_layer(BayesianConvTranspose2d, dict(in_channels=2, out_channels=3, kernel_size=3, stride=2,
                                                     padding=1))
    ref = nn.ConvTranspose2d(2, 3, 3, stride=2, padding=1)
    rec = SeedRecorder(monkeypatch)
    x = torch.randn(1, 2, 4, 5)
    for size in [(7, 9), (8, 10), (1, 3, 8, 9)]:
        y = layer(x, output_size=size)
        assert y.shape == ref(x, output_size=size).shape
        w, b = rebuild(layer, rec.seeds[-1])
        torch.testing.assert_close(y, F.conv_transpose2d(x, w, b, stride=2, padding=1,
                                                         output_padding=ref._output_padding(
                                                             x, size, ref.stride, ref.padding, ref.kernel_size, 2,
                                                             ref.dilation)), rtol=1e-5, atol=1e-5)
    assert layer.forward_frozen(x, output_size=(8, 10)).shape == (1, 3, 8, 10)
    with pytest.raises(ValueError, match="output_size"):
        layer(x, output_size=(12, 9))


def test_functional_explicit_seed_and_string_padding(backend):
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(2, 3, 7, 6, generator=gen)
    mu = torch.randn(4, 3, 2, 3, generator=gen) * 0.3
    rho = torch.randn(4, 3, 2, 3, generator=gen) - 2
    b_mu, b_rho = torch.randn(4, generator=gen), torch.randn(4, generator=gen) - 2
    seed = seed_tensor(2 ** 63 + 12345)
    ops = _backend.ops()
    w = mu + F.softplus(rho) * ops.philox_normal(mu, seed, 0)
    b = b_mu + F.softplus(b_rho) * ops.philox_normal(b_mu, seed, 1)
    for padding in ["same", "valid", (1, 2), 0]:
        y, log_q, log_p = BFC.bayesian_conv(x, mu, rho, b_mu, b_rho, seed=seed, padding=padding, dilation=(2, 1),
                                            prior=PRIOR)
        torch.testing.assert_close(y, F.conv2d(x, w, b, padding=padding, dilation=(2, 1)), rtol=1e-5, atol=1e-5)
    _, q, p = ref_sample(*to64(mu, rho, ops.philox_normal(mu, seed, 0)), PRIOR)
    _, qb, pb = ref_sample(*to64(b_mu, b_rho, ops.philox_normal(b_mu, seed, 1)), PRIOR)
    torch.testing.assert_close(log_q.double(), q + qb, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(log_p.double(), p + pb, rtol=1e-5, atol=1e-3)
    # the same seed gives the same sample; no seed draws from torch's generator
    y1 = BFC.bayesian_conv(x, mu, rho, seed=seed)[0]
    torch.testing.assert_close(y1, BFC.bayesian_conv(x, mu, rho, seed=seed)[0], rtol=0, atol=0)
    torch.manual_seed(7)
    y2 = BFC.bayesian_conv(x, mu, rho)[0]
    torch.manual_seed(7)
    torch.testing.assert_close(y2, BFC.bayesian_conv(x, mu, rho)[0], rtol=0, atol=0)


def test_same_seed_same_output_on_both_backends():
    if not bayes_ext.extension_available():
        pytest.skip("compiled extension not available")
    layer = make_layer(BayesianConv2d, dict(in_channels=3, out_channels=4, kernel_size=3, padding=1))
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    outs, grads = {}, {}
    for name in ("compiled", "python"):
        with bayes_ext.use_backend(name):
            torch.manual_seed(11)
            outs[name] = layer(x)
            grads[name] = torch.autograd.grad(outs[name].sum() + layer.kl_divergence(), [x, layer.weight_rho])
    torch.testing.assert_close(outs["compiled"], outs["python"], rtol=1e-5, atol=1e-5)
    for a, b in zip(grads["compiled"], grads["python"]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


# ---- gradcheck / opcheck --------------------------------------------------------------------------------

GRADCHECK_CASES = {
    # id: (input shape, weight shape, bias, keyword arguments); small, as the python backend's
    # Philox stream is slow and gradcheck runs two forwards per input element
    "conv1d": ((1, 2, 5), (2, 2, 3), True, dict(stride=2, padding=1)),
    "conv2d": ((1, 2, 3, 5), (2, 2, 2, 3), True, dict(padding=(1, 0), dilation=(1, 2))),
    "conv2d-nobias": ((1, 2, 3, 4), (2, 2, 2, 2), False, dict(stride=(2, 1))),
    "conv3d": ((1, 1, 3, 3, 2), (2, 1, 2, 2, 1), True, dict(stride=(1, 2, 1))),
    "transpose2d": ((1, 2, 2, 3), (2, 2, 3, 2), True, dict(transposed=True, stride=2, output_padding=1, padding=1)),
    "transpose2d-nobias": ((1, 2, 2, 2), (2, 1, 2, 2), False, dict(transposed=True, dilation=2)),
    "groups2-same": ((1, 4, 3, 3), (4, 2, 2, 2), True, dict(groups=2, padding="same")),
    "transpose-groups2": ((1, 4, 2, 2), (4, 1, 2, 2), True, dict(transposed=True, groups=2, stride=2)),
}


@pytest.mark.parametrize("case", list(GRADCHECK_CASES))
def test_gradcheck_bayesian_conv(backend, case):
    x_shape, w_shape, bias, kwargs = GRADCHECK_CASES[case]
    gen = torch.Generator().manual_seed(8)
    f64 = dict(generator=gen, dtype=torch.float64)
    x = torch.randn(x_shape, **f64).requires_grad_()
    w_mu = torch.randn(w_shape, **f64).requires_grad_()
    w_rho = (torch.randn(w_shape, **f64) - 1).requires_grad_()
    out_channels = w_shape[1] * kwargs.get("groups", 1) if kwargs.get("transposed") else w_shape[0]
    inputs = [x, w_mu, w_rho]
    if bias:
        inputs += [torch.randn(out_channels, **f64).requires_grad_(),
                   (torch.randn(out_channels, **f64) - 1).requires_grad_()]
    seed = seed_tensor(1001)

    def fn(*args):
        return BFC.bayesian_conv(*args, seed=seed, prior=PRIOR, **kwargs)

    assert torch.autograd.gradcheck(fn, tuple(inputs), eps=1e-6, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("transposed", [False, True])
def test_opcheck_conv_reparam(backend, transposed):
    gen = torch.Generator().manual_seed(9)
    f64 = dict(generator=gen, dtype=torch.float64)
    x = torch.randn(2, 4, 5, 4, **f64).requires_grad_()
    w_shape = (4, 3, 2, 3) if transposed else (6, 2, 2, 3)
    w_mu = torch.randn(w_shape, **f64).requires_grad_()
    w_rho = (torch.randn(w_shape, **f64) - 2).requires_grad_()
    b_mu = torch.randn(6, **f64).requires_grad_()
    b_rho = (torch.randn(6, **f64) - 2).requires_grad_()
    args = (x, w_mu, w_rho, b_mu, b_rho, seed_tensor(5), [2, 1], [1, 0], [1, 1], transposed,
            [1, 0] if transposed else [0, 0], 2, *PRIOR)
    result = torch.library.opcheck(torch.ops.bayes_ext.conv_reparam, args)
    assert all(v == "SUCCESS" for v in result.values()), result


# ---- freeze, KL terms, prior_dist ----------------------------------------------------------------------

def mean_kl_reference(layer):
    """(log q, log p) at w = mu, from torch.distributions, in float64."""
    q = p = 0
    for name in ("weight", "bias"):
        mu = getattr(layer, f"{name}_mu")
        if mu is None:
            continue
        mu, rho = to64(mu, getattr(layer, f"{name}_rho"))
        q = q + torch.distributions.Normal(mu, F.softplus(rho)).log_prob(mu).sum()
        if layer.prior_dist is not None:
            p = p + layer.prior_dist.log_prob(mu).sum()
        else:
            p = p + ref_log_prior_terms(mu, *layer.prior).sum()
    return q, p


@pytest.mark.parametrize("cls,kwargs,shape", [CONFIGS[1], CONFIGS[3], CONFIGS[7], CONFIGS[10], CONFIGS[12]],
                         ids=[CONFIG_IDS[i] for i in (1, 3, 7, 10, 12)])
def test_freeze_uses_means_and_mean_kl_terms(backend, cls, kwargs, shape):
    layer = make_layer(cls, kwargs)
    ref = make_nn(cls, kwargs)
    x = torch.randn(shape)
    layer(x)
    sampled_q = layer.log_variational_posterior.detach().clone()
    layer.freeze = True
    y = layer(x)
    torch.testing.assert_close(y, nn_apply(ref, x, layer.weight_mu, layer.bias_mu), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(y, layer(x), rtol=0, atol=0)  # deterministic
    q, p = mean_kl_reference(layer)
    torch.testing.assert_close(layer.log_variational_posterior.double(), q, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(layer.log_prior.double(), p, rtol=1e-5, atol=1e-3)
    assert not torch.allclose(layer.log_variational_posterior, sampled_q)  # not stale
    # forward_frozen works without the attribute too; unfreezing samples again
    layer.freeze = False
    torch.testing.assert_close(layer.forward_frozen(x), y, rtol=0, atol=0)
    assert not torch.allclose(layer(x), y)


def test_frozen_from_constructor(backend):
    layer = BayesianConv1d(2, 3, 3, freeze=True)
    x = torch.randn(2, 2, 6)
    torch.testing.assert_close(layer(x), F.conv1d(x, layer.weight_mu, layer.bias_mu), rtol=0, atol=0)


def test_kl_terms_set_every_forward(backend):
    torch.manual_seed(0)
    model = nn.Sequential(BayesianConv2d(2, 3, 3, posterior_rho_init=-2.0), nn.ReLU(),
                          BayesianConvTranspose2d(3, 2, 3, posterior_rho_init=-2.0))
    conv, tconv = model[0], model[2]
    assert conv.log_prior == 0 and conv.log_variational_posterior == 0  # BLiTZ: 0 before any forward
    x = torch.randn(2, 2, 6, 6)
    model(x)
    first = (conv.log_variational_posterior.detach().clone(), tconv.log_prior.detach().clone())
    kl = kl_divergence_from_nn(model)
    expected = sum(m.log_variational_posterior - m.log_prior for m in (conv, tconv))
    torch.testing.assert_close(kl, expected)
    assert kl.requires_grad
    model(x)
    assert not torch.equal(conv.log_variational_posterior, first[0])
    assert not torch.equal(tconv.log_prior, first[1])
    kl.backward()
    assert conv.weight_rho.grad is not None and tconv.bias_mu.grad is not None


@pytest.mark.parametrize("bias", [True, False])
def test_prior_dist(backend, monkeypatch, bias):
    dist = torch.distributions.Laplace(torch.tensor(0.0), torch.tensor(0.5))
    layer = make_layer(BayesianConv2d, dict(in_channels=2, out_channels=3, kernel_size=2, stride=2, bias=bias),
                       prior_dist=dist)
    rec = SeedRecorder(monkeypatch)
    x = torch.randn(2, 2, 6, 6, requires_grad=True)
    y = layer(x)
    w, b = rebuild(layer, rec.seeds[0])
    torch.testing.assert_close(y, F.conv2d(x, w, b, stride=2), rtol=1e-5, atol=1e-5)
    expected_p = dist.log_prob(w).sum() + (dist.log_prob(b).sum() if bias else 0)
    torch.testing.assert_close(layer.log_prior, expected_p, rtol=1e-5, atol=1e-4)
    q, _ = ref_kl_terms(layer, rec.seeds[0])
    torch.testing.assert_close(layer.log_variational_posterior.double(), q, rtol=1e-5, atol=1e-3)
    (y.sum() + layer.kl_divergence()).backward()
    assert torch.isfinite(layer.weight_rho.grad).all() and x.grad is not None
    layer.freeze = True
    layer(x)
    torch.testing.assert_close(layer.log_prior.double(), mean_kl_reference(layer)[1], rtol=1e-5, atol=1e-3)


def test_moped(backend):
    layer = BayesianConv2d(2, 3, 3)
    layer.moped_(0.2)
    torch.testing.assert_close(F.softplus(layer.weight_rho), (0.2 * layer.weight_mu.abs()).clamp_min(1e-10),
                               rtol=1e-4, atol=1e-7)


# ---- composition and training -----------------------------------------------------------------------------

@variational_estimator
class SmallConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(BayesianConv2d(1, 4, (3, 3), posterior_rho_init=-4.0), nn.ReLU(),
                                      nn.MaxPool2d(2), nn.Flatten(),
                                      BayesianLinear(4 * 3 * 3, 2, posterior_rho_init=-4.0))

    def forward(self, x):
        return self.features(x)


def test_sequential_with_linear_trains_with_sample_elbo(backend):
    torch.manual_seed(0)
    # two classes: a bright top half or a bright bottom half
    n = 32
    labels = torch.arange(n) % 2
    x = 0.3 * torch.randn(n, 1, 8, 8)
    x[labels == 0, :, :4] += 1.0
    x[labels == 1, :, 4:] += 1.0
    model = SmallConvNet()
    opt = torch.optim.Adam(model.parameters(), lr=0.03)
    criterion = nn.CrossEntropyLoss()
    losses = []
    for _ in range(25):
        opt.zero_grad()
        loss = model.sample_elbo(x, labels, criterion, sample_nbr=2, complexity_cost_weight=1e-5)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    model.freeze_()
    accuracy = (model(x).argmax(1) == labels).float().mean()
    assert accuracy > 0.9
    assert sorted(model.state_dict()) == sorted(f"features.{i}.{n}" for i in (0, 4) for n in
                                                ("weight_mu", "weight_rho", "bias_mu", "bias_rho"))


# ---- memory saved for backward ------------------------------------------------------------------------


@pytest.mark.parametrize("sample_nbr", [1, 3])
@pytest.mark.parametrize("cls,kwargs", [
    (BayesianConv2d, dict(in_channels=16, out_channels=32, kernel_size=3, padding=1)),
    (BayesianConv2d, dict(in_channels=16, out_channels=32, kernel_size=3, padding=1, bias=False)),
    (BayesianConv2d, dict(in_channels=16, out_channels=32, kernel_size=4, padding="same")),
    (BayesianConvTranspose2d, dict(in_channels=16, out_channels=32, kernel_size=3, stride=2)),
], ids=["conv", "conv-nobias", "conv-same-even", "transpose"])
def test_saved_memory_like_nn(backend, cls, kwargs, sample_nbr):
    torch.manual_seed(0)
    inputs = [torch.randn(4, 16, 12, 12, requires_grad=True) for _ in range(sample_nbr)]
    bayes = cls(**kwargs)
    plain = NN_CLASS[cls](**kwargs)
    bayes_bytes, outs = saved_storage_bytes(bayes, inputs)
    nn_bytes, _ = saved_storage_bytes(plain, inputs)
    weight_bytes = bayes.weight_mu.numel() * 4
    assert nn_bytes >= sample_nbr * 4 * 16 * 12 * 12 * 4  # nn saves its (possibly padded) input
    assert nn_bytes <= bayes_bytes <= nn_bytes + 300 * sample_nbr, (bayes_bytes, nn_bytes, weight_bytes)
    # and the saved state is enough for backward
    sum(o.sum() for o in outs).backward()
    assert bayes.weight_mu.grad is not None and inputs[0].grad is not None


# ---- constructor: BLiTZ's arguments, defaults, parameters -------------------------------------------------

BLITZ_CONV_ARGS = ["in_channels", "out_channels", "kernel_size", "groups", "stride", "padding", "dilation", "bias",
                   "prior_sigma_1", "prior_sigma_2", "prior_pi", "posterior_mu_init", "posterior_rho_init", "freeze",
                   "prior_dist"]
NN_TRANSPOSE_ARGS = ["in_channels", "out_channels", "kernel_size", "stride", "padding", "output_padding", "groups",
                     "bias", "dilation", "prior_sigma_1", "prior_sigma_2", "prior_pi", "posterior_mu_init",
                     "posterior_rho_init", "freeze", "prior_dist"]


@pytest.mark.parametrize("cls,rho_init", [(BayesianConv1d, -7.0), (BayesianConv2d, -6.0), (BayesianConv3d, -6.0)])
def test_blitz_signature_and_defaults(cls, rho_init):
    params = inspect.signature(cls.__init__).parameters
    positional = [n for n, p in params.items() if p.kind == p.POSITIONAL_OR_KEYWORD][1:]
    assert positional == BLITZ_CONV_ARGS
    defaults = {n: params[n].default for n in BLITZ_CONV_ARGS[3:]}
    assert defaults == dict(groups=1, stride=1, padding=0, dilation=1, bias=True, prior_sigma_1=0.1,
                            prior_sigma_2=0.002, prior_pi=1, posterior_mu_init=0, posterior_rho_init=rho_init,
                            freeze=False, prior_dist=None)
    torch.manual_seed(0)
    layer = cls(4, 8, 3)
    assert abs(layer.weight_rho.mean().item() - rho_init) < 0.1 and abs(layer.weight_mu.mean().item()) < 0.1
    assert (layer.prior_sigma_1, layer.prior_sigma_2, layer.prior_pi, layer.freeze) == (0.1, 0.002, 1, False)


@pytest.mark.parametrize("cls", [BayesianConvTranspose1d, BayesianConvTranspose2d, BayesianConvTranspose3d])
def test_transpose_signature_and_defaults(cls):
    params = inspect.signature(cls.__init__).parameters
    positional = [n for n, p in params.items() if p.kind == p.POSITIONAL_OR_KEYWORD][1:]
    assert positional == NN_TRANSPOSE_ARGS
    nn_params = inspect.signature(NN_CLASS[cls].__init__).parameters
    for name in NN_TRANSPOSE_ARGS[3:9]:
        assert params[name].default == nn_params[name].default, name
    assert params["posterior_rho_init"].default == -6.0 and params["prior_sigma_2"].default == 0.002


def test_blitz_argument_order_groups_before_stride():
    # BayesianConv2d(in, out, kernel, groups, stride, padding, dilation, bias)
    layer = BayesianConv2d(4, 6, (3, 3), 2, 3, 1, 2, False)
    assert (layer.groups, layer.stride, layer.padding, layer.dilation, layer.bias) == (2, (3, 3), (1, 1), (2, 2), False)
    assert layer.weight_mu.shape == (6, 2, 3, 3) and layer.bias_mu is None
    ref = nn.Conv2d(4, 6, 3, stride=3, padding=1, dilation=2, groups=2, bias=False)
    x = torch.randn(1, 4, 11, 11)
    assert layer(x).shape == ref(x).shape
    # nn.ConvTranspose2d(in, out, kernel, stride, padding, output_padding, groups, bias, dilation)
    t = BayesianConvTranspose2d(4, 6, 3, 2, 1, 1, 2, False, 1)
    assert (t.stride, t.padding, t.output_padding, t.groups, t.bias) == ((2, 2), (1, 1), (1, 1), 2, False)
    assert t.weight_mu.shape == (4, 3, 3, 3)


@pytest.mark.parametrize("cls,kwargs,shape", CONFIGS, ids=CONFIG_IDS)
def test_parameter_names_and_state_dict(cls, kwargs, shape):
    layer = make_layer(cls, kwargs)
    names = ["weight_mu", "weight_rho"] + (["bias_mu", "bias_rho"] if kwargs.get("bias", True) else [])
    assert [n for n, _ in layer.named_parameters()] == names
    assert list(layer.state_dict()) == names
    other = make_layer(cls, kwargs, posterior_mu_init=1.0)
    other.load_state_dict(layer.state_dict())
    x = torch.randn(shape)
    torch.testing.assert_close(other.forward_frozen(x), layer.forward_frozen(x), rtol=0, atol=0)
    assert layer.in_channels == kwargs["in_channels"] and layer.out_channels == kwargs["out_channels"]
    assert isinstance(layer.kernel_size, tuple) and len(layer.kernel_size) == shape.__len__() - 2
    assert cls.__name__ in repr(layer)


def test_int_and_tuple_kernel_size_agree():
    torch.manual_seed(0)
    a = BayesianConv3d(2, 3, 2)
    torch.manual_seed(0)
    b = BayesianConv3d(2, 3, (2, 2, 2))
    assert a.kernel_size == b.kernel_size == (2, 2, 2)
    torch.testing.assert_close(a.weight_mu, b.weight_mu)


def test_dtype_device_and_to_float64(backend):
    layer = BayesianConv1d(2, 3, 3, dtype=torch.float64, device="cpu")
    assert layer.weight_mu.dtype == torch.float64
    x = torch.randn(2, 2, 5, dtype=torch.float64)
    assert layer(x).dtype == torch.float64
    layer = BayesianConvTranspose1d(2, 3, 3).double()
    assert layer(x).dtype == torch.float64 and layer.log_prior.dtype == torch.float64


def test_zero_size_batch(backend):
    layer = BayesianConv2d(2, 3, 3)
    x = torch.randn(0, 2, 5, 5, requires_grad=True)
    y = layer(x)
    assert y.shape == (0, 3, 3, 3)
    (y.sum() + layer.kl_divergence()).backward()
    assert torch.isfinite(layer.weight_rho.grad).all()


# ---- argument errors --------------------------------------------------------------------------------------

@pytest.mark.parametrize("make,error,match", [
    (lambda: BayesianConv2d(0, 4, 3), ValueError, "in_channels"),
    (lambda: BayesianConv2d(4, -1, 3), ValueError, "out_channels"),
    (lambda: BayesianConv2d(2.5, 4, 3), TypeError, "in_channels"),
    (lambda: BayesianConv2d(4, 6, 3, groups=3), ValueError, "in_channels .*divisible by groups"),
    (lambda: BayesianConv2d(4, 6, 3, groups=4), ValueError, "out_channels .*divisible by groups"),
    (lambda: BayesianConv2d(4, 6, 3, groups=0), ValueError, "groups"),
    (lambda: BayesianConv2d(4, 6, (3, 3, 3)), ValueError, "kernel_size"),
    (lambda: BayesianConv2d(4, 6, 0), ValueError, "kernel_size"),
    (lambda: BayesianConv2d(4, 6, "3"), TypeError, "kernel_size"),
    (lambda: BayesianConv1d(4, 6, 3, stride=0), ValueError, "stride"),
    (lambda: BayesianConv1d(4, 6, 3, padding=-1), ValueError, "padding"),
    (lambda: BayesianConv1d(4, 6, 3, dilation=(1, 1)), ValueError, "dilation"),
    (lambda: BayesianConv2d(4, 6, 3, stride=2, padding="same"), ValueError, "padding='same'"),
    (lambda: BayesianConv2d(4, 6, 3, padding="full"), ValueError, "padding"),
    (lambda: BayesianConv2d(4, 6, 3, padding_mode="mirror"), ValueError, "padding_mode"),
    (lambda: BayesianConvTranspose2d(4, 6, 3, stride=2, output_padding=2), ValueError, "output_padding"),
    (lambda: BayesianConvTranspose2d(4, 6, 3, padding="same"), ValueError, "padding"),
    (lambda: BayesianConvTranspose2d(4, 6, 3, padding_mode="reflect"), ValueError, "padding_mode"),
    (lambda: BayesianConv2d(4, 6, 3, prior_sigma_1=0), ValueError, "prior_sigma_1"),
    (lambda: BayesianConv2d(4, 6, 3, prior_pi=2), ValueError, "prior_pi"),
])
def test_constructor_errors(make, error, match):
    with pytest.raises(error, match=match):
        make()


@pytest.mark.parametrize("x,error,match", [
    (lambda: torch.randn(2, 3, 6, 6), ValueError, "input must have 4 channels"),
    (lambda: torch.randn(4, 6), ValueError, "input must be 3-D .* or 4-D"),
    (lambda: torch.randn(1, 2, 4, 6, 6), ValueError, "input must be 3-D .* or 4-D"),
    (lambda: torch.randn(2, 4, 6, 6, dtype=torch.float64), TypeError, "input must have the dtype"),
    (lambda: torch.ones(2, 4, 6, 6, dtype=torch.int64), TypeError, "input must have the dtype"),
    (lambda: torch.randn(2, 4, 2, 6), ValueError, "input of spatial size .* too small"),
    (lambda: [[1.0]], TypeError, "input must be a torch.Tensor"),
])
@pytest.mark.parametrize("frozen", [False, True])
def test_input_errors(backend, x, error, match, frozen):
    layer = BayesianConv2d(4, 6, 3, freeze=frozen)
    with pytest.raises(error, match=match):
        layer(x())


def test_functional_errors(backend):
    x = torch.randn(2, 4, 6, 6)
    mu, rho = torch.randn(6, 4, 3, 3), torch.randn(6, 4, 3, 3)
    seed = seed_tensor(1)
    cases = [
        (dict(weight_mu=torch.randn(6, 4)), ValueError, "weight_mu must be 3-, 4- or 5-D"),
        (dict(weight_rho=torch.randn(6, 4, 3, 2)), ValueError, "weight_rho must have the shape of weight_mu"),
        (dict(weight_rho=rho.double()), TypeError, "weight_rho must have the dtype of weight_mu"),
        (dict(weight_mu=mu.long(), weight_rho=rho.long()), TypeError, "weight_mu must be"),
        (dict(bias_mu=torch.randn(6)), ValueError, "bias_mu and bias_rho"),
        (dict(bias_mu=torch.randn(5), bias_rho=torch.randn(5)), ValueError, r"bias_mu must have shape \(6,\)"),
        (dict(bias_mu=torch.randn(6).double(), bias_rho=torch.randn(6).double()), TypeError,
         "bias_mu must have the dtype"),
        (dict(seed=torch.tensor(1.0)), TypeError, "seed"),
        (dict(groups=4), ValueError, "divisible by groups"),
        (dict(groups=2), ValueError, "input must have 8 channels"),
        (dict(stride=(1, 2, 3)), ValueError, "stride"),
        (dict(output_padding=1), ValueError, "output_padding"),
        (dict(transposed=1), TypeError, "transposed"),
        (dict(transposed=True, padding="same"), ValueError, "padding"),
        (dict(prior=(0.5, -1.0, 0.1)), ValueError, "prior_sigma1"),
        (dict(x=torch.randn(2, 4, 6, 6, dtype=torch.float64)), TypeError, "input must have the dtype"),
    ]
    for overrides, error, match in cases:
        args = dict(x=x, weight_mu=mu, weight_rho=rho, seed=seed)
        args.update(overrides)
        with pytest.raises(error, match=match):
            BFC.bayesian_conv(**args)


# ---- CUDA (skipped without a GPU) ---------------------------------------------------------------------------

@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")
@pytest.mark.parametrize("cls,kwargs,shape", [CONFIGS[3], CONFIGS[4], CONFIGS[9], CONFIGS[12]],
                         ids=[CONFIG_IDS[i] for i in (3, 4, 9, 12)])
def test_cuda_matches_cpu(backend, cls, kwargs, shape):
    """The same seed gives the same sample on CPU and GPU (seed on the CPU, parameters on the GPU):
    outputs, KL terms and every gradient agree (float64)."""
    if backend == "compiled" and not torch._C._dispatch_has_kernel_for_dispatch_key("bayes_ext::sample_weight",
                                                                                      "CUDA"):
        pytest.skip("the compiled extension was built without CUDA kernels")
    layer = make_layer(cls, kwargs, dtype=torch.float64)
    x = torch.randn(shape, dtype=torch.float64)
    results = {}
    for device in ("cpu", "cuda"):
        layer.to(device)
        layer.zero_grad()
        xd = x.to(device).requires_grad_(True)
        torch.manual_seed(21)
        y = layer(xd)
        (y.pow(2).sum() + 0.5 * layer.kl_divergence()).backward()
        results[device] = [y, layer.log_variational_posterior, layer.log_prior, xd.grad] + [
            p.grad for p in layer.parameters()]
    for a, b in zip(results["cpu"], results["cuda"]):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-9, atol=1e-9)


# ---- autocast, torch.compile -----------------------------------------------------------------------------

def test_autocast_runs_in_autocast_dtype_with_fp32_kl(backend, monkeypatch):
    """Under CPU autocast the Bayesian convolution runs in bfloat16 like nn.Conv2d (float32 inputs are
    cast down too), the weights are sampled from the float32 parameters and the KL stays float32."""
    torch.manual_seed(0)
    first = nn.Conv2d(2, 3, 3)
    layer = make_layer(BayesianConv2d, dict(in_channels=3, out_channels=4, kernel_size=2))
    tlayer = make_layer(BayesianConvTranspose2d, dict(in_channels=3, out_channels=2, kernel_size=2, stride=2))
    rec = SeedRecorder(monkeypatch)
    x = torch.randn(2, 2, 7, 7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = first(x)
        assert h.dtype == torch.bfloat16
        y = layer(h)
        kl = layer.kl_divergence()
        y32 = layer(h.float())  # a float32 activation is cast down, as nn.Conv2d does
        z = tlayer(h, output_size=(10, 10))
        frozen = layer.forward_frozen(h)
        reference = nn.Conv2d(3, 4, 2)(h)
    assert y.dtype == y32.dtype == z.dtype == frozen.dtype == reference.dtype == torch.bfloat16
    assert kl.dtype == torch.float32 and layer.weight_mu.dtype == torch.float32
    w, b = rebuild(layer, rec.seeds[0])
    torch.testing.assert_close(y, F.conv2d(h, w.bfloat16(), b.bfloat16()))
    (y.float().sum() + z.float().sum() + kl).backward()
    assert first.weight.grad is not None
    assert layer.weight_rho.grad.dtype == torch.float32 and torch.isfinite(layer.weight_rho.grad).all()
    # without the KL, grad weight_mu is the bf16 convolution's weight gradient, carried to float32
    layer.zero_grad()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(h.detach()).float().sum().backward()
    w, b = rebuild(layer, rec.seeds[-1])
    w_ref = w.detach().bfloat16().requires_grad_()
    F.conv2d(h.detach(), w_ref, b.bfloat16()).float().sum().backward()
    torch.testing.assert_close(layer.weight_mu.grad, w_ref.grad.float())


@needs_torch((2, 5), "torch 2.4's dynamo cannot set an attribute (the KL terms) on a module inside "
                         "nn.Sequential / nn.ModuleList")
def test_torch_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    model = nn.Sequential(BayesianConv2d(1, 3, 3, posterior_rho_init=-2.0), nn.ReLU(),
                          BayesianConvTranspose2d(3, 2, 2, stride=2, posterior_rho_init=-2.0))
    x = torch.randn(2, 1, 6, 6)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    outs, grads = [], []
    for fn in (compiled, model):
        model.zero_grad()
        torch.manual_seed(5)
        y = fn(x)
        (y.sum() + kl_divergence_from_nn(model)).backward()
        outs.append(y)
        grads.append([p.grad.clone() for p in model.parameters()])
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_lrt_channels_last_input_keeps_its_format_and_its_noise(backend):
    """The LRT output noise is drawn in logical (NCHW) order whatever x's memory format, and a
    channels_last input gives channels_last y and std, the strides the op's fake kernel reports."""
    torch.manual_seed(0)
    layer = BayesianConv2d(3, 4, 3, padding=1, estimator="lrt", posterior_rho_init=-2.0)
    x = torch.randn(2, 3, 6, 5)
    outs = []
    for inp in (x, x.contiguous(memory_format=torch.channels_last)):
        inp = inp.detach().requires_grad_(True)
        torch.manual_seed(7)
        y = layer(inp)
        y.square().sum().backward()
        outs.append((y, inp.grad, layer.weight_rho.grad.clone()))
        layer.zero_grad(set_to_none=True)
    (y, gx, grho), (y_cl, gx_cl, grho_cl) = outs
    assert y_cl.is_contiguous(memory_format=torch.channels_last)
    with torch._subclasses.fake_tensor.FakeTensorMode(allow_non_fake_inputs=True) as mode:
        fake_x = mode.from_tensor(x.contiguous(memory_format=torch.channels_last))
        fake_y = layer(fake_x)
    assert fake_y.stride() == y_cl.stride()
    torch.testing.assert_close(y_cl, y, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gx_cl, gx, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grho_cl, grho, rtol=1e-5, atol=1e-5)
