"""bayes_ext.metrics and bayes_ext.plots on hand-computed cases."""
import importlib.util
import math
import os

import pytest
import torch
from torch import nn

from bayes_ext import metrics
from bayes_ext.modules import BayesianLinear

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_example(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "examples", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def close(a, b, tol=1e-6):
    torch.testing.assert_close(torch.as_tensor(a, dtype=torch.float64),
                               torch.as_tensor(b, dtype=torch.float64), atol=tol, rtol=0)


# ---- regression -------------------------------------------------------------------------------------------

def test_predictive_mean_std_of_stacked_predictions():
    # samples 1 and 3: mean 2, unbiased std sqrt(((1-2)^2 + (3-2)^2) / (2 - 1)) = sqrt(2)
    preds = torch.tensor([[1.0, 5.0], [3.0, 5.0]])
    mean, std = metrics.predictive_mean_std(preds)
    close(mean, [2.0, 5.0])
    close(std, [math.sqrt(2), 0.0])
    with pytest.raises(ValueError):
        metrics.predictive_mean_std(torch.tensor([[1.0]]))


def test_predictive_mean_std_of_a_model():
    outputs = iter([torch.tensor([0.0]), torch.tensor([2.0]), torch.tensor([4.0])])
    # mean 2, unbiased std sqrt((4 + 0 + 4) / 2) = 2
    mean, std = metrics.predictive_mean_std(lambda x: next(outputs), torch.zeros(1), samples=3)
    close(mean, [2.0])
    close(std, [2.0])


def test_interval_coverage():
    # interval 0 +- 2 * 1 = [-2, 2]; y = 0.5 (inside), 2.5 (above), -3 (below), 1.9 (inside)
    # coverage 2/4; y <= upper for 0.5, -3, 1.9: 3/4; y >= lower for 0.5, 2.5, 1.9: 3/4
    mean, std = torch.zeros(4), torch.ones(4)
    y = torch.tensor([0.5, 2.5, -3.0, 1.9])
    coverage, upper, lower = metrics.interval_coverage(mean, std, y, std_multiplier=2)
    close(coverage, 0.5)
    close(upper, 0.75)
    close(lower, 0.75)
    # multiplier 3: [-3, 3] holds all four (-3 is on the bound, which counts)
    close(metrics.interval_coverage(mean, std, y, std_multiplier=3)[0], 1.0)


@pytest.mark.parametrize("args,message", [
    ((torch.zeros(4), torch.ones(3), torch.zeros(4)), r"broadcastable shapes, got \(4,\), \(3,\) and \(4,\)"),
    ((torch.zeros(4), -torch.ones(4), torch.zeros(4)), "std must be non-negative"),
    ((torch.tensor([0.0, math.nan]), torch.ones(2), torch.zeros(2)), "mean must be finite"),
    ((torch.zeros(2), torch.tensor([1.0, math.inf]), torch.zeros(2)), "std must be finite"),
    ((torch.zeros(2), torch.ones(2), torch.tensor([math.nan, 0.0])), "y must be finite"),
])
def test_interval_coverage_rejects_bad_inputs(args, message):
    """A NaN would count as outside the interval and a negative std would swap its bounds, silently."""
    with pytest.raises(ValueError, match=message):
        metrics.interval_coverage(*args)


def test_evaluate_regression_matches_the_blitz_readme():
    example = load_example("bayesian_regression")
    torch.manual_seed(0)
    model = nn.Sequential(BayesianLinear(3, 8, posterior_rho_init=-2.0), BayesianLinear(8, 1, posterior_rho_init=-2.0))
    X, y = torch.randn(40, 3), torch.randn(40, 1)
    torch.manual_seed(1)
    expected = example.evaluate_regression(model, X, y, samples=20, std_multiplier=2)
    torch.manual_seed(1)
    got = metrics.evaluate_regression(model, X, y, samples=20, std_multiplier=2)
    for a, b in zip(got, expected):
        close(a, b, tol=0)
    assert 0 < float(got[0]) <= 1


def test_gaussian_nll_against_scipy():
    stats = pytest.importorskip("scipy.stats")
    gen = torch.Generator().manual_seed(0)
    mean, y = torch.randn(30, generator=gen, dtype=torch.float64), torch.randn(30, generator=gen, dtype=torch.float64)
    std = torch.rand(30, generator=gen, dtype=torch.float64) + 0.05
    expected = -stats.norm.logpdf(y.numpy(), mean.numpy(), std.numpy()).mean()
    close(metrics.gaussian_nll(mean, std, y), expected, tol=1e-12)
    # by hand: N(0, 1) at 0: ln(2 pi) / 2 = 0.9189385
    close(metrics.gaussian_nll(0.0, 1.0, 0.0), 0.9189385332046727)
    with pytest.raises(ValueError, match="std must be positive"):
        metrics.gaussian_nll(torch.zeros(2), torch.tensor([1.0, 0.0]), torch.zeros(2))
    with pytest.raises(ValueError, match="y must be finite"):
        metrics.gaussian_nll(torch.zeros(2), torch.ones(2), torch.tensor([0.0, math.nan]))


def test_regression_calibration():
    """Calibrated Gaussian predictions observe each central interval's level; overconfident ones
    (std halved) fall short at every level; the observed fractions match a direct count against
    scipy's quantiles."""
    stats = pytest.importorskip("scipy.stats")
    gen = torch.Generator().manual_seed(3)
    mean = torch.randn(20000, generator=gen, dtype=torch.float64)
    std = torch.rand(20000, generator=gen, dtype=torch.float64) + 0.5
    y = mean + std * torch.randn(20000, generator=gen, dtype=torch.float64)
    calibrated = metrics.regression_calibration(mean, std, y)
    assert calibrated["levels"].shape == (19,) and float(calibrated["error"]) < 0.01
    overconfident = metrics.regression_calibration(mean, std / 2, y, levels=[0.5, 0.9])
    z = stats.norm.ppf([0.75, 0.95])
    direct = [float(((y - mean).abs() <= std / 2 * float(q)).double().mean()) for q in z]
    torch.testing.assert_close(overconfident["observed"], torch.tensor(direct, dtype=torch.float64))
    assert bool((overconfident["observed"] < overconfident["levels"]).all())
    for levels in ([], [0.0, 0.5], [1.0], [[0.5]]):
        with pytest.raises(ValueError, match="levels must be"):
            metrics.regression_calibration(mean, std, y, levels=levels)


# ---- classification ---------------------------------------------------------------------------------------

def test_predictive_entropy():
    # H([1/2, 1/2]) = ln 2 = 0.693147...; H([1, 0]) = 0 (0 log 0 = 0); H(uniform of 4) = ln 4 = 1.386294...
    probs = torch.tensor([[0.5, 0.5, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]])
    close(metrics.predictive_entropy(probs), [0.6931471805599453, 0.0, 1.3862943611198906])
    # H([0.8, 0.2]) = -(0.8 ln 0.8 + 0.2 ln 0.2) = 0.8 * 0.2231436 + 0.2 * 1.6094379 = 0.5004024
    close(metrics.predictive_entropy(torch.tensor([0.8, 0.2])), 0.5004024, tol=1e-6)


def test_mutual_information():
    # two confident samples that disagree: H(mean = [1/2, 1/2]) - mean(0, 0) = ln 2
    close(metrics.mutual_information(torch.tensor([[[1.0, 0.0]], [[0.0, 1.0]]])), [0.6931471805599453])
    # identical samples: no epistemic uncertainty, whatever their entropy
    close(metrics.mutual_information(torch.tensor([[[0.5, 0.5]], [[0.5, 0.5]]])), [0.0])
    # p1 = [0.8, 0.2], p2 = [0.4, 0.6]: mean [0.6, 0.4]
    # H(mean) = -(0.6 ln 0.6 + 0.4 ln 0.4) = 0.6 * 0.5108256 + 0.4 * 0.9162907 = 0.6730117
    # H(p1) = 0.5004024, H(p2) = H(mean) = 0.6730117 -> mean 0.5867070; MI = 0.0863046
    close(metrics.mutual_information(torch.tensor([[0.8, 0.2], [0.4, 0.6]])), 0.0863046, tol=1e-6)


def test_entropy_decomposes_into_expected_entropy_and_mutual_information():
    """H[mean_s p_s] = mean_s H[p_s] (aleatoric) + MI (epistemic); the first by hand: p1 = [0.8, 0.2],
    p2 = [0.4, 0.6]: (0.5004024 + 0.6730117) / 2 = 0.5867070."""
    close(metrics.expected_entropy(torch.tensor([[0.8, 0.2], [0.4, 0.6]])), 0.5867070, tol=1e-6)
    samples = torch.softmax(torch.randn(7, 5, 4, generator=torch.Generator().manual_seed(2), dtype=torch.float64), -1)
    total = metrics.predictive_entropy(samples.mean(0))
    torch.testing.assert_close(metrics.expected_entropy(samples) + metrics.mutual_information(samples), total)
    with pytest.raises(ValueError, match="probs_samples must be"):
        metrics.expected_entropy(torch.tensor([0.5, 0.5]))


def test_negative_log_likelihood_and_brier_score_against_references():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    gen = torch.Generator().manual_seed(1)
    probs = torch.softmax(torch.randn(60, 4, generator=gen, dtype=torch.float64), -1)
    labels = torch.randint(0, 4, (60,), generator=gen)
    expected = sklearn_metrics.log_loss(labels.numpy(), probs.numpy(), labels=list(range(4)))
    close(metrics.negative_log_likelihood(probs, labels), expected, tol=1e-12)
    onehot = torch.zeros(60, 4, dtype=torch.float64)
    onehot[torch.arange(60), labels] = 1
    brier = sum(float(((probs[i] - onehot[i]) ** 2).sum()) for i in range(60)) / 60
    close(metrics.brier_score(probs, labels), brier, tol=1e-12)
    # by hand: [0.7, 0.3] label 0 -> 0.09 + 0.09 = 0.18, -ln 0.7 = 0.3566749; label 1 -> 0.49 + 0.49 = 0.98
    close(metrics.brier_score(torch.tensor([[0.7, 0.3], [0.7, 0.3]]), torch.tensor([0, 1])), (0.18 + 0.98) / 2)
    close(metrics.negative_log_likelihood(torch.tensor([[0.7, 0.3]]), torch.tensor([0])), 0.3566749, tol=1e-6)
    assert metrics.negative_log_likelihood(torch.tensor([[1.0, 0.0]]), torch.tensor([1])) == math.inf


def ece_case():
    # n_bins = 5, bins (0, .2], (.2, .4], (.4, .6], (.6, .8], (.8, 1]
    # a: conf .95, predicts 0, label 0 (right)  -> bin 4
    # b: conf .85, predicts 0, label 1 (wrong)  -> bin 4
    # c: conf .70, predicts 1, label 1 (right)  -> bin 3
    # d: conf .55, predicts 1, label 1 (right)  -> bin 2
    probs = torch.tensor([[0.95, 0.05], [0.85, 0.15], [0.3, 0.7], [0.45, 0.55]])
    labels = torch.tensor([0, 1, 1, 1])
    return probs, labels


def test_expected_calibration_error():
    probs, labels = ece_case()
    # bin 4: 2 points, accuracy 1/2, confidence (.95 + .85) / 2 = .9 -> 2/4 * .4 = .2
    # bin 3: 1 point, accuracy 1, confidence .7 -> 1/4 * .3 = .075
    # bin 2: 1 point, accuracy 1, confidence .55 -> 1/4 * .45 = .1125
    # ECE = .2 + .075 + .1125 = .3875
    close(metrics.expected_calibration_error(probs, labels, n_bins=5), 0.3875)
    # one bin: |accuracy 3/4 - mean confidence (.95 + .85 + .7 + .55) / 4 = .7625| = .0125
    close(metrics.expected_calibration_error(probs, labels, n_bins=1), 0.0125)
    # confident and right: perfectly calibrated
    close(metrics.expected_calibration_error(torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1])), 0.0)
    with pytest.raises(ValueError):
        metrics.expected_calibration_error(probs, labels[:3])


