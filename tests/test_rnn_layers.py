"""BayesianLSTM, BayesianGRU and the BayesianRNN base: parameters and layouts, the forward against a
Python-loop reference on weights rebuilt from the seed, gradients, freeze, hidden state, bias=False,
peephole, posterior sharpening, one sample per call, gradcheck, BLiTZ checkpoints."""
import inspect

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bayes_ext
from bayes_ext import _backend
from bayes_ext import functional as BF
from bayes_ext.modules import BayesianGRU, BayesianLinear, BayesianLSTM, BayesianModule, BayesianRNN
from bayes_ext.utils import load_blitz_state_dict
from bayes_ext.utils import variational_estimator
from helpers import SeedRecorder, ref_sample

try:
    import blitz.modules as blitz_modules
except Exception:  # pragma: no cover - BLiTZ is optional
    blitz_modules = None

needs_blitz = pytest.mark.skipif(blitz_modules is None, reason="blitz-bayesian-pytorch is not installed")
NAMES = ("weight_ih", "weight_hh", "bias")
LAYERS = {"lstm": BayesianLSTM, "gru": BayesianGRU}


def make(kind, in_f=3, hidden=4, **kwargs):
    torch.manual_seed(1)
    kwargs.setdefault("posterior_rho_init", -2.0)
    return LAYERS[kind](in_f, hidden, **kwargs)


def pairs(layer):
    for name in NAMES:
        mu = getattr(layer, f"{name}_mu")
        if mu is not None:
            yield name, mu, getattr(layer, f"{name}_rho")


def rebuilt(layer, seed, dtype=None):
    """{name: W} of the forward that used `seed` (offsets 0, 1, 2), differentiable in mu and rho."""
    ops, out = _backend.ops(), {}
    for offset, (name, mu, rho) in enumerate(pairs(layer)):
        eps = ops.philox_normal(mu.detach(), seed, offset)
        if dtype is not None:
            mu, rho, eps = mu.to(dtype), rho.to(dtype), eps.to(dtype)
        out[name] = mu + F.softplus(rho) * eps
    return out


