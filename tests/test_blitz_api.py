"""The BLiTZ-compatible API: import paths, @variational_estimator, the weight-sampler classes, the
seed's regression example, and (when BLiTZ is installed) the same model code on both libraries."""
import importlib
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import bayes_ext
from bayes_ext.losses import kl_divergence_from_nn
from bayes_ext.modules import BayesianLinear, PriorWeightDistribution, TrainableRandomDistribution
from bayes_ext.modules.base_bayesian_module import BayesianModule
from bayes_ext.utils import variational_estimator
from helpers import ref_log_prior_terms, seed_tensor


def test_import_paths():
    import bayes_ext.modules as m
    import bayes_ext.modules.weight_sampler as ws
    import bayes_ext.modules.base_bayesian_module as bbm
    import bayes_ext.utils as u
    import bayes_ext.losses as losses
    assert m.BayesianLinear is BayesianLinear
    assert m.TrainableRandomDistribution is ws.TrainableRandomDistribution is TrainableRandomDistribution
    assert m.PriorWeightDistribution is ws.PriorWeightDistribution is PriorWeightDistribution
    assert bbm.BayesianModule is BayesianModule and issubclass(BayesianModule, nn.Module)
    assert issubclass(BayesianLinear, BayesianModule)
    assert u.variational_estimator is variational_estimator
    assert losses.kl_divergence_from_nn is kl_divergence_from_nn
    for path in ["bayes_ext.modules.linear_bayesian_layer", "bayes_ext.utils.variational_estimator",
                 "bayes_ext.losses.kl_divergence"]:
        importlib.import_module(path)


@variational_estimator
class TwoLayer(nn.Module):
    def __init__(self, in_f=5, hidden=16, out_f=2, **kw):
        super().__init__()
        self.blinear1 = BayesianLinear(in_f, hidden, **kw)
        self.act = nn.ReLU()
        self.blinear2 = BayesianLinear(hidden, out_f, **kw)

    def forward(self, x):
        return self.blinear2(self.act(self.blinear1(x)))


METHODS = ["nn_kl_divergence", "sample_elbo", "sample_elbo_detailed_loss", "freeze_", "unfreeze_", "MOPED_",
           "mfvi_forward"]


def test_variational_estimator_adds_methods():
    model = TwoLayer()
    for name in METHODS:
        assert callable(getattr(model, name)), name
    assert not hasattr(nn.Module, "sample_elbo")  # only the decorated class changes
    with pytest.raises(TypeError):
        variational_estimator(42)


def test_kl_divergence_is_sum_over_layers(backend):
    torch.manual_seed(0)
    model = TwoLayer(posterior_rho_init=-3.0)
    model(torch.randn(4, 5))
    expected = sum(m.log_variational_posterior - m.log_prior for m in (model.blinear1, model.blinear2))
    torch.testing.assert_close(model.nn_kl_divergence(), expected)
    torch.testing.assert_close(kl_divergence_from_nn(model), expected)
    assert model.nn_kl_divergence().grad_fn is not None
    # a model without Bayesian layers has no KL
    assert kl_divergence_from_nn(nn.Linear(2, 2)) == 0