@pytest.mark.parametrize("probs,labels,error,message", [
    (torch.tensor([[0.7, 0.3]]), torch.tensor([2]), ValueError, r"labels must be class indices in \[0, 2\)"),
    (torch.tensor([[0.7, 0.3]]), torch.tensor([-1]), ValueError, r"labels must be class indices in \[0, 2\)"),
    (torch.tensor([[0.7, 0.3]]), torch.tensor([1.0]), TypeError, "labels must be integer class indices"),
    (torch.tensor([[math.nan, 0.3]]), torch.tensor([0]), ValueError, r"probs must be probabilities in \[0, 1\]"),
    (torch.tensor([[2.5, -1.0]]), torch.tensor([0]), ValueError, r"probs must be probabilities in \[0, 1\]"),
    (torch.zeros(0, 3), torch.zeros(0, dtype=torch.long), ValueError, "at least one prediction"),
])
def test_calibration_rejects_bad_inputs(probs, labels, error, message):
    """Out-of-range labels counted as wrong predictions, logits and NaN gave a number, no predictions
    gave 0 / 0: each is an error now, from the ECE, the reliability diagram, the NLL and the Brier
    score alike."""
    for metric in (metrics.expected_calibration_error, metrics.reliability_diagram, metrics.negative_log_likelihood,
                   metrics.brier_score):
        with pytest.raises(error, match=message):
            metric(probs, labels)