def ref_lstm(x, w_ih, w_hh, b, h=None, c=None):
    """The LSTM written out (BLiTZ's equations, gate blocks i, f, g, o)."""
    B, T, _ = x.shape
    H = w_hh.shape[0]
    h = x.new_zeros(B, H) if h is None else h
    c = x.new_zeros(B, H) if c is None else c
    out = []
    for t in range(T):
        gates = x[:, t] @ w_ih + h @ w_hh + (0 if b is None else b)
        i, f, g, o = gates.split(H, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        out.append(h)
    return torch.stack(out, 1), (h, c)


def ref_peephole(x, w_ih, w_hh, b, h=None, c=None):
    """BLiTZ's peephole LSTM with the tanh output nonlinearity (its sampled-mode equations)."""
    B, T, _ = x.shape
    H = w_hh.shape[0]
    c = x.new_zeros(B, H) if c is None else c
    b = 0 if b is None else b
    out = []
    for t in range(T):
        gates = x[:, t] @ w_ih + c @ w_hh + b
        i, f, o = torch.sigmoid(gates[:, :H]), torch.sigmoid(gates[:, H:2 * H]), torch.sigmoid(gates[:, 3 * H:])
        c = f * c + i * torch.sigmoid(x[:, t] @ w_ih + b)[:, 2 * H:3 * H]
        h = torch.tanh(o * c)
        out.append(h)
    return torch.stack(out, 1), (h, c)


def ref_gru(x, w_ih, w_hh, b, h=None):
    """BLiTZ's GRU equations on three weight blocks (r, z, n) and a four-block bias (r, z, in, hn)."""
    B, T, _ = x.shape
    H = w_hh.shape[0]
    h = x.new_zeros(B, H) if h is None else h
    b = x.new_zeros(4 * H) if b is None else b
    out = []
    for t in range(T):
        xt = x[:, t]
        a = xt @ w_ih[:, :2 * H] + h @ w_hh[:, :2 * H] + b[:2 * H]
        r, z = torch.sigmoid(a[:, :H]), torch.sigmoid(a[:, H:])
        n = torch.tanh(xt @ w_ih[:, 2 * H:] + b[2 * H:3 * H] + r * (h @ w_hh[:, 2 * H:] + b[3 * H:]))
        h = (1 - z) * n + z * h
        out.append(h)
    return torch.stack(out, 1), h


def reference(layer, x, weights, hidden=None):
    """(seq, h) of the written-out recurrence."""
    args = (x, weights["weight_ih"], weights["weight_hh"], weights.get("bias"))
    if isinstance(layer, BayesianGRU):
        return ref_gru(*args, hidden)
    fn = ref_peephole if layer.peephole else ref_lstm
    seq, (h, c) = fn(*args, *(hidden if hidden is not None else (None, None)))
    return seq, h


def kl_reference(layer, seed):
    q = p = 0
    for offset, (name, mu, rho) in enumerate(pairs(layer)):
        eps = _backend.ops().philox_normal(mu.detach(), seed, offset)
        _, q1, p1 = ref_sample(mu.double(), rho.double(), eps.double(), layer.prior)
        q, p = q + q1, p + p1
    return q, p


# ---- parameters, defaults, shapes ---------------------------------------------------------------------

def test_parameter_names_and_layouts():
    lstm = BayesianLSTM(5, 7)
    assert [n for n, _ in lstm.named_parameters()] == ["weight_ih_mu", "weight_ih_rho", "weight_hh_mu",
                                                       "weight_hh_rho", "bias_mu", "bias_rho"]
    assert list(lstm.state_dict()) == [n for n, _ in lstm.named_parameters()]
    assert lstm.weight_ih_mu.shape == (5, 28) and lstm.weight_hh_mu.shape == (7, 28) and lstm.bias_mu.shape == (28,)
    assert len({p.data_ptr() for p in lstm.parameters()}) == 6
    gru = BayesianGRU(5, 7)
    assert gru.weight_ih_mu.shape == (5, 21) and gru.weight_hh_rho.shape == (7, 21) and gru.bias_rho.shape == (28,)
    sharp = BayesianGRU(5, 7, sharpen=True)
    assert [n for n, _ in sharp.named_parameters()][-3:] == ["weight_ih_eta", "weight_hh_eta", "bias_eta"]
    assert sharp.weight_hh_eta.shape == (7, 21)
    for cls in (BayesianLSTM, BayesianGRU):
        layer = cls(5, 7, bias=False)
        assert [n for n, _ in layer.named_parameters()] == ["weight_ih_mu", "weight_ih_rho", "weight_hh_mu",
                                                           "weight_hh_rho"]
        assert cls(5, 7, bias=False, sharpen=True).bias_eta is None


def test_defaults_and_signature():
    torch.manual_seed(0)
    lstm = BayesianLSTM(60, 50)
    assert (lstm.prior_sigma_1, lstm.prior_sigma_2, lstm.prior_pi) == (0.1, 0.002, 1)
    assert lstm.posterior_mu_init == 0 and lstm.posterior_rho_init == -6.0
    assert lstm.freeze is False and lstm.peephole is False and lstm.sharpen is False and lstm.use_bias
    rho = lstm.weight_ih_rho.detach()
    assert abs(rho.mean().item() + 6.0) < 0.01 and abs(rho.std().item() - 0.1) < 0.01
    assert isinstance(lstm, BayesianRNN) and isinstance(lstm, BayesianModule)
    from bayes_ext.modules.base_bayesian_module import BayesianRNN as reexported
    assert reexported is BayesianRNN
    lstm_args = list(inspect.signature(BayesianLSTM).parameters)
    assert lstm_args[:12] == ["in_features", "out_features", "bias", "prior_sigma_1", "prior_sigma_2", "prior_pi",
                              "posterior_mu_init", "posterior_rho_init", "freeze", "prior_dist", "peephole",
                              "sharpen"]
    assert list(inspect.signature(BayesianGRU).parameters)[:11] == lstm_args[:10] + ["sharpen"]


@needs_blitz
def test_signature_matches_blitz():
    for ours, theirs in ((BayesianLSTM, blitz_modules.BayesianLSTM), (BayesianGRU, blitz_modules.BayesianGRU)):
        blitz_params = [p for p in inspect.signature(theirs).parameters.values() if p.kind != p.VAR_KEYWORD]
        our_params = list(inspect.signature(ours).parameters.values())
        assert [(p.name, p.default) for p in blitz_params] == [(p.name, p.default) for p in our_params[:len(blitz_params)]]


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_shapes_match_nn(backend, kind):
    layer = make(kind, 6, 5)
    reference_cls = nn.LSTM if kind == "lstm" else nn.GRU
    ref = reference_cls(6, 5, batch_first=True)
    x = torch.randn(4, 9, 6)
    seq, state = layer(x)
    ref_seq, ref_state = ref(x)
    assert seq.shape == ref_seq.shape == (4, 9, 5)
    if kind == "lstm":
        assert state[0].shape == state[1].shape == ref_state[0][0].shape == (4, 5)
    else:
        assert state.shape == ref_state[0].shape == (4, 5)
    assert layer.forward_frozen(x)[0].shape == (4, 9, 5)


# ---- forward against the reference ---------------------------------------------------------------------

@pytest.mark.parametrize("kind,peephole", [("lstm", False), ("lstm", True), ("gru", False)])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_equals_reference(backend, monkeypatch, kind, peephole, bias):
    kwargs = {"peephole": peephole} if peephole else {}
    layer = make(kind, bias=bias, prior_pi=0.5, prior_sigma_1=0.3, prior_sigma_2=1.5, **kwargs)
    rec = SeedRecorder(monkeypatch)
    x = torch.randn(2, 6, 3)
    seq, state = layer(x)
    assert len(rec.seeds) == 1
    with torch.no_grad():
        ref_seq, ref_h = reference(layer, x, rebuilt(layer, rec.seeds[0]))
    torch.testing.assert_close(seq, ref_seq, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state[0] if kind == "lstm" else state, ref_h, rtol=1e-5, atol=1e-5)
    q, p = kl_reference(layer, rec.seeds[0])
    torch.testing.assert_close(layer.log_variational_posterior.double(), q, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(layer.log_prior.double(), p, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(layer.kl_divergence().double(), q - p, rtol=1e-5, atol=1e-3)


@pytest.mark.parametrize("kind,peephole", [("lstm", False), ("lstm", True), ("gru", False)])
def test_gradients_equal_reference(backend, monkeypatch, kind, peephole):
    kwargs = {"peephole": peephole} if peephole else {}
    layer = make(kind, prior_pi=0.5, prior_sigma_1=0.3, prior_sigma_2=1.5, **kwargs)
    rec = SeedRecorder(monkeypatch)
    x = torch.randn(3, 5, 3, requires_grad=True)
    target = torch.randn(3, 5, 4)
    seq, _ = layer(x)
    loss = (seq - target).pow(2).sum() + 0.01 * layer.kl_divergence()
    loss.backward()
    got = {n: p.grad.clone() for n, p in layer.named_parameters()}
    got_x = x.grad.clone()

    params = {n: p.detach().double().requires_grad_() for n, p in layer.named_parameters()}
    x64 = x.detach().double().requires_grad_()
    ops, weights, q, p = _backend.ops(), {}, 0, 0
    for offset, name in enumerate(NAMES):
        eps = ops.philox_normal(getattr(layer, f"{name}_mu").detach(), rec.seeds[0], offset).double()
        w, q1, p1 = ref_sample(params[f"{name}_mu"], params[f"{name}_rho"], eps, layer.prior)
        weights[name], q, p = w, q + q1, p + p1
    ref_seq, _ = reference(layer, x64, weights)
    ref_loss = (ref_seq - target.double()).pow(2).sum() + 0.01 * (q - p)
    ref_loss.backward()
    for n, prm in params.items():
        torch.testing.assert_close(got[n].double(), prm.grad, rtol=1e-4, atol=1e-4, msg=n)
    torch.testing.assert_close(got_x.double(), x64.grad, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind,peephole", [("lstm", False), ("lstm", True), ("gru", False)])
def test_frozen_uses_means(backend, kind, peephole):
    kwargs = {"peephole": peephole} if peephole else {}
    layer = make(kind, **kwargs)
    x = torch.randn(2, 5, 3)
    layer(x)  # a sampled forward first: its KL terms must not survive the frozen one
    seq, state = layer.forward_frozen(x)
    means = {name: mu for name, mu, _ in pairs(layer)}
    ref_seq, ref_h = reference(layer, x, means)
    torch.testing.assert_close(seq, ref_seq, rtol=1e-5, atol=1e-5)
    q, p = BF.mean_weight_kl_terms(layer.weight_ih_mu, layer.weight_ih_rho, layer.prior)
    for name in ("weight_hh", "bias"):
        q1, p1 = BF.mean_weight_kl_terms(getattr(layer, f"{name}_mu"), getattr(layer, f"{name}_rho"), layer.prior)
        q, p = q + q1, p + p1
    torch.testing.assert_close(layer.log_variational_posterior, q)
    torch.testing.assert_close(layer.log_prior, p)
    layer.freeze = True
    assert torch.equal(layer(x)[0], seq)
    assert torch.equal(layer(x)[0], seq)  # deterministic


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_reproducible_and_random(backend, kind):
    layer = make(kind)
    x = torch.randn(2, 4, 3)
    torch.manual_seed(5)
    a = layer(x)[0]
    torch.manual_seed(5)
    b = layer(x)[0]
    c = layer(x)[0]
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_backends_agree(monkeypatch):
    if not bayes_ext.extension_available():
        pytest.skip("compiled extension not available")
    for kind in LAYERS:
        layer = make(kind)
        x = torch.randn(2, 4, 3)
        outs = []
        for name in ("compiled", "python"):
            with bayes_ext.use_backend(name):
                torch.manual_seed(3)
                outs.append((layer(x)[0], layer.kl_divergence()))
        torch.testing.assert_close(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(outs[0][1], outs[1][1], rtol=1e-5, atol=1e-3)


# ---- hidden state ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,peephole", [("lstm", False), ("lstm", True), ("gru", False)])
def test_hidden_state_in_and_out(backend, monkeypatch, kind, peephole):
    kwargs = {"peephole": peephole} if peephole else {}
    layer = make(kind, **kwargs)
    x = torch.randn(2, 8, 3)
    # frozen: running the sequence in two halves with the carried state equals one run
    full_seq, full_state = layer.forward_frozen(x)
    first, state = layer.forward_frozen(x[:, :3])
    second, state2 = layer.forward_frozen(x[:, 3:], state)
    torch.testing.assert_close(torch.cat([first, second], 1), full_seq, rtol=1e-5, atol=1e-6)
    if kind == "lstm":
        torch.testing.assert_close(state2[1], full_state[1], rtol=1e-5, atol=1e-6)
    # sampled, with a given state: equal to the reference started from it
    if kind == "lstm":
        given = (torch.randn(2, 4), torch.randn(2, 4))
    else:
        given = torch.randn(2, 4)
    rec = SeedRecorder(monkeypatch)
    seq, _ = layer(x, given)
    with torch.no_grad():
        ref_seq, _ = reference(layer, x, rebuilt(layer, rec.seeds[0]), given)
    torch.testing.assert_close(seq, ref_seq, rtol=1e-5, atol=1e-5)
    # nn-style (1, B, H) states are accepted too
    unsq = tuple(t.unsqueeze(0) for t in given) if kind == "lstm" else given.unsqueeze(0)
    torch.testing.assert_close(layer.forward_frozen(x, unsq)[0], layer.forward_frozen(x, given)[0])


def test_input_errors():
    lstm, gru = make("lstm"), make("gru")
    with pytest.raises(ValueError, match="batch-first"):
        lstm(torch.randn(5, 3))
    with pytest.raises(ValueError, match="features"):
        gru(torch.randn(2, 5, 4))
    with pytest.raises(ValueError, match="shape"):
        gru(torch.randn(2, 5, 3), torch.randn(3, 4))
    with pytest.raises(TypeError, match="pair"):
        lstm(torch.randn(2, 5, 3), torch.randn(2, 4))
    with pytest.raises(TypeError, match="dtype"):
        lstm(torch.randn(2, 5, 3, dtype=torch.float64))
    with pytest.raises(TypeError, match="h must have the dtype"):
        lstm(torch.randn(2, 5, 3), (torch.randn(2, 4, dtype=torch.float64), torch.randn(2, 4)))
    with pytest.raises(TypeError, match="hidden_states must have the dtype"):
        gru(torch.randn(2, 5, 3), torch.randint(0, 2, (2, 4)))
    with pytest.raises(ValueError, match="sharpen=False"):
        lstm(torch.randn(2, 5, 3), sharpen_loss=torch.tensor(1.0))
    with pytest.raises(ValueError):
        BayesianLSTM(0, 3)


@pytest.mark.parametrize("kind,peephole", [("lstm", False), ("lstm", True), ("gru", False)])
def test_autocast_runs_in_autocast_dtype_with_fp32_kl(backend, monkeypatch, kind, peephole):
    """Under CPU autocast the recurrence runs in bfloat16 (like nn.LSTM's mkldnn kernel) on the
    sampled float32 weights cast down; the KL stays float32 and equals the float32 forward's."""
    kwargs = {"peephole": peephole} if peephole else {}
    layer = make(kind, **kwargs)
    rec = SeedRecorder(monkeypatch)
    x = torch.randn(2, 6, 3)
    given = (torch.randn(2, 4), torch.randn(2, 4)) if kind == "lstm" else torch.randn(2, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        seq, state = layer(x, given)
        kl = layer.kl_divergence()
        frozen, _ = layer.forward_frozen(x.bfloat16())
    assert seq.dtype == frozen.dtype == torch.bfloat16 and kl.dtype == torch.float32
    weights = {name: w.bfloat16() for name, w in rebuilt(layer, rec.seeds[0]).items()}
    with torch.no_grad():
        bf16_state = tuple(t.bfloat16() for t in given) if kind == "lstm" else given.bfloat16()
        ref_seq, _ = reference(layer, x.bfloat16(), weights, bf16_state)
    torch.testing.assert_close(seq.float(), ref_seq.float(), rtol=0.05, atol=0.03)
    q, p = kl_reference(layer, rec.seeds[0])  # the float32 weights' KL, summed in float64
    torch.testing.assert_close(kl.double(), q - p, rtol=1e-5, atol=1e-3)
    (seq.float().sum() + kl).backward()
    for _, mu, rho in pairs(layer):
        assert mu.grad.dtype == torch.float32 and torch.isfinite(rho.grad).all()


# ---- peephole -------------------------------------------------------------------------------------------

def test_peephole_same_nonlinearity_sampled_and_frozen(backend):
    torch.manual_seed(0)
    layer = BayesianLSTM(3, 4, peephole=True, posterior_rho_init=-30.0)  # sigma ~ 1e-13: samples ~ means
    x = torch.randn(2, 6, 3) * 3
    sampled, (h, c) = layer(x)
    frozen, (hf, cf) = layer.forward_frozen(x)
    torch.testing.assert_close(sampled, frozen, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(c, cf, rtol=1e-6, atol=1e-6)
    assert (frozen < 0.5).any()  # tanh(o * c), o * c >= 0; sigmoid would give >= 0.5


# ---- one sample per call, fused kernel ------------------------------------------------------------------

@pytest.mark.parametrize("kind,peephole", [("lstm", False), ("lstm", True), ("gru", False)])
@pytest.mark.parametrize("bias", [True, False])
def test_weights_sampled_once_per_call(backend, monkeypatch, kind, peephole, bias):
    kwargs = {"peephole": peephole} if peephole else {}
    layer = make(kind, bias=bias, **kwargs)
    calls, seeds = [], SeedRecorder(monkeypatch)
    original = BF.sample_weight

    def counting(mu, rho, seed, offset=0, prior=(1.0, 0.1, 0.4)):
        calls.append(offset)
        return original(mu, rho, seed, offset, prior)

    monkeypatch.setattr(BF, "sample_weight", counting)
    layer(torch.randn(2, 17, 3))
    assert calls == ([0, 1, 2] if bias else [0, 1]) and len(seeds.seeds) == 1


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_recurrence_runs_on_fused_kernel(monkeypatch, kind):
    """The non-peephole recurrence is one call of torch's fused LSTM/GRU op, not a loop over time."""
    calls = []
    original = getattr(torch._VF, kind)

    def counting(*args):
        calls.append(args[0].shape)
        return original(*args)

    monkeypatch.setattr(torch._VF, kind, counting)
    layer = make(kind)
    layer(torch.randn(2, 11, 3))
    layer.forward_frozen(torch.randn(2, 11, 3))
    assert calls == [(2, 11, 3), (2, 11, 3)]


# ---- gradcheck ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind,peephole", [("lstm", False), ("lstm", True), ("gru", False)])
def test_gradcheck_float64(backend, kind, peephole):
    kwargs = {"peephole": peephole} if peephole else {}
    layer = make(kind, 2, 2, dtype=torch.float64, prior_pi=0.5, prior_sigma_1=0.3, prior_sigma_2=1.5, **kwargs)
    x = torch.randn(2, 3, 2, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, 2, dtype=torch.float64, requires_grad=True)
    names = [n for n, _ in layer.named_parameters()]

    def fn(x, h0, *params):
        torch.manual_seed(11)
        seq, _ = torch.func.functional_call(layer, dict(zip(names, params)),
                                            (x, (h0, h0 * 0.5) if kind == "lstm" else h0))
        return seq, layer.log_variational_posterior, layer.log_prior

    params = [p.detach().clone().requires_grad_() for p in layer.parameters()]
    assert torch.autograd.gradcheck(fn, (x, h0, *params), eps=1e-6, atol=1e-5, rtol=1e-4)


# ---- posterior sharpening -------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_sharpening_applies_the_sharpened_sample(backend, monkeypatch, kind):
    layer = make(kind, sharpen=True)
    rec = SeedRecorder(monkeypatch)
    x, target = torch.randn(3, 5, 3), torch.randn(3, 5, 4)
    seq1, _ = layer(x)
    loss1 = (seq1 - target).pow(2).sum()
    kl_theta = layer.kl_divergence().detach()
    seq2, _ = layer(x, sharpen_loss=loss1)
    assert len(rec.seeds) == 2  # one for theta, one for the sharpening noise

    theta = rebuilt(layer, rec.seeds[0], torch.float64)
    theta = {n: w.detach().requires_grad_() for n, w in theta.items()}
    ref_loss = (reference(layer, x.double(), theta)[0] - target.double()).pow(2).sum()
    grads = dict(zip(theta, torch.autograd.grad(ref_loss, list(theta.values()))))
    ops, phi, kl = _backend.ops(), {}, 0
    for offset, name in enumerate(NAMES):
        eta = getattr(layer, f"{name}_eta").detach().double()
        eps = ops.philox_normal(getattr(layer, f"{name}_mu").detach(), rec.seeds[1], offset).double()
        phi[name] = theta[name].detach() - eta * grads[name] + layer.sharpen_sigma_0 * eps
        kl = kl + (eta * grads[name]).pow(2).sum() / (2 * layer.sharpen_sigma_0 ** 2)
    ref_seq2 = reference(layer, x.double(), phi)[0]
    torch.testing.assert_close(seq2.double(), ref_seq2, rtol=1e-4, atol=1e-4)
    assert not torch.allclose(seq2, seq1)
    torch.testing.assert_close(layer.sharpening_kl.double(), kl, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(layer.kl_divergence().double(), kl_theta.double() + kl, rtol=1e-4, atol=1e-2)
    # gradients reach mu, rho and eta
    ((seq2 - target).pow(2).sum() + layer.kl_divergence()).backward()
    for n, prm in layer.named_parameters():
        assert prm.grad is not None and prm.grad.abs().sum() > 0, n


def test_sharpening_second_order_and_api(backend):
    layer = make("lstm", sharpen=True)
    layer.sharpen_second_order = True
    x = torch.randn(2, 4, 3)
    with pytest.raises(RuntimeError, match="sampled forward"):
        layer.sharpen_posterior(torch.tensor(1.0), x.shape)
    loss = layer(x)[0].pow(2).sum()
    with pytest.raises(RuntimeError, match="does not depend"):
        layer.sharpen_posterior(layer.weight_ih_mu.sum(), x.shape)
    w_ih, w_hh, b = layer.sharpen_posterior(loss, x.shape)
    assert w_ih.shape == layer.weight_ih_mu.shape and b.shape == layer.bias_mu.shape
    w_ih.sum().backward()  # second order: grad flows through g = dloss/dtheta as well
    assert layer.weight_ih_eta.grad is not None
    # set_loss_to_sharpen / loss_to_sharpen, BLiTZ's way of asking for the sharpened forward
    loss = layer(x)[0].pow(2).sum()
    layer.set_loss_to_sharpen(loss)
    layer(x)
    assert isinstance(layer.sharpening_kl, torch.Tensor) and layer.sharpening_kl > 0
    layer.set_loss_to_sharpen(None)
    layer(x)
    assert layer.sharpening_kl == 0
    assert "sharpen=True" in repr(layer)


def test_sharpening_trains():
    torch.manual_seed(0)

    @variational_estimator
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = BayesianGRU(2, 8, sharpen=True, posterior_rho_init=-5.0)
            self.head = nn.Linear(8, 1)

        def forward(self, x):
            return self.head(self.rnn(x)[0][:, -1])

    net = Net()
    x = torch.randn(32, 6, 2)
    y = x.sum(dim=(1, 2)).unsqueeze(1) * 0.3
    opt = torch.optim.Adam(net.parameters(), lr=0.02)
    eta_before = net.rnn.weight_hh_eta.detach().clone()
    losses = []
    for _ in range(40):
        opt.zero_grad()
        pred = net.forward_with_sharpening(x, y, F.mse_loss)
        assert net.rnn.sharpening_kl > 0 and net.rnn.loss_to_sharpen is None
        loss = F.mse_loss(pred, y) + net.nn_kl_divergence() * 1e-6
        loss.backward()
        opt.step()
        losses.append(F.mse_loss(pred, y).item())
    assert losses[-1] < 0.5 * losses[0]
    assert not torch.equal(net.rnn.weight_hh_eta, eta_before)


# ---- KL, prior_dist, moped, dtype, estimator -------------------------------------------------------------

def test_prior_dist(backend):
    dist = torch.distributions.Normal(0.0, 0.5)
    layer = make("gru", prior_dist=dist)
    x = torch.randn(2, 3, 3)
    torch.manual_seed(2)
    layer(x)
    torch.manual_seed(2)
    seed = BF.draw_seed()
    weights = rebuilt(layer, seed)
    expected = sum(dist.log_prob(w).sum() for w in weights.values())
    torch.testing.assert_close(layer.log_prior, expected, rtol=1e-5, atol=1e-3)


def test_moped_to_and_state_dict():
    a, b = make("lstm"), BayesianLSTM(3, 4)
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 5, 3)
    assert torch.equal(a.forward_frozen(x)[0], b.forward_frozen(x)[0])
    a.moped_(0.1)
    torch.testing.assert_close(F.softplus(a.weight_hh_rho), 0.1 * a.weight_hh_mu.abs(), rtol=1e-3, atol=1e-8)
    c = make("gru").to(torch.float64)
    seq, h = c(torch.randn(2, 5, 3, dtype=torch.float64))
    assert seq.dtype == h.dtype == torch.float64


@pytest.mark.parametrize("kind", ["lstm", "gru"])
def test_inside_variational_estimator(backend, kind):
    torch.manual_seed(0)

    @variational_estimator
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.rnn = LAYERS[kind](3, 6)
            self.head = BayesianLinear(6, 1)

        def forward(self, x):
            return self.head(self.rnn(x)[0][:, -1])

    net = Net()
    x, y = torch.randn(8, 5, 3), torch.randn(8, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.01)
    loss = net.sample_elbo(x, y, F.mse_loss, sample_nbr=3, complexity_cost_weight=1e-3)
    loss.backward()
    assert all(p.grad is not None for p in net.parameters())
    opt.step()
    assert torch.isfinite(net.nn_kl_divergence())
    net.freeze_()
    assert torch.equal(net(x), net(x))
    net.unfreeze_()
    mean, std = net.mfvi_forward(x, sample_nbr=4)
    assert mean.shape == std.shape == (8, 1)
    seq_model = nn.Sequential(LAYERS[kind](3, 4))
    assert seq_model(x)[0].shape == (8, 5, 4)


# ---- BLiTZ checkpoints ------------------------------------------------------------------------------------

def blitz_like_state_dict(kind, in_f, hidden, sharpen=False):
    """A state_dict laid out like BLiTZ 0.2.8's (four-block GRU, sampler duplicates, eps_w buffers)."""
    torch.manual_seed(4)
    sd = {}
    shapes = {"weight_ih": (in_f, 4 * hidden), "weight_hh": (hidden, 4 * hidden), "bias": (4 * hidden,)}
    for name, shape in shapes.items():
        sd[f"{name}_mu"] = torch.randn(shape) * 0.3
        sd[f"{name}_rho"] = torch.randn(shape) * 0.1 - 6
    if sharpen:
        for name, shape in shapes.items():
            sd[f"{name}_eta"] = torch.rand(shape)
    for name in shapes:
        sd[f"{name}_sampler.mu"] = sd[f"{name}_mu"]
        sd[f"{name}_sampler.rho"] = sd[f"{name}_rho"]
        sd[f"{name}_sampler.eps_w"] = torch.randn(shapes[name])
    return sd


@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("sharpen", [False, True])
def test_load_blitz_like_state_dict(kind, sharpen):
    sd = blitz_like_state_dict(kind, 3, 4, sharpen)
    layer = LAYERS[kind](3, 4, sharpen=sharpen)
    layer.load_blitz_state_dict(sd)
    x = torch.randn(2, 5, 3)
    weights = {"weight_ih": sd["weight_ih_mu"], "weight_hh": sd["weight_hh_mu"], "bias": sd["bias_mu"]}
    if kind == "gru":  # BLiTZ's GRU uses blocks 0-2 of weight_ih, 0, 1, 3 of weight_hh, all four of the bias
        weights["weight_ih"] = weights["weight_ih"][:, :12]
        weights["weight_hh"] = torch.cat([weights["weight_hh"][:, :8], weights["weight_hh"][:, 12:]], 1)
        assert torch.equal(layer.weight_hh_rho, torch.cat([sd["weight_hh_rho"][:, :8], sd["weight_hh_rho"][:, 12:]], 1))
    torch.testing.assert_close(layer.forward_frozen(x)[0], reference(layer, x, weights)[0])
    if sharpen:
        assert torch.equal(layer.bias_eta, sd["bias_eta"])
    # a bias=False layer drops the bias; a sharpening layer keeps its eta when the checkpoint has none
    LAYERS[kind](3, 4, bias=False).load_blitz_state_dict(sd)
    LAYERS[kind](3, 4, sharpen=True).load_blitz_state_dict(blitz_like_state_dict(kind, 3, 4))


def test_load_blitz_prefers_sampler_copy():
    sd = blitz_like_state_dict("lstm", 3, 4)
    sd["weight_ih_sampler.mu"] = sd["weight_ih_mu"] + 1  # what `.to()` does to BLiTZ's sharing
    layer = BayesianLSTM(3, 4)
    with pytest.warns(RuntimeWarning, match="sampler"):
        layer.load_blitz_state_dict(sd)
    assert torch.equal(layer.weight_ih_mu, sd["weight_ih_sampler.mu"])


@needs_blitz
@pytest.mark.parametrize("kind", ["lstm", "gru"])
@pytest.mark.parametrize("sharpen", [False, True])
def test_load_real_blitz_layer(kind, sharpen):
    torch.manual_seed(0)
    cls = blitz_modules.BayesianLSTM if kind == "lstm" else blitz_modules.BayesianGRU
    theirs = cls(3, 5, sharpen=sharpen)
    with torch.no_grad():
        theirs.bias_mu.normal_(0, 0.5)  # make b_hn matter
    ours = LAYERS[kind](3, 5, sharpen=sharpen)
    ours.load_blitz_state_dict(theirs.state_dict())
    x = torch.randn(4, 7, 3)
    h0 = torch.randn(4, 5) * 0.5
    if kind == "lstm":
        state = (h0, torch.randn(4, 5) * 0.5)
        exp_seq, (exp_h, exp_c) = theirs.forward_frozen(x, state)
        got_seq, (got_h, got_c) = ours.forward_frozen(x, state)
        torch.testing.assert_close(got_c, exp_c, rtol=1e-5, atol=1e-6)
    else:
        exp_seq, exp_h = theirs.forward_frozen(x, h0)
        got_seq, got_h = ours.forward_frozen(x, h0)
    torch.testing.assert_close(got_seq, exp_seq, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_h, exp_h, rtol=1e-5, atol=1e-6)


@needs_blitz
def test_load_real_blitz_peephole_matches_its_sampled_math():
    torch.manual_seed(0)
    theirs = blitz_modules.BayesianLSTM(3, 5, peephole=True, posterior_rho_init=-30.0)
    ours = BayesianLSTM(3, 5, peephole=True)
    ours.load_blitz_state_dict(theirs.state_dict())
    x = torch.randn(4, 7, 3) * 2
    exp_seq, _ = theirs(x)  # BLiTZ's sampled mode (tanh); its frozen mode used sigmoid
    torch.testing.assert_close(ours.forward_frozen(x)[0], exp_seq, rtol=1e-5, atol=1e-6)


@needs_blitz
def test_load_blitz_model_in_one_call():
    torch.manual_seed(0)

    class Model(nn.Module):
        def __init__(self, mods):
            super().__init__()
            self.rnn = mods.BayesianLSTM(3, 5)
            self.gru = mods.BayesianGRU(5, 4)
            self.head = mods.BayesianLinear(4, 2)

        def forward(self, x):
            return self.head(self.gru(self.rnn(x)[0])[0][:, -1])

    theirs, ours = Model(blitz_modules), Model(bayes_ext.modules)
    load_blitz_state_dict(ours, theirs.state_dict())
    for m in list(theirs.modules()) + list(ours.modules()):
        if hasattr(m, "freeze"):
            m.freeze = True
    x = torch.randn(3, 6, 3)
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-6)


def test_unfused_lstm_loop_equals_the_fused_kernel(backend):
    """The loop compiled graphs use for LSTM training (inductor cannot lower the fused kernel
    there) computes what torch's fused LSTM computes, values and gradients."""
    layer = make("lstm", dtype=torch.float64)
    x = torch.randn(3, 5, 3, dtype=torch.float64)
    h0, c0 = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    weights = [w.detach().clone().requires_grad_() for w in layer.get_frozen_weights()]
    seq, (h, c) = layer._run(x, *weights, (h0, c0))
    (seq.sum() + c.sum()).backward()
    fused_grads = [w.grad for w in weights]
    weights2 = [w.detach().clone().requires_grad_() for w in weights]
    seq2, (h2, c2) = layer._run_unfused(x, *weights2, h0, c0)
    (seq2.sum() + c2.sum()).backward()
    torch.testing.assert_close(seq2, seq)
    torch.testing.assert_close((h2, c2), (h, c))
    for a, b in zip(weights2, fused_grads):
        torch.testing.assert_close(a.grad, b)