def test_sample_elbo(backend):
    torch.manual_seed(0)
    model = TwoLayer(posterior_rho_init=-3.0)
    x, y = torch.randn(8, 5), torch.randn(8, 2)
    crit = nn.MSELoss()
    torch.manual_seed(5)
    loss = model.sample_elbo(x, y, crit, sample_nbr=3, complexity_cost_weight=0.01)
    assert loss.shape == () and loss.grad_fn is not None
    # the same seeds by hand
    torch.manual_seed(5)
    expected = 0
    for _ in range(3):
        out = model(x)
        expected = expected + crit(out, y) + 0.01 * model.nn_kl_divergence()
    torch.testing.assert_close(loss, expected / 3)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_sample_elbo_detailed_loss(backend):
    torch.manual_seed(0)
    model = TwoLayer(posterior_rho_init=-3.0)
    x, y = torch.randn(8, 5), torch.randn(8, 2)
    crit = nn.MSELoss()
    torch.manual_seed(5)
    preds, total, likelihood, complexity = model.sample_elbo_detailed_loss(x, y, crit, sample_nbr=4,
                                                                           complexity_cost_weight=0.01)
    assert isinstance(preds, np.ndarray) and preds.shape == (4, 8, 2)
    torch.testing.assert_close(total, likelihood + complexity)
    torch.manual_seed(5)
    loss = model.sample_elbo(x, y, crit, sample_nbr=4, complexity_cost_weight=0.01)
    torch.testing.assert_close(total, loss)
    torch.manual_seed(5)
    outs = [model(x) for _ in range(4)]
    np.testing.assert_allclose(preds, torch.stack(outs).detach().numpy(), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(likelihood, sum(crit(o, y) for o in outs) / 4)


def test_freeze_unfreeze(backend):
    model = TwoLayer()
    x = torch.randn(3, 5)
    model.freeze_()
    assert model.blinear1.freeze and model.blinear2.freeze
    a, b = model(x), model(x)
    assert torch.equal(a, b)
    expected = F.linear(F.relu(F.linear(x, model.blinear1.weight_mu, model.blinear1.bias_mu)), model.blinear2.weight_mu,
                        model.blinear2.bias_mu)
    torch.testing.assert_close(a, expected)
    model.unfreeze_()
    assert not model.blinear1.freeze and not model.blinear2.freeze
    assert not torch.equal(model(x), model(x))


@pytest.mark.parametrize("delta", [0.1, 0.02])
def test_moped(backend, delta):
    model = TwoLayer()
    model.freeze_()
    model.MOPED_(delta=delta)
    for layer in (model.blinear1, model.blinear2):
        assert not layer.freeze  # MOPED_ unfreezes, as in BLiTZ
        for name in ("weight", "bias"):
            mu = getattr(layer, f"{name}_mu").detach()
            sigma = F.softplus(getattr(layer, f"{name}_rho").detach())
            torch.testing.assert_close(sigma, delta * mu.abs(), rtol=1e-4, atol=1e-9)
    # the model still trains after MOPED_
    model.sample_elbo(torch.randn(4, 5), torch.randn(4, 2), nn.MSELoss(), 2).backward()


def test_mfvi_forward(backend):
    torch.manual_seed(0)
    model = TwoLayer(posterior_rho_init=-2.0)
    x = torch.randn(6, 5)
    torch.manual_seed(3)
    mean, std = model.mfvi_forward(x, sample_nbr=7)
    assert mean.shape == std.shape == (6, 2)
    torch.manual_seed(3)
    outs = torch.stack([model(x) for _ in range(7)])
    torch.testing.assert_close(mean, outs.mean(0))
    torch.testing.assert_close(std, outs.std(0))
    assert (std > 0).all()


def test_prior_weight_distribution_large_weights():
    prior = PriorWeightDistribution(pi=0.5, sigma1=0.1, sigma2=0.002)
    w = torch.tensor([1e3, -1e3, 0.5, 0.0, 3e-3], dtype=torch.float64, requires_grad=True)
    lp = prior.log_prior(w)
    assert lp.shape == () and torch.isfinite(lp)
    lp.backward()
    assert torch.isfinite(w.grad).all()
    # d log p / dw for |w| >> sigma1 is -w / sigma1^2 (BLiTZ's +1e-6 makes it exactly 0)
    torch.testing.assert_close(w.grad[:2], -w.detach()[:2] / 0.1 ** 2)
    n1 = torch.distributions.Normal(0.0, 0.1).log_prob(w.detach()) + math.log(0.5)
    n2 = torch.distributions.Normal(0.0, 0.002).log_prob(w.detach()) + math.log(0.5)
    torch.testing.assert_close(lp.detach(), torch.logsumexp(torch.stack([n1, n2]), 0).sum())


def test_prior_weight_distribution_defaults_and_dist():
    prior = PriorWeightDistribution()
    assert (prior.pi, prior.sigma1, prior.sigma2) == (1, 0.1, 0.001)
    w = torch.randn(10)
    torch.testing.assert_close(prior.log_prior(w), torch.distributions.Normal(0.0, 0.1).log_prob(w).sum())
    laplace = torch.distributions.Laplace(0.0, 2.0)
    torch.testing.assert_close(PriorWeightDistribution(dist=laplace).log_prior(w), laplace.log_prob(w).sum())
    mix = PriorWeightDistribution(0.3, 0.5, 1.5)
    torch.testing.assert_close(mix.log_prior(w.double()), ref_log_prior_terms(w.double(), 0.3, 0.5, 1.5).sum())


def test_trainable_random_distribution(backend):
    torch.manual_seed(0)
    mu = torch.randn(4, 3)
    rho = torch.randn(4, 3) - 2
    trd = TrainableRandomDistribution(mu.clone(), rho.clone())
    assert [n for n, _ in trd.named_parameters()] == ["mu", "rho"]
    torch.testing.assert_close(trd.sigma, F.softplus(rho))
    w1 = trd.sample()
    lq1 = trd.log_posterior()
    assert w1.shape == (4, 3) and w1.grad_fn is not None
    ref = torch.distributions.Normal(mu, F.softplus(rho)).log_prob(w1.detach()).sum()
    torch.testing.assert_close(lq1, ref, rtol=1e-5, atol=1e-5)
    w2 = trd.sample()
    assert not torch.equal(w1, w2)
    # log_posterior(w) for a given w
    w = torch.randn(4, 3)
    torch.testing.assert_close(trd.log_posterior(w), torch.distributions.Normal(mu, F.softplus(rho)).log_prob(w).sum())
    # an explicit seed: w on stream (seed, offset)
    seed = seed_tensor(77)
    w3 = trd.sample(seed)
    eps = bayes_ext._backend.ops().philox_normal(mu, seed, 0)
    torch.testing.assert_close(w3, mu + F.softplus(rho) * eps, rtol=1e-5, atol=1e-6)
    (w3.sum() + trd.log_posterior()).backward()
    assert trd.mu.grad is not None and trd.rho.grad is not None


def test_trainable_random_distribution_needs_a_sample():
    trd = TrainableRandomDistribution(torch.zeros(2), torch.zeros(2))
    with pytest.raises(RuntimeError, match="sample"):
        trd.log_posterior()


# ---- the seed's regression example --------------------------------------------------------------------

@variational_estimator
class BayesianRegressor(nn.Module):
    def __init__(self, input_dim, output_dim):
        super().__init__()
        self.blinear1 = BayesianLinear(input_dim, 512)
        self.blinear2 = BayesianLinear(512, output_dim)

    def forward(self, x):
        x_ = self.blinear1(x)
        return self.blinear2(x_)


def evaluate_regression(regressor, X, y, samples=100, std_multiplier=2):
    preds = [regressor(X) for i in range(samples)]
    preds = torch.stack(preds)
    means = preds.mean(axis=0)
    stds = preds.std(axis=0)
    ci_upper = means + (std_multiplier * stds)
    ci_lower = means - (std_multiplier * stds)
    ic_acc = (ci_lower <= y) * (ci_upper >= y)
    ic_acc = ic_acc.float().mean()
    return ic_acc, (ci_upper >= y).float().mean(), (ci_lower <= y).float().mean()


def _diabetes():
    datasets = pytest.importorskip("sklearn.datasets")
    preprocessing = pytest.importorskip("sklearn.preprocessing")
    model_selection = pytest.importorskip("sklearn.model_selection")
    X, y = datasets.load_diabetes(return_X_y=True)
    X = preprocessing.StandardScaler().fit_transform(X)
    y = preprocessing.StandardScaler().fit_transform(np.expand_dims(y, -1))
    X_train, X_test, y_train, y_test = model_selection.train_test_split(X, y, test_size=.25, random_state=42)
    return tuple(torch.tensor(a).float() for a in (X_train, X_test, y_train, y_test))


def test_regression_example(backend):
    X_train, X_test, y_train, y_test = _diabetes()
    assert X_train.shape[1] == 10  # the diabetes set has 10 features (Boston had 13)
    torch.manual_seed(0)
    regressor = BayesianRegressor(X_train.shape[1], 1)
    optimizer = torch.optim.Adam(regressor.parameters(), lr=0.01)
    criterion = torch.nn.MSELoss()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(X_train, y_train), batch_size=16, shuffle=True)

    def test_mse():
        regressor.freeze_()
        mse = criterion(regressor(X_test), y_test).item()
        regressor.unfreeze_()
        return mse

    mse_before = test_mse()
    losses = []
    epochs = 10  # 21 batches each: 210 steps
    for _ in range(epochs):
        for datapoints, labels in loader:
            optimizer.zero_grad()
            loss = regressor.sample_elbo(inputs=datapoints, labels=labels, criterion=criterion, sample_nbr=3,
                                         complexity_cost_weight=1 / X_train.shape[0])
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    assert len(losses) == epochs * len(loader)
    assert all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-20:]) < 0.7 * np.mean(losses[:20])
    assert test_mse() < 0.8 * mse_before
    with torch.no_grad():
        ic_acc, under_upper, over_lower = evaluate_regression(regressor, X_test, y_test, samples=25, std_multiplier=3)
    for v in (ic_acc, under_upper, over_lower):
        assert 0.0 <= float(v) <= 1.0
    assert float(ic_acc) <= min(float(under_upper), float(over_lower))


