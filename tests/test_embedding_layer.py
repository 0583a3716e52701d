"""BayesianEmbedding and the sample_rows / sample_rows_backward ops, on both backends."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bayes_ext import functional as BF
from bayes_ext import functional_embedding as BFE
from bayes_ext.losses import kl_divergence_from_nn
from bayes_ext.modules import BayesianEmbedding
from bayes_ext.utils import variational_estimator
from helpers import OpsRecorder, np_design_normals

PRIOR = (1.0, 0.1, 0.4)


def table(V=11, D=6, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(V, D, generator=g, dtype=dtype)
    rho = torch.randn(V, D, generator=g, dtype=dtype) - 3.0
    return mu, rho


INDEX_CASES = [
    torch.tensor([3, 0, 3, 10, 7, 3]),                   # repeated, unsorted
    torch.tensor([[5, 1, 5], [9, 9, 0]]),                 # 2-D
    torch.tensor([[[2], [4]], [[4], [2]]]),               # 3-D
    torch.tensor([], dtype=torch.int64),                  # empty
]


@pytest.mark.parametrize("idx", INDEX_CASES)
@pytest.mark.parametrize("D", [6, 5])  # 5: rows start mid Philox block
def test_rows_equal_indexing_a_whole_table_sample(ops, idx, D):
    mu, rho = table(D=D)
    seed = torch.tensor(987654321)
    w_table = ops.sample_weight(mu, rho, seed, 0, *PRIOR)[0]
    rows = ops.sample_rows(mu, rho, idx, seed, 0)
    assert rows.shape == idx.shape + (D,)
    torch.testing.assert_close(rows, w_table[idx], rtol=1e-6, atol=1e-7)  # 1 ulp: vectorised vs scalar libm


def test_rows_use_the_design_stream(ops):
    mu, rho = table(V=9, D=7, dtype=torch.float64)
    idx = torch.tensor([8, 2, 2])
    eps = torch.from_numpy(np_design_normals(mu.numel(), 123, 0)).reshape(mu.shape)
    expected = (mu + F.softplus(rho) * eps)[idx]
    torch.testing.assert_close(ops.sample_rows(mu, rho, idx, torch.tensor(123), 0), expected, rtol=1e-12, atol=1e-12)


def test_backends_agree(compiled):
    mu, rho = table(V=40, D=33)
    idx = torch.randint(0, 40, (5, 7))
    seed = torch.tensor(-5)  # negative seeds are read as unsigned
    fast = compiled.sample_rows(mu, rho, idx, seed, 0)
    slow = torch.ops.bayes_ext_py.sample_rows(mu, rho, idx, seed, 0)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(fast)
    for a, b in zip(compiled.sample_rows_backward(g, mu, rho, idx, seed, 0),
                    torch.ops.bayes_ext_py.sample_rows_backward(g, mu, rho, idx, seed, 0)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("idx", INDEX_CASES[:3])
def test_grads_match_autograd_through_the_table_sample(ops, idx):
    mu, rho = table(dtype=torch.float64)
    seed = torch.tensor(42)
    g = torch.randn(idx.shape + (mu.shape[1],), dtype=torch.float64)
    mu1, rho1 = mu.clone().requires_grad_(), rho.clone().requires_grad_()
    (ops.sample_rows(mu1, rho1, idx, seed, 0) * g).sum().backward()
    mu2, rho2 = mu.clone().requires_grad_(), rho.clone().requires_grad_()
    (ops.sample_weight(mu2, rho2, seed, 0, *PRIOR)[0][idx] * g).sum().backward()
    torch.testing.assert_close(mu1.grad, mu2.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rho1.grad, rho2.grad, rtol=1e-12, atol=1e-12)
    untouched = torch.ones(mu.shape[0], dtype=torch.bool)
    untouched[idx.reshape(-1)] = False
    assert (mu1.grad[untouched] == 0).all() and (rho1.grad[untouched] == 0).all()


def test_backward_is_deterministic(ops):
    mu, rho = table(V=5, D=64)
    idx = torch.randint(0, 5, (300,))
    g = torch.randn(300, 64)
    a = ops.sample_rows_backward(g, mu, rho, idx, torch.tensor(1), 0)
    b = ops.sample_rows_backward(g, mu, rho, idx, torch.tensor(1), 0)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_gradcheck_float64(ops):
    mu, rho = table(V=4, D=3, dtype=torch.float64)
    idx = torch.tensor([[1, 3], [1, 1]])
    seed = torch.tensor(7)
    assert torch.autograd.gradcheck(lambda m, r: ops.sample_rows(m, r, idx, seed, 0),
                                    (mu.requires_grad_(), rho.requires_grad_()))


def test_op_rejects_bad_indices(ops):
    mu, rho = table()
    seed = torch.tensor(1)
    with pytest.raises(ValueError, match="indices"):
        ops.sample_rows(mu, rho, torch.tensor([0, 11]), seed, 0)
    with pytest.raises(ValueError, match="indices"):
        ops.sample_rows(mu, rho, torch.tensor([-1]), seed, 0)
    with pytest.raises(TypeError, match="indices"):
        ops.sample_rows(mu, rho, torch.tensor([0.0]), seed, 0)
    with pytest.raises(TypeError, match="indices"):
        ops.sample_rows(mu, rho, torch.tensor([0], dtype=torch.int32), seed, 0)
    with pytest.raises(ValueError, match="mu"):
        ops.sample_rows(mu[0], rho[0], torch.tensor([0]), seed, 0)
    with pytest.raises(ValueError, match="grad_rows"):
        ops.sample_rows_backward(torch.zeros(2, 6), mu, rho, torch.tensor([0]), seed, 0)


# ---- the layer ----------------------------------------------------------------------------------

def test_constructor_matches_blitz_and_nn_shapes(backend):
    layer = BayesianEmbedding(20, 8)
    assert [n for n, _ in layer.named_parameters()] == ["weight_mu", "weight_rho"]
    assert (layer.prior_sigma_1, layer.prior_sigma_2, layer.prior_pi, layer.posterior_rho_init) == (0.1, 0.002, 1, -6.0)
    assert layer.kl == "mc" and not layer.freeze
    positional = BayesianEmbedding(20, 8, 0, None, 2., False, False, 0.2, 0.01, 0.5, 0.0, -5.0, True, None)
    assert (positional.padding_idx, positional.prior_sigma_1, positional.prior_pi, positional.freeze) == (0, 0.2, 0.5, True)
    x = torch.randint(0, 20, (3, 4, 5))
    assert layer(x).shape == nn.Embedding(20, 8)(x).shape == (3, 4, 5, 8)
    assert layer(x.to(torch.int32)).shape == (3, 4, 5, 8)
    assert nn.Sequential(layer, nn.Flatten(), nn.Linear(4 * 5 * 8, 2))(x).shape == (3, 2)


def test_forward_equals_rows_of_a_table_sample_and_mc_kl(backend):
    layer = BayesianEmbedding(30, 7, prior_pi=0.5, prior_sigma_2=0.01)
    x = torch.tensor([[4, 29, 4], [0, 13, 2]])
    torch.manual_seed(3)
    seed = BF.draw_seed()
    w, log_q, log_p = BF.sample_weight(layer.weight_mu, layer.weight_rho, seed, 0, layer.prior)
    torch.manual_seed(3)
    y = layer(x)
    torch.testing.assert_close(y, w[x], rtol=0, atol=0)
    torch.testing.assert_close(layer.log_variational_posterior, log_q)
    torch.testing.assert_close(layer.log_prior, log_p)
    torch.testing.assert_close(layer.kl_divergence(), log_q - log_p)


def test_mc_kl_with_prior_dist(backend):
    prior = torch.distributions.Laplace(0.0, 0.3)
    layer = BayesianEmbedding(12, 4, prior_dist=prior)
    torch.manual_seed(5)
    seed = BF.draw_seed()
    w, log_q, _ = BF.sample_weight(layer.weight_mu, layer.weight_rho, seed, 0, layer.prior)
    torch.manual_seed(5)
    layer(torch.tensor([1, 2]))
    torch.testing.assert_close(layer.log_variational_posterior, log_q)
    torch.testing.assert_close(layer.log_prior, prior.log_prob(w).sum())


@pytest.mark.parametrize("kwargs, sigma", [({}, 0.1), ({"prior_pi": 0, "prior_sigma_2": 0.3}, 0.3),
                                           ({"prior_dist": torch.distributions.Normal(0.0, 0.2)}, 0.2)])
def test_closed_form_kl(backend, kwargs, sigma):
    layer = BayesianEmbedding(15, 4, kl="closed_form", dtype=torch.float64, **kwargs)
    layer(torch.tensor([1, 2]))
    q = torch.distributions.Normal(layer.weight_mu, F.softplus(layer.weight_rho))
    expected = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, sigma)).sum()
    torch.testing.assert_close(layer.log_variational_posterior, expected)
    assert float(layer.log_prior) == 0.0
    torch.testing.assert_close(kl_divergence_from_nn(layer), expected)
    layer.kl_divergence().backward()
    mu, rho = layer.weight_mu.detach().requires_grad_(), layer.weight_rho.detach().requires_grad_()
    torch.distributions.kl_divergence(torch.distributions.Normal(mu, F.softplus(rho)),
                                      torch.distributions.Normal(0.0, sigma)).sum().backward()
    torch.testing.assert_close(layer.weight_mu.grad, mu.grad)
    torch.testing.assert_close(layer.weight_rho.grad, rho.grad)


def test_closed_form_needs_a_single_gaussian():
    with pytest.raises(ValueError, match="closed_form"):
        BayesianEmbedding(5, 2, prior_pi=0.5, kl="closed_form")
    with pytest.raises(ValueError, match="Normal"):
        BayesianEmbedding(5, 2, prior_dist=torch.distributions.Laplace(0.0, 1.0), kl="closed_form")
    with pytest.raises(ValueError, match="kl"):
        BayesianEmbedding(5, 2, kl="exact")


@pytest.mark.parametrize("kl", ["mc", "closed_form"])
def test_padding_idx_zero_output_and_no_gradient(backend, kl):
    layer = BayesianEmbedding(10, 5, padding_idx=-1, kl=kl)  # -1 -> row 9, as in nn.Embedding
    assert layer.padding_idx == 9 and (layer.weight_mu[9] == 0).all()
    x = torch.tensor([[9, 1, 9], [2, 9, 1]])
    y = layer(x)
    assert (y[x == 9] == 0).all() and (y[x != 9] != 0).all()
    (y.square().sum() + layer.kl_divergence()).backward()
    for p in (layer.weight_mu, layer.weight_rho):
        assert (p.grad[9] == 0).all() and (p.grad[1] != 0).all()
    layer.freeze = True
    assert (layer(x)[x == 9] == 0).all()


def test_padding_row_is_left_out_of_the_kl(backend):
    torch.manual_seed(0)
    full = BayesianEmbedding(8, 3)
    padded = BayesianEmbedding(8, 3, padding_idx=2)
    padded.load_state_dict(full.state_dict())
    torch.manual_seed(1)
    seed = BF.draw_seed()
    w, _, _ = BF.sample_weight(full.weight_mu, full.weight_rho, seed, 0, full.prior)
    torch.manual_seed(1)
    padded(torch.tensor([0, 2]))
    keep = torch.tensor([r != 2 for r in range(8)])
    sigma = F.softplus(full.weight_rho)[keep]
    eps = (w[keep] - full.weight_mu[keep]) / sigma
    log_q = (-0.5 * math.log(2 * math.pi) - torch.log(sigma) - 0.5 * eps ** 2).sum()
    torch.testing.assert_close(padded.log_variational_posterior, log_q, rtol=1e-4, atol=1e-4)


def test_max_norm_renormalises_sampled_rows(backend):
    layer = BayesianEmbedding(6, 4, max_norm=0.5, posterior_mu_init=1.0)
    x = torch.tensor([0, 3, 3])
    torch.manual_seed(2)
    seed = BF.draw_seed()
    w = BF.sample_weight(layer.weight_mu, layer.weight_rho, seed, 0, layer.prior)[0].detach()
    torch.manual_seed(2)
    y = layer(x)
    torch.testing.assert_close(y, F.embedding(x, w.clone(), max_norm=0.5))
    assert torch.linalg.vector_norm(y, dim=-1).max() <= 0.5 + 1e-6


def test_scale_grad_by_freq(backend):
    layer = BayesianEmbedding(6, 3, scale_grad_by_freq=True)
    ref = BayesianEmbedding(6, 3)
    ref.load_state_dict(layer.state_dict())
    x = torch.tensor([1, 1, 1, 4])
    torch.manual_seed(0)
    layer(x).sum().backward()
    torch.manual_seed(0)
    ref(x).sum().backward()
    torch.testing.assert_close(layer.weight_mu.grad[1], ref.weight_mu.grad[1] / 3)
    torch.testing.assert_close(layer.weight_mu.grad[4], ref.weight_mu.grad[4])


def test_sparse_is_rejected():
    with pytest.raises(NotImplementedError, match="sparse"):
        BayesianEmbedding(5, 2, sparse=True)


def test_layer_rejects_bad_input(backend):
    layer = BayesianEmbedding(5, 2)
    with pytest.raises(ValueError, match="input"):
        layer(torch.tensor([5]))
    with pytest.raises(ValueError, match="input"):
        layer(torch.tensor([-1]))
    with pytest.raises(TypeError, match="input"):
        layer(torch.tensor([1.0]))
    layer.freeze = True
    with pytest.raises(TypeError, match="input"):
        layer(torch.tensor([1.0]))


def test_freeze_uses_the_means(backend):
    layer = BayesianEmbedding(9, 4, freeze=True)
    x = torch.tensor([[1, 8], [8, 0]])
    torch.testing.assert_close(layer(x), F.embedding(x, layer.weight_mu))
    log_q, log_p = BF.mean_weight_kl_terms(layer.weight_mu, layer.weight_rho, layer.prior)
    torch.testing.assert_close(layer.log_variational_posterior, log_q)
    torch.testing.assert_close(layer.log_prior, log_p)
    layer.freeze = False
    a, b = layer(x), layer(x)
    assert not torch.equal(a, b)  # sampled again


def test_closed_form_forward_never_samples_the_whole_table(backend, monkeypatch):
    """The lookup samples only its rows; with kl="closed_form" nothing samples the table."""
    calls = OpsRecorder(monkeypatch).calls
    layer = BayesianEmbedding(50_000, 16, kl="closed_form")
    y = layer(torch.randint(0, 50_000, (4, 3)))
    (y.sum() + layer.kl_divergence()).backward()
    # the KL is one fused pass over the table; its gradients are written first, the rows' added
    assert calls == ["sample_rows", "gaussian_kl", "gaussian_kl_backward", "sample_rows_backward_add_"]
    layer.kl = "mc"
    layer(torch.tensor([1]))
    assert calls[4:] == ["sample_rows", "sample_weight"]


@pytest.mark.parametrize("kl", ["mc", "closed_form"])
def test_sample_elbo_in_a_model(backend, kl):
    @variational_estimator
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = BayesianEmbedding(20, 6, padding_idx=0, kl=kl)
            self.out = nn.Linear(6, 3)

        def forward(self, x):
            return self.out(self.emb(x).mean(1))

    model = Model()
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    x = torch.randint(0, 20, (16, 5))
    y = torch.randint(0, 3, (16,))
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = model.sample_elbo(x, y, nn.CrossEntropyLoss(), sample_nbr=2, complexity_cost_weight=1e-4)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert math.isfinite(losses[-1]) and losses[-1] < losses[0]
    assert (model.emb.weight_mu[0] == 0).all()


def test_fused_closed_form_equals_lookup_plus_kl(backend):
    mu, rho = table(V=9, D=5, dtype=torch.float64)
    x = torch.tensor([[3, 0, 3], [8, 3, 1]])
    seed = torch.tensor(11)
    g = torch.randn(2, 3, 5, dtype=torch.float64)
    m1, r1 = mu.clone().requires_grad_(), rho.clone().requires_grad_()
    rows, kl = BFE.bayesian_embedding_closed_form(x, m1, r1, 0.2, seed, padding_idx=0)
    ((rows * g).sum() + 0.3 * kl).backward()
    m2, r2 = mu.clone().requires_grad_(), rho.clone().requires_grad_()
    rows2 = BFE.bayesian_embedding(x, m2, r2, seed, padding_idx=0)
    q = torch.distributions.Normal(m2[1:], F.softplus(r2[1:]))
    kl2 = torch.distributions.kl_divergence(q, torch.distributions.Normal(0.0, 0.2)).sum()
    ((rows2 * g).sum() + 0.3 * kl2).backward()
    torch.testing.assert_close(rows, rows2, rtol=0, atol=0)
    torch.testing.assert_close(kl, kl2)
    torch.testing.assert_close(m1.grad, m2.grad)
    torch.testing.assert_close(r1.grad, r2.grad)
    assert (m1.grad[0] == 0).all() and (r1.grad[0] == 0).all()