def test_entropies_reject_non_probabilities():
    with pytest.raises(ValueError, match="probs must be probabilities"):
        metrics.predictive_entropy(torch.tensor([[math.nan, 0.5]]))
    with pytest.raises(ValueError, match="probs_samples must be probabilities"):
        metrics.mutual_information(torch.tensor([[[1.5, -0.5]]]))


def test_reliability_diagram():
    probs, labels = ece_case()
    data = metrics.reliability_diagram(probs, labels, n_bins=5)
    close(data["bin_edges"], [0.0, 0.2, 0.4, 0.6, 0.8, 1.0])
    close(data["counts"], [0, 0, 1, 1, 2])
    nan = float("nan")
    torch.testing.assert_close(data["accuracy"].double(), torch.tensor([nan, nan, 1.0, 1.0, 0.5], dtype=torch.float64),
                               equal_nan=True)
    torch.testing.assert_close(data["confidence"].double(),
                               torch.tensor([nan, nan, 0.55, 0.7, 0.9], dtype=torch.float64), equal_nan=True)
    close(data["ece"], 0.3875)


def test_predictive_probs_shape():
    torch.manual_seed(0)
    model = BayesianLinear(3, 4)
    probs = metrics.predictive_probs(model, torch.randn(5, 3), samples=6)
    assert probs.shape == (6, 5, 4) and not probs.requires_grad
    close(probs.sum(-1), torch.ones(6, 5), tol=1e-6)