def test_regression_example_default_complexity_weight(backend):
    # the example verbatim (complexity_cost_weight defaults to 1): the ELBO still goes down
    X_train, _, y_train, _ = _diabetes()
    torch.manual_seed(0)
    regressor = BayesianRegressor(X_train.shape[1], 1)
    optimizer = torch.optim.Adam(regressor.parameters(), lr=0.01)
    criterion = torch.nn.MSELoss()
    losses = []
    for i in range(60):
        batch = slice((16 * i) % 320, (16 * i) % 320 + 16)
        optimizer.zero_grad()
        loss = regressor.sample_elbo(inputs=X_train[batch], labels=y_train[batch], criterion=criterion, sample_nbr=3)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert np.mean(losses[-10:]) < np.mean(losses[:10])


# ---- the same code against BLiTZ --------------------------------------------------------------------

def _import_blitz():
    try:
        modules = importlib.import_module("blitz.modules")
        utils = importlib.import_module("blitz.utils")
        losses = importlib.import_module("blitz.losses")
    except Exception as exc:  # missing, or its optional dependencies (torchvision) are
        pytest.skip(f"blitz is not importable: {exc}")
    return modules, utils, losses


def _build_and_train(modules, utils, losses, steps=20):
    @utils.variational_estimator
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blinear1 = modules.BayesianLinear(4, 8)
            self.blinear2 = modules.BayesianLinear(8, 1, prior_sigma_1=0.5, prior_sigma_2=0.1, prior_pi=0.5)

        def forward(self, x):
            return self.blinear2(torch.relu(self.blinear1(x)))

    torch.manual_seed(0)
    net = Net()
    x, y = torch.randn(32, 4), torch.randn(32, 1)
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    for _ in range(steps):
        opt.zero_grad()
        loss = net.sample_elbo(inputs=x, labels=y, criterion=nn.MSELoss(), sample_nbr=2, complexity_cost_weight=1e-3)
        loss.backward()
        opt.step()
    preds, total, likelihood, complexity = net.sample_elbo_detailed_loss(x, y, nn.MSELoss(), 3)
    assert preds.shape == (3, 32, 1)
    mean, std = net.mfvi_forward(x, sample_nbr=4)
    net.freeze_()
    frozen = net(x)
    net.unfreeze_()
    net.MOPED_(delta=0.1)
    kl = losses.kl_divergence_from_nn(net)
    return net, x, frozen, kl


