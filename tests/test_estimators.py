"""estimator='reparam' | 'lrt' | 'flipout' and kl='mc' | 'closed_form' on the linear and conv layers.

- the outputs' Monte Carlo moments are the weight-noise model's (mean x mu^T + b_mu, variance
  x^2 (sigma^2)^T + sigma_b^2 per output);
- values and gradients equal a plain-torch reference built from the Philox stream of the same seed;
- float64 gradcheck of every hand-written backward, finite gradients where the LRT variance is 0;
- lrt and flipout give lower-variance mu-gradients than reparam at batch 64;
- KL modes (closed form = torch.distributions.kl_divergence, MC on the weight's stream for lrt with
  a mixture prior), torch.compile(fullgraph=True) = eager, errors, freeze, memory saved for backward.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bayes_ext import functional as BF
from bayes_ext import functional_conv_estimators as BFCE
from bayes_ext import functional_estimators as BFE
from bayes_ext.losses import kl_divergence_from_nn
from bayes_ext.modules import (BayesianConv1d, BayesianConv2d, BayesianConvTranspose1d, BayesianConvTranspose2d,
                               BayesianLinear)
from helpers import OpsRecorder, SeedRecorder, assert_row_blocks_match_whole, posterior_7x9, ref_sample, seed_tensor

MIXTURE = (0.5, 1.0, 0.3)
F64 = dict(dtype=torch.float64)


def _params(*shapes, gen_seed=0, rho_shift=-1.0):
    """mu, rho pairs (rho around rho_shift) as leaf float64 tensors that require grad."""
    gen = torch.Generator().manual_seed(gen_seed)
    out = []
    for i, shape in enumerate(shapes):
        t = torch.randn(shape, generator=gen, **F64) * 0.5 + (rho_shift if i % 2 else 0.0)
        out.append(t.requires_grad_())
    return out


def _signs(ops, shape, seed, offset, dtype=torch.float64):
    return torch.where(ops.philox_normal(torch.empty(shape, dtype=dtype), seed, offset) >= 0, 1.0, -1.0).to(dtype)


# ---- plain-torch references on the same Philox streams -----------------------------------------------

def ref_linear_lrt(ops, x, mu, rho, b_mu, b_rho, seed):
    mean = F.linear(x, mu, b_mu)
    std = F.linear(x * x, F.softplus(rho) ** 2, F.softplus(b_rho) ** 2).sqrt()
    return mean + std * ops.philox_normal(mean.detach(), seed, 2)


def ref_flipout(ops, x, mu, rho, b_mu, b_rho, seed, prior, conv=None):
    """(y, log_q, log_p): y = f(x, mu) + b + f(x * S, dW) * R with f = F.linear or a convolution."""
    f = conv or (lambda inp, w, b=None: F.linear(inp, w, b))
    eps_w, eps_b = ops.philox_normal(mu.detach(), seed, 0), ops.philox_normal(b_mu.detach(), seed, 1)
    _, log_q, log_p = ref_sample(mu, rho, eps_w, prior)
    b, log_q_b, log_p_b = ref_sample(b_mu, b_rho, eps_b, prior)
    pert = f(x * _signs(ops, x.shape, seed, 3), F.softplus(rho) * eps_w)
    y = f(x, mu, b) + pert * _signs(ops, pert.shape, seed, 4)
    return y, log_q + log_q_b, log_p + log_p_b


def ref_conv_lrt(ops, x, mu, rho, b_mu, b_rho, seed, conv):
    mean = conv(x, mu, b_mu)
    std = conv(x * x, F.softplus(rho) ** 2, F.softplus(b_rho) ** 2).sqrt()
    return mean + std * ops.philox_normal(mean.detach(), seed, 2)


def conv1d(inp, w, b=None):
    return F.conv1d(inp, w, b, padding=1)


def conv_t1d(inp, w, b=None):
    return F.conv_transpose1d(inp, w, b, stride=2)


# The functional forms under test, with the reference each must match: name -> (op, reference, shapes)
LINEAR_SHAPES = ((3, 4), (3, 4), (3,), (3,))  # mu, rho, b_mu, b_rho; x: (5, 4)
CONV_SHAPES = ((3, 2, 3), (3, 2, 3), (3,), (3,))  # x: (2, 2, 6)
CONV_T_SHAPES = ((2, 3, 3), (2, 3, 3), (3,), (3,))


def _case(name):
    if name == "linear_lrt":
        return (lambda x, *p, seed: (BFE.linear_lrt(x, *p, seed=seed),),
                lambda ops, x, *p, seed: (ref_linear_lrt(ops, x, *p, seed),), LINEAR_SHAPES, (5, 4))
    if name == "linear_flipout":
        return (lambda x, *p, seed: BFE.linear_flipout(x, *p, seed=seed, prior=MIXTURE),
                lambda ops, x, *p, seed: ref_flipout(ops, x, *p, seed, MIXTURE), LINEAR_SHAPES, (5, 4))
    if name == "conv_lrt":
        return (lambda x, *p, seed: (BFCE.conv_lrt(x, *p, seed=seed, padding=1),),
                lambda ops, x, *p, seed: (ref_conv_lrt(ops, x, *p, seed, conv1d),), CONV_SHAPES, (2, 2, 6))
    if name == "conv_flipout":
        return (lambda x, *p, seed: BFCE.conv_flipout(x, *p, seed=seed, padding=1, prior=MIXTURE),
                lambda ops, x, *p, seed: ref_flipout(ops, x, *p, seed, MIXTURE, conv1d), CONV_SHAPES, (2, 2, 6))
    if name == "conv_t_lrt":
        return (lambda x, *p, seed: (BFCE.conv_lrt(x, *p, seed=seed, stride=2, transposed=True),),
                lambda ops, x, *p, seed: (ref_conv_lrt(ops, x, *p, seed, conv_t1d),), CONV_T_SHAPES, (2, 2, 4))
    if name == "conv_t_flipout":
        return (lambda x, *p, seed: BFCE.conv_flipout(x, *p, seed=seed, stride=2, transposed=True, prior=MIXTURE),
                lambda ops, x, *p, seed: ref_flipout(ops, x, *p, seed, MIXTURE, conv_t1d), CONV_T_SHAPES,
                (2, 2, 4))
    raise KeyError(name)


CASES = ["linear_lrt", "linear_flipout", "conv_lrt", "conv_flipout", "conv_t_lrt", "conv_t_flipout"]


@pytest.mark.parametrize("name", CASES)
def test_values_and_gradients_match_the_reference(ops, name):
    op, ref, shapes, x_shape = _case(name)
    params = _params(*shapes)
    x = torch.randn(x_shape, **F64).requires_grad_()
    seed = seed_tensor(12345)
    out, expected = op(x, *params, seed=seed), ref(ops, x, *params, seed=seed)
    for a, b in zip(out, expected):
        torch.testing.assert_close(a, b)
    # a loss using every output, so the KL terms' gradients are compared too
    weights = [torch.randn_like(o) for o in out]

    def grads(outputs):
        loss = sum((o * w).sum() for o, w in zip(outputs, weights))
        return torch.autograd.grad(loss, [x] + params)

    for a, b in zip(grads(out), grads(expected)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", CASES)
def test_gradcheck(backend, name):
    op, _, shapes, x_shape = _case(name)
    params = _params(*shapes, gen_seed=1)
    x = torch.randn(x_shape, **F64).requires_grad_()
    seed = seed_tensor(7)
    assert torch.autograd.gradcheck(lambda *a: op(*a, seed=seed), (x, *params))


@pytest.mark.parametrize("op", ["linear_lrt", "linear_flipout", "conv_lrt", "conv_flipout"])
def test_opcheck(backend, op):
    p = _params(*(LINEAR_SHAPES if op.startswith("linear") else CONV_SHAPES), gen_seed=4)
    x = torch.randn((3, 4) if op.startswith("linear") else (2, 2, 5), **F64).requires_grad_()
    args = (x, *p, seed_tensor(3))
    if op.startswith("conv"):
        args += ([1], [1], [1], False, [0], 1)
    if op.endswith("flipout"):
        args += MIXTURE
    if op.endswith("lrt"):
        args += (0.3,)  # prior_sigma: the closed-form KL fused into the weight pass
    result = torch.library.opcheck(getattr(torch.ops.bayes_ext, op), args)
    assert all(v == "SUCCESS" for v in result.values()), result


@pytest.mark.parametrize("bias", [True, False])
def test_lrt_with_fused_kl_equals_lrt_plus_closed_form_kl(backend, bias):
    """linear_lrt_with_kl: the same output as linear_lrt, the KL of closed_form_kl, and the
    gradients of their sum (the KL's folded into the backward's fused weight pass)."""
    from bayes_ext.functional_embedding import closed_form_kl
    params = tuple(p.detach() for p in _params(*LINEAR_SHAPES, gen_seed=8))
    if not bias:
        params = params[:2] + (None, None)
    x = torch.randn(5, 4, **F64)
    seed = seed_tensor(12)
    g = torch.randn(5, 3, **F64)
    a = [p.clone().requires_grad_() if p is not None else None for p in params]
    y, kl = BFE.linear_lrt_with_kl(x, *a, seed=seed, prior_sigma=0.4)
    ((y * g).sum() + 0.7 * kl).backward()
    b = [p.clone().requires_grad_() if p is not None else None for p in params]
    y2 = BFE.linear_lrt(x, *b, seed=seed)
    kl2 = sum(closed_form_kl(m, r, 0.4) for m, r in ((b[0], b[1]), (b[2], b[3])) if m is not None)
    ((y2 * g).sum() + 0.7 * kl2).backward()
    torch.testing.assert_close(y, y2)
    torch.testing.assert_close(kl, kl2)
    for p, q in zip(a, b):
        if p is not None:
            torch.testing.assert_close(p.grad, q.grad)
    fn = lambda *t: BFE.linear_lrt_with_kl(*t, seed=seed, prior_sigma=0.4)
    inputs = [x.clone().requires_grad_()] + [p.clone().requires_grad_() if p is not None else None for p in params]
    assert torch.autograd.gradcheck(fn, tuple(inputs))
    with pytest.raises(ValueError, match="prior_sigma"):
        BFE.linear_lrt_with_kl(x, *params, seed=seed, prior_sigma=0.0)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_lrt_layer_uses_the_fused_kl(backend, monkeypatch, kind):
    """With a single Gaussian prior the lrt layer's KL comes out of the op (no separate KL pass),
    with the value and gradients of closed_form_kl."""
    from bayes_ext.functional_embedding import closed_form_kl
    import bayes_ext.functional_embedding as BFEmb
    calls = []
    monkeypatch.setattr(BFEmb, "closed_form_kl", lambda *a, **k: calls.append(1) or closed_form_kl(*a, **k))
    torch.manual_seed(0)
    kwargs = dict(estimator="lrt", prior_sigma_1=0.3, posterior_rho_init=-2.0, dtype=torch.float64)
    layer = BayesianLinear(4, 5, **kwargs) if kind == "linear" else BayesianConv1d(2, 3, 3, **kwargs)
    x = torch.randn((3, 4) if kind == "linear" else (2, 2, 6), dtype=torch.float64)
    layer(x)
    assert calls == []
    kl = layer.kl_divergence()
    kl.backward()
    grads = [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    expected = sum(closed_form_kl(m, r, 0.3) for m, r in ((layer.weight_mu, layer.weight_rho),
                                                          (layer.bias_mu, layer.bias_rho)))
    expected.backward()
    torch.testing.assert_close(kl, expected)
    for g, p in zip(grads, layer.parameters()):
        torch.testing.assert_close(g, p.grad)


def test_leading_dimensions_are_flattened(backend):
    """(B, T, I) inputs: the same values and gradients as (B * T, I), noise included."""
    params = _params(*LINEAR_SHAPES, gen_seed=5)
    x = torch.randn(2, 3, 4, **F64).requires_grad_()
    for op in (BFE.linear_lrt, BFE.linear_flipout):
        y3 = op(x, *params, seed=seed_tensor(9))
        y2 = op(x.reshape(6, 4), *params, seed=seed_tensor(9))
        y3, y2 = (y if isinstance(y, torch.Tensor) else y[0] for y in (y3, y2))
        torch.testing.assert_close(y3.reshape(6, 3), y2)
        for a, b in zip(torch.autograd.grad(y3.sum(), [x] + params), torch.autograd.grad(y2.sum(), [x] + params)):
            torch.testing.assert_close(a, b)


@pytest.mark.parametrize("name", CASES)
def test_output_moments_match_the_weight_noise_model(backend, name):
    """Per output: E[y] = f(x, mu) + b_mu, Var[y] = f(x^2, sigma^2) + sigma_b^2, as for y = f(x, W) + b."""
    op, _, shapes, x_shape = _case(name)
    mu, rho, b_mu, b_rho = (p.detach() for p in _params(*shapes, gen_seed=2))
    x = torch.randn(x_shape, **F64)
    n = 1500
    with torch.no_grad():
        draws = torch.stack([op(x, mu, rho, b_mu, b_rho, seed=seed_tensor(s))[0] for s in range(n)])
    f = {"linear": lambda i, w, b: F.linear(i, w, b), "conv": conv1d, "conv_t": conv_t1d}[name.rsplit("_", 1)[0]]
    mean, var = f(x, mu, b_mu), f(x * x, F.softplus(rho) ** 2, F.softplus(b_rho) ** 2)
    torch.testing.assert_close(draws.mean(0), mean, atol=4.5 * (var / n).sqrt().max().item(), rtol=0)
    torch.testing.assert_close(draws.var(0), var, rtol=0.2, atol=1e-12)


def test_flipout_perturbation_differs_per_example(backend):
    """The point of the signs: two copies of one input in a batch get different noise (one dW)."""
    mu, rho, b_mu, b_rho = _params(*LINEAR_SHAPES)
    x = torch.randn(1, 4, **F64).expand(2, 4)
    y = BFE.linear_flipout(x, mu, rho, seed=seed_tensor(3))[0]
    assert not torch.allclose(y[0], y[1])


@pytest.mark.parametrize("with_bias", [False, True])
def test_lrt_gradient_finite_where_the_variance_is_zero(backend, with_bias):
    mu, rho, b_mu, b_rho = _params(*LINEAR_SHAPES)
    bias = (b_mu, b_rho) if with_bias else (None, None)
    x = torch.randn(3, 4, **F64)
    x[1] = 0  # without a bias: var = 0 on this row, where sqrt has no derivative
    x.requires_grad_()
    y = BFE.linear_lrt(x, mu, rho, *bias, seed=seed_tensor(5))
    grads = torch.autograd.grad(y.sum(), [x, mu, rho])
    assert all(torch.isfinite(g).all() for g in grads)
    xc = torch.randn(2, 2, 6, **F64)
    xc[0] = 0
    xc.requires_grad_()
    cmu, crho, cb_mu, cb_rho = _params(*CONV_SHAPES)
    cbias = (cb_mu, cb_rho) if with_bias else (None, None)
    yc = BFCE.conv_lrt(xc, cmu, crho, *cbias, seed=seed_tensor(5), padding=1)
    assert all(torch.isfinite(g).all() for g in torch.autograd.grad(yc.sum(), [xc, cmu, crho]))


# ---- the layers ---------------------------------------------------------------------------------------

def test_gradient_variance_lower_than_reparam_at_batch_64(backend):
    x = torch.randn(64, 6, generator=torch.Generator().manual_seed(1))
    target = torch.randn(64, 4, generator=torch.Generator().manual_seed(2))

    def grad_variance(estimator):
        torch.manual_seed(0)
        lin = BayesianLinear(6, 4, posterior_rho_init=-1.0, estimator=estimator)
        grads = []
        for s in range(200):
            torch.manual_seed(100 + s)
            lin.zero_grad()
            F.mse_loss(lin(x), target).backward()
            grads.append(lin.weight_mu.grad.clone())
        return torch.stack(grads).var(0).mean()

    reparam = grad_variance("reparam")
    assert grad_variance("lrt") < 0.5 * reparam
    assert grad_variance("flipout") < 0.5 * reparam


LAYERS = [
    lambda **kw: BayesianLinear(4, 3, posterior_rho_init=-2.0, **kw),
    lambda **kw: BayesianConv1d(2, 3, 3, padding=1, **kw),
    lambda **kw: BayesianConv2d(2, 3, 2, **kw),
    lambda **kw: BayesianConvTranspose2d(2, 3, 2, stride=2, **kw),
]
LAYER_INPUTS = [(5, 4), (2, 2, 6), (2, 2, 4, 4), (2, 2, 3, 3)]


@pytest.mark.parametrize("estimator", ["reparam", "lrt", "flipout"])
@pytest.mark.parametrize("layer_index", range(len(LAYERS)))
def test_closed_form_kl_is_torch_distributions_kl(backend, estimator, layer_index):
    for prior in (dict(prior_sigma_1=0.5), dict(prior_dist=torch.distributions.Normal(0.1, 0.7))):
        torch.manual_seed(0)
        layer = LAYERS[layer_index](estimator=estimator, kl="closed_form", **prior)
        y = layer(torch.randn(LAYER_INPUTS[layer_index]))
        p = prior.get("prior_dist", torch.distributions.Normal(0.0, 0.5))
        expected = sum(torch.distributions.kl_divergence(torch.distributions.Normal(m, F.softplus(r)), p).sum()
                       for m, r in ((layer.weight_mu, layer.weight_rho), (layer.bias_mu, layer.bias_rho)))
        torch.testing.assert_close(layer.log_variational_posterior, expected)
        assert float(layer.log_prior) == 0.0
        (y.sum() + layer.kl_divergence()).backward()
        assert all(torch.isfinite(q.grad).all() for q in layer.parameters())


@pytest.mark.parametrize("layer_index", range(len(LAYERS)))
def test_lrt_with_a_mixture_prior_uses_the_mc_kl_of_the_weights_stream(backend, ops, monkeypatch, layer_index):
    seeds = SeedRecorder(monkeypatch)
    torch.manual_seed(0)
    layer = LAYERS[layer_index](estimator="lrt", prior_pi=0.5)
    layer(torch.randn(LAYER_INPUTS[layer_index]))
    seed = seeds.seeds[-1]
    log_q = log_p = 0
    for offset, (mu, rho) in enumerate(((layer.weight_mu, layer.weight_rho), (layer.bias_mu, layer.bias_rho))):
        _, q, p = ops.sample_weight(mu.detach(), rho.detach(), seed, offset, *layer.prior)
        log_q, log_p = log_q + q, log_p + p
    torch.testing.assert_close(layer.log_variational_posterior, log_q)
    torch.testing.assert_close(layer.log_prior, log_p)
    layer.kl_divergence().backward()  # gradients through sample_weight's autograd
    assert layer.weight_rho.grad is not None and layer.weight_rho.grad.abs().sum() > 0


@pytest.mark.parametrize("layer_index", range(len(LAYERS)))
def test_flipout_kl_terms_are_those_of_its_weight_sample(backend, ops, monkeypatch, layer_index):
    """mc: log q / log p of W = mu + dW (stream 0) and b (stream 1), also with a prior_dist."""
    seeds = SeedRecorder(monkeypatch)
    laplace = torch.distributions.Laplace(0.0, 0.2)
    for prior_dist in (None, laplace):
        torch.manual_seed(0)
        layer = LAYERS[layer_index](estimator="flipout", prior_pi=0.5, prior_dist=prior_dist)
        layer(torch.randn(LAYER_INPUTS[layer_index]))
        seed, log_q, log_p = seeds.seeds[-1], 0, 0
        for offset, (mu, rho) in enumerate(((layer.weight_mu, layer.weight_rho), (layer.bias_mu, layer.bias_rho))):
            w, q, p = ops.sample_weight(mu.detach(), rho.detach(), seed, offset, *layer.prior)
            log_q, log_p = log_q + q, log_p + (p if prior_dist is None else laplace.log_prob(w).sum())
        torch.testing.assert_close(layer.log_variational_posterior, log_q)
        torch.testing.assert_close(layer.log_prior, log_p)


@pytest.mark.parametrize("estimator", ["lrt", "flipout"])
@pytest.mark.parametrize("layer_index", range(len(LAYERS)))
def test_freeze_is_the_mean_forward(backend, estimator, layer_index):
    torch.manual_seed(0)
    layer = LAYERS[layer_index](estimator=estimator, prior_pi=0.5)
    reference = LAYERS[layer_index](prior_pi=0.5)
    reference.load_state_dict(layer.state_dict())
    x = torch.randn(LAYER_INPUTS[layer_index])
    for m in (layer, reference):
        m.freeze = True
    torch.testing.assert_close(layer(x), reference(x))
    torch.testing.assert_close(layer.forward_frozen(x), reference.forward_frozen(x))
    torch.testing.assert_close(layer.log_variational_posterior, reference.log_variational_posterior)
    torch.testing.assert_close(layer.log_prior, reference.log_prior)
    layer.freeze = False
    assert not torch.equal(layer(x), reference(x))


def test_bad_arguments():
    for make in LAYERS + [lambda **kw: BayesianConvTranspose1d(2, 3, 3, **kw)]:
        with pytest.raises(ValueError, match="estimator"):
            make(estimator="local")
        with pytest.raises(ValueError, match="estimator"):
            make(estimator=None)
        with pytest.raises(ValueError, match="kl"):
            make(kl="exact")
        with pytest.raises(ValueError, match="single Gaussian prior"):
            make(kl="closed_form", prior_pi=0.5)
        with pytest.raises(ValueError, match="Normal prior_dist"):
            make(kl="closed_form", prior_dist=torch.distributions.Laplace(0.0, 1.0))
        make(estimator="lrt", prior_pi=0.5)  # fine: MC KL on the weight's stream
    with pytest.raises(ValueError, match="features"):
        BFE.linear_lrt(torch.randn(2, 5, **F64), *_params(*LINEAR_SHAPES))
    with pytest.raises(TypeError, match="seed"):
        BFE.linear_flipout(torch.randn(2, 4, **F64), *_params(*LINEAR_SHAPES), seed=torch.tensor([1.0]))
    with pytest.raises(ValueError, match="channels"):
        BFCE.conv_lrt(torch.randn(2, 3, 6, **F64), *_params(*CONV_SHAPES))
    assert "estimator='flipout', kl='closed_form'" in repr(BayesianLinear(2, 2, estimator="flipout",
                                                                         kl="closed_form"))


def test_only_batch_sized_tensors_are_saved_for_backward(backend):
    """Beside the parameters and the seed, lrt keeps x and its std (B x O), flipout only x: the
    noise (eps, dW, the signs) is regenerated in backward."""
    torch.manual_seed(0)
    mu, rho, b_mu, b_rho = (nn.Parameter(t) for t in (torch.randn(256, 128), torch.randn(256, 128) - 3,
                                                      torch.randn(256), torch.randn(256) - 3))
    x = torch.randn(64, 128, requires_grad=True)
    own = {t.data_ptr() for t in (mu, rho, b_mu, b_rho, x)}
    for op, extra in ((BFE.linear_lrt, {(64, 256)}), (BFE.linear_flipout, set())):
        saved = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
            y = op(x, mu, rho, b_mu, b_rho)
        new = {tuple(t.shape) for t in saved if t.data_ptr() not in own and t.numel() > 1}
        assert saved and new <= extra, (op, new)
        (y if isinstance(y, torch.Tensor) else y[0]).sum().backward()


@pytest.mark.parametrize("blocks", [False, True], ids=["whole", "row_blocks"])
@pytest.mark.parametrize("estimator", ["lrt", "flipout"])
def test_autocast_bf16(backend, estimator, blocks, monkeypatch):
    if blocks:  # a block per row of the linear weight: the blocked GEMMs take bf16 x and fp32 results
        for name in ("BLOCK_ELEMENTS", "FALLBACK_BLOCK_ELEMENTS", "LRT_BLOCK_ELEMENTS"):
            monkeypatch.setattr(BF, name, 9)
    torch.manual_seed(0)
    lin = BayesianLinear(8, 4, estimator=estimator, posterior_rho_init=-3.0)
    conv = BayesianConv1d(2, 3, 3, estimator=estimator)
    x, xc = torch.randn(5, 8), torch.randn(2, 2, 6)
    for layer, inp in ((lin, x), (conv, xc)):
        torch.manual_seed(1)
        reference = layer(inp)
        torch.manual_seed(1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(inp)
        assert y.dtype == torch.bfloat16 and layer.log_variational_posterior.dtype == torch.float32
        torch.testing.assert_close(y.float(), reference, atol=0.1, rtol=0.05)
        y.float().sum().backward()
        assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in layer.parameters())


# ---- torch.compile --------------------------------------------------------------------------------------

class Mixed(nn.Module):
    """Every estimator and KL mode of the linear and conv layers in one small model."""

    def __init__(self):
        super().__init__()
        self.c1 = BayesianConv1d(2, 3, 3, estimator="lrt", prior_pi=0.5)  # MC KL on the weight's stream
        self.c2 = BayesianConv1d(3, 3, 3, estimator="flipout", kl="closed_form")
        self.l1 = BayesianLinear(12, 8, estimator="flipout")
        self.l2 = BayesianLinear(8, 2, estimator="lrt")  # closed-form KL

    def forward(self, x):  # (B, 2, 8)
        h = torch.tanh(self.c2(torch.tanh(self.c1(x))))
        return self.l2(torch.tanh(self.l1(h.flatten(1))))


def _step(model, x, seed):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    y = model(x)
    loss = y.pow(2).mean() + 1e-3 * kl_divergence_from_nn(model)
    loss.backward()
    grads = {n.removeprefix("_orig_mod."): p.grad.clone() for n, p in model.named_parameters()}
    return y.detach(), loss.detach(), grads


def test_compile_fullgraph_matches_eager(backend):
    torch.manual_seed(0)
    model, x = Mixed().train(), torch.randn(3, 2, 8)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(model)(x)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    for seed in (1, 2):
        y_c, loss_c, grads_c = _step(compiled, x, seed)
        y_e, loss_e, grads_e = _step(model, x, seed)
        torch.testing.assert_close(y_c, y_e, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(loss_c, loss_e, atol=1e-6, rtol=1e-5)
        for name in grads_e:
            torch.testing.assert_close(grads_c[name], grads_e[name], atol=1e-6, rtol=1e-5, msg=name)
    torch._dynamo.reset()


def test_lrt_mixture_prior_kl_never_writes_the_weight(backend, monkeypatch):
    """lrt with a scale-mixture prior: the MC KL of the weight's own stream comes from sample_kl
    (one pass, no O x I sample written), equal to sample_weight's terms."""
    torch.manual_seed(0)
    lin = BayesianLinear(6, 4, estimator="lrt", prior_pi=0.5, posterior_rho_init=-2.0)
    recorder = OpsRecorder(monkeypatch)
    real_ops = recorder.real
    x = torch.randn(3, 6)
    torch.manual_seed(1)
    lin(x)
    assert "sample_kl" in recorder.calls and "sample_weight" not in recorder.calls
    torch.manual_seed(1)
    seed = BF.draw_seed()
    expected_q = expected_p = 0
    for offset, (mu, rho) in enumerate(((lin.weight_mu, lin.weight_rho), (lin.bias_mu, lin.bias_rho))):
        _, q, p = real_ops.sample_weight(mu, rho, seed, offset, *lin.prior)
        expected_q, expected_p = expected_q + q, expected_p + p
    torch.testing.assert_close(lin.log_variational_posterior, expected_q)
    torch.testing.assert_close(lin.log_prior, expected_p)


@pytest.mark.parametrize("need_x", [True, False])
def test_flipout_row_blocks_give_the_whole_weights_values_and_gradients(backend, monkeypatch, need_x):
    """A large CPU weight's dW is regenerated block by block of rows (forward and backward), each
    block with its noise in the whole weight: output, KL terms and gradients equal one block's."""
    params = posterior_7x9(5)
    x = torch.randn(4, 3, 9, dtype=torch.float64, requires_grad=need_x)
    g = torch.randn(4, 3, 7, dtype=torch.float64)

    def run():
        y, log_q, log_p = BFE.linear_flipout(x, *params, seed=seed_tensor(13), prior=(0.5, 0.3, 1.5))
        return (y, log_q, log_p), (y * g).sum() + 0.3 * log_q - 0.7 * log_p
    assert_row_blocks_match_whole(monkeypatch, params[0], run, [t for t in (x,) + params if t.requires_grad])