# ---- plots ------------------------------------------------------------------------------------------------

def test_plots(tmp_path):
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from bayes_ext import plots

    probs, labels = ece_case()
    ax = plots.plot_reliability_diagram(probs, labels, n_bins=5)
    assert "ECE = 0.38" in ax.get_title()  # ECE .3875 (fp32: .38749...)
    ax.figure.savefig(tmp_path / "reliability.png")
    plt.close(ax.figure)

    fig, ax = plt.subplots()
    x = torch.linspace(0, 1, 20)
    out = plots.plot_regression_bands(x.flip(0), x.flip(0) ** 2, 0.1 * torch.ones(20), y=x.flip(0) ** 2, ax=ax)
    assert out is ax
    fig.savefig(tmp_path / "bands.png")
    plt.close(fig)
    ax = plots.plot_regression_calibration(x, 0.1 * torch.ones(20), x + 0.05, levels=[0.25, 0.5, 0.75])
    assert ax.get_title().startswith("Regression calibration (error = ")
    assert list(ax.lines[0].get_xdata()) == [0.25, 0.5, 0.75]
    plt.close(ax.figure)
    assert (tmp_path / "reliability.png").stat().st_size > 0 and (tmp_path / "bands.png").stat().st_size > 0
    with pytest.raises(ValueError):
        plots.plot_regression_bands(x, x, x[:3])
    # a negative std or multiplier and NaN would draw a wrong or gapped band without a word
    ones = torch.ones(20)
    for args, kwargs, message in (((x, x, -ones), {}, "std must be non-negative"),
                                  ((x, x.clone().fill_(math.nan), ones), {}, "mean must be finite"),
                                  ((x, x, ones), {"std_multiplier": -1.0}, "std_multiplier"),
                                  ((x, x, ones), {"std_multiplier": math.inf}, "std_multiplier")):
        with pytest.raises(ValueError, match=message):
            plots.plot_regression_bands(*args, **kwargs)