def test_same_code_runs_on_blitz_and_bayes_ext(backend):
    b_modules, b_utils, b_losses = _import_blitz()
    ours_net, x, ours_frozen, ours_kl = _build_and_train(bayes_ext.modules, bayes_ext.utils, bayes_ext.losses)
    blitz_net, _, blitz_frozen, blitz_kl = _build_and_train(b_modules, b_utils, b_losses)
    assert torch.isfinite(torch.as_tensor(ours_kl)) and torch.isfinite(torch.as_tensor(blitz_kl))
    # our checkpoint keys are exactly BLiTZ's own parameter names (BLiTZ also stores the
    # weight_sampler / bias_sampler duplicates), so BLiTZ checkpoints load
    ours_keys = set(ours_net.state_dict())
    blitz_state = blitz_net.state_dict()
    assert ours_keys <= set(blitz_state)
    ours_net.load_state_dict({k: blitz_state[k] for k in ours_keys})
    ours_net.freeze_()
    blitz_net.freeze_()
    torch.testing.assert_close(ours_net(x), blitz_net(x))


def test_log_prior_agrees_with_blitz_for_moderate_weights():
    b_modules, _, _ = _import_blitz()
    from blitz.modules.weight_sampler import PriorWeightDistribution as BlitzPrior
    w = torch.randn(50, dtype=torch.float64) * 0.3
    ours = PriorWeightDistribution(0.5, 0.5, 0.1).log_prior(w)
    theirs = BlitzPrior(0.5, 0.5, 0.1).log_prior(w)
    # BLiTZ adds 1e-6 inside the log and subtracts 0.5 per element
    torch.testing.assert_close(ours, theirs + 0.5 * w.numel(), rtol=1e-4, atol=1e-4)
