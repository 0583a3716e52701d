"""Uncertainty metrics for Bayesian models: regression intervals, entropy, BALD, calibration.

Regression (predictions are Monte Carlo samples of the model output):

- ``predictive_samples(model, x, samples)``: the stacked outputs of ``samples`` sampled forwards, (S, ...).
- ``predictive_mean_std(model, x, samples)`` or ``predictive_mean_std(preds)``: mean and (unbiased,
  ``torch.std``'s default) standard deviation over the samples.
- ``interval_coverage(mean, std, y, std_multiplier=2)``: ``(coverage, upper, lower)``: the fraction of
  ``y`` inside ``mean +- std_multiplier * std``, below the upper bound and above the lower bound.
- ``evaluate_regression(regressor, X, y, samples=100, std_multiplier=2)``: the BLiTZ README's
  function, same meaning and return value.
- ``gaussian_nll(mean, std, y)``: mean negative log-likelihood of y under N(mean, std^2) (nats,
  with the log(2 pi) / 2 constant).
- ``regression_calibration(mean, std, y, levels)``: for each level p, the fraction of y inside the
  central p-interval of N(mean, std^2) (observed against expected coverage), and the mean absolute
  difference (the calibration error of Kuleshov et al. 2018, over central intervals).

Classification (probabilities in the last dimension; natural logarithms, entropies in nats):

- ``predictive_probs(model, x, samples)``: softmax of ``samples`` sampled forwards, (S, N, C).
- ``predictive_entropy(probs)``: H[p] = -sum p log p (0 log 0 = 0) of each distribution; give it
  the mean over samples for the predictive entropy.
- ``mutual_information(probs_samples)``: BALD, H[mean_s p_s] - mean_s H[p_s], over the first dimension.
- ``expected_entropy(probs_samples)``: mean_s H[p_s], the aleatoric part; the predictive entropy is
  this plus the mutual information (the epistemic part).
- ``negative_log_likelihood(probs, labels)``: mean -log p[label] (nats; inf where p[label] = 0).
- ``brier_score(probs, labels)``: mean over predictions of sum_c (p_c - [c = label])^2, in [0, 2].
- ``expected_calibration_error(probs, labels, n_bins=15)``: sum over equal-width confidence bins
  (i/n, (i+1)/n] of |bin| / N * |accuracy(bin) - mean confidence(bin)|, the confidence being the
  top probability and the prediction its argmax.
- ``reliability_diagram(probs, labels, n_bins=15)``: the per-bin data behind that sum (plot it with
  ``bayes_ext.plots.plot_reliability_diagram``).

Everything runs without autograd and returns tensors.
"""
import math
from typing import Dict, Tuple

import torch
from torch import Tensor

__all__ = ["predictive_samples", "predictive_mean_std", "interval_coverage", "evaluate_regression", "gaussian_nll",
           "regression_calibration", "predictive_probs", "predictive_entropy", "mutual_information",
           "expected_entropy", "negative_log_likelihood", "brier_score", "expected_calibration_error",
           "reliability_diagram"]


def _as_tensor(x, name: str, floating: bool = True) -> Tensor:
    t = torch.as_tensor(x)
    if floating and not t.is_floating_point():
        t = t.to(torch.get_default_dtype())
    return t


def _check_samples(samples) -> int:
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be a positive int, got {samples!r}")
    return samples


# ---- regression ---------------------------------------------------------------------------------------

@torch.no_grad()
def predictive_samples(model, x, samples: int = 100) -> Tensor:
    """torch.stack of ``samples`` forwards of ``model`` on ``x`` (each a fresh weight sample): (S, ...)."""
    samples = _check_samples(samples)
    return torch.stack([model(x) for _ in range(samples)])


def predictive_mean_std(model_or_preds, x=None, samples: int = 100) -> Tuple[Tensor, Tensor]:
    """(mean, std) over Monte Carlo samples: of ``model(x)`` drawn ``samples`` times, or of a stacked
    predictions tensor (S, ...) when a tensor is given. std is unbiased (``torch.std``'s default), as
    in BLiTZ's ``evaluate_regression`` and ``mfvi_forward``."""
    if isinstance(model_or_preds, Tensor):
        if x is not None:
            raise TypeError("pass either a model and its input or a stacked predictions tensor, not both")
        preds = model_or_preds.detach()
        if preds.dim() == 0 or preds.shape[0] < 2:
            raise ValueError(f"predictions must be stacked along dimension 0 with at least 2 samples, got shape "
                             f"{tuple(preds.shape)}")
    else:
        if x is None:
            raise TypeError("predictive_mean_std(model, x, samples) needs the input x")
        if _check_samples(samples) < 2:
            raise ValueError("a standard deviation needs at least 2 samples")
        preds = predictive_samples(model_or_preds, x, samples)
    return preds.mean(dim=0), preds.std(dim=0)


def _check_gaussian(mean, std, y, positive: bool = False) -> Tuple[Tensor, Tensor, Tensor]:
    """mean, std and y as tensors: broadcastable, finite, std non-negative (positive if asked)."""
    mean, std, y = _as_tensor(mean, "mean"), _as_tensor(std, "std"), _as_tensor(y, "y")
    try:
        torch.broadcast_shapes(mean.shape, std.shape, y.shape)
    except RuntimeError:
        raise ValueError(f"mean, std and y must have broadcastable shapes, got {tuple(mean.shape)}, "
                         f"{tuple(std.shape)} and {tuple(y.shape)}") from None
    for name, t in (("mean", mean), ("std", std), ("y", y)):
        if not bool(torch.isfinite(t).all()):  # a NaN would count as outside the interval, silently
            raise ValueError(f"{name} must be finite")
    if bool((std <= 0).any() if positive else (std < 0).any()):
        raise ValueError("std must be positive" if positive else "std must be non-negative")
    return mean, std, y


def interval_coverage(mean, std, y, std_multiplier: float = 2) -> Tuple[Tensor, Tensor, Tensor]:
    """(coverage, upper, lower) of the interval mean +- std_multiplier * std:

    - coverage: fraction of y with lower <= y <= upper,
    - upper: fraction of y with y <= upper,
    - lower: fraction of y with y >= lower

    (BLiTZ's ``evaluate_regression`` return value, ``ic_acc, under_ci_upper, over_ci_lower``)."""
    if not std_multiplier >= 0:
        raise ValueError(f"std_multiplier must be non-negative, got {std_multiplier}")
    mean, std, y = _check_gaussian(mean, std, y)
    upper = mean + std_multiplier * std
    lower = mean - std_multiplier * std
    inside = (lower <= y) & (upper >= y)
    return inside.float().mean(), (upper >= y).float().mean(), (lower <= y).float().mean()


def evaluate_regression(regressor, X, y, samples: int = 100, std_multiplier: float = 2):
    """The BLiTZ README's ``evaluate_regression``: (interval accuracy, fraction under the upper bound,
    fraction over the lower bound) of mean +- std_multiplier * std over ``samples`` sampled forwards."""
    mean, std = predictive_mean_std(regressor, X, samples)
    return interval_coverage(mean, std, y, std_multiplier)


def gaussian_nll(mean, std, y) -> Tensor:
    """Mean over the elements of -log N(y; mean, std^2) = log std + (y - mean)^2 / (2 std^2) + log(2 pi) / 2
    (nats): a proper score of the predictive mean and standard deviation (std > 0)."""
    mean, std, y = _check_gaussian(mean, std, y, positive=True)
    z = (y - mean) / std
    return (torch.log(std) + 0.5 * z * z).mean() + 0.5 * math.log(2 * math.pi)


def regression_calibration(mean, std, y, levels=None) -> Dict[str, Tensor]:
    """Coverage of central intervals of N(mean, std^2) at each of ``levels`` (default 0.05, 0.10, ...,
    0.95): ``levels``, ``observed`` (the fraction of y inside each interval) and ``error``, the mean
    |observed - level|. A calibrated model observes each level; an overconfident one less."""
    mean, std, y = _check_gaussian(mean, std, y)
    if levels is None:
        levels = torch.arange(1, 20, dtype=torch.float64) / 20
    levels = torch.as_tensor(levels, dtype=torch.float64)
    if levels.dim() != 1 or levels.numel() == 0 or not bool(((levels > 0) & (levels < 1)).all()):
        raise ValueError("levels must be a non-empty 1-D sequence of probabilities in (0, 1)")
    # |y - mean| <= std * z_(1+p)/2  <=>  y inside the central p-interval
    z = torch.special.ndtri((1 + levels) / 2).to(mean.dtype)
    distance = ((y - mean).abs() / std.clamp_min(torch.finfo(mean.dtype).tiny)).reshape(-1, 1)
    observed = (distance <= z.to(distance.device)).to(torch.float64).mean(dim=0)
    return {"levels": levels, "observed": observed, "error": (observed - levels).abs().mean()}


# ---- classification -----------------------------------------------------------------------------------

@torch.no_grad()
def predictive_probs(model, x, samples: int = 20, dim: int = -1) -> Tensor:
    """Softmax (over ``dim``) of ``samples`` sampled forwards of ``model`` on ``x``: (S, N, C)."""
    samples = _check_samples(samples)
    return torch.stack([torch.softmax(model(x), dim=dim) for _ in range(samples)])


def _check_probs(probs, name: str = "probs") -> Tensor:
    p = _as_tensor(probs, name)
    if p.dim() == 0:
        raise ValueError(f"{name} must hold class probabilities in its last dimension, got a scalar")
    if not bool(((p >= 0) & (p <= 1)).all()):  # also false for NaN: no NaN entropy or ECE
        raise ValueError(f"{name} must be probabilities in [0, 1] (softmax outputs, not logits or NaN)")
    return p


def predictive_entropy(probs) -> Tensor:
    """Entropy -sum_c p_c log p_c (nats, 0 log 0 = 0) of each distribution in ``probs`` (..., C)."""
    p = _check_probs(probs)
    return -torch.special.xlogy(p, p).sum(dim=-1)


def mutual_information(probs_samples) -> Tensor:
    """BALD (Houlsby et al. 2011): H[mean_s p_s] - mean_s H[p_s] for probabilities (S, ..., C) of S
    weight samples; the epistemic part of the predictive entropy (>= 0, clamped at 0 for rounding)."""
    p = _check_probs(probs_samples, "probs_samples")
    if p.dim() < 2:
        raise ValueError(f"probs_samples must be (samples, ..., classes), got shape {tuple(p.shape)}")
    mi = predictive_entropy(p.mean(dim=0)) - predictive_entropy(p).mean(dim=0)
    return mi.clamp_min(0)


def expected_entropy(probs_samples) -> Tensor:
    """mean_s H[p_s] for probabilities (S, ..., C) of S weight samples: the aleatoric part of the
    predictive entropy H[mean_s p_s], whose epistemic rest is ``mutual_information``."""
    p = _check_probs(probs_samples, "probs_samples")
    if p.dim() < 2:
        raise ValueError(f"probs_samples must be (samples, ..., classes), got shape {tuple(p.shape)}")
    return predictive_entropy(p).mean(dim=0)


def _check_labels(probs, labels) -> Tuple[Tensor, Tensor]:
    """probs (N, C) probabilities and labels (N,) class indices, checked."""
    p = _check_probs(probs)
    labels = torch.as_tensor(labels).to(p.device)
    if p.dim() != 2:
        raise ValueError(f"probs must be (N, classes), got shape {tuple(p.shape)}")
    if labels.shape != p.shape[:1]:
        raise ValueError(f"labels must be (N,) = ({p.shape[0]},), got shape {tuple(labels.shape)}")
    if p.shape[0] == 0:
        raise ValueError("probs must hold at least one prediction, got shape (0, classes)")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be integer class indices, got {labels.dtype}")
    if bool(((labels < 0) | (labels >= p.shape[1])).any()):
        raise ValueError(f"labels must be class indices in [0, {p.shape[1]}), got values from "
                         f"{int(labels.min())} to {int(labels.max())}")
    return p, labels


def negative_log_likelihood(probs, labels) -> Tensor:
    """Mean -log p[label] over the predictions (nats): probs (N, C), e.g. the mean over weight
    samples of ``predictive_probs``, labels (N,). inf where a label has probability 0."""
    p, labels = _check_labels(probs, labels)
    return -torch.log(p.gather(1, labels.long().unsqueeze(1))).mean()


def brier_score(probs, labels) -> Tensor:
    """Mean over the predictions of sum_c (p_c - [c = label])^2 (Brier 1950, all classes; 0 is perfect,
    2 the worst): probs (N, C), labels (N,)."""
    p, labels = _check_labels(probs, labels)
    onehot = torch.nn.functional.one_hot(labels.long(), p.shape[1]).to(p.dtype)
    return (p - onehot).square().sum(dim=1).mean()


def _confidence_bins(probs, labels, n_bins: int):
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 1:
        raise ValueError(f"n_bins must be a positive int, got {n_bins!r}")
    p, labels = _check_labels(probs, labels)
    confidence, prediction = p.max(dim=-1)
    correct = (prediction == labels).to(p.dtype)
    # bin b holds confidences in (b / n, (b + 1) / n]; a confidence of exactly 0 goes to bin 0
    index = (torch.ceil(confidence * n_bins).long() - 1).clamp(0, n_bins - 1)
    counts = torch.bincount(index, minlength=n_bins).to(p.dtype)
    conf_sum = torch.zeros(n_bins, dtype=p.dtype, device=p.device).index_add_(0, index, confidence)
    acc_sum = torch.zeros(n_bins, dtype=p.dtype, device=p.device).index_add_(0, index, correct)
    return counts, conf_sum, acc_sum


def expected_calibration_error(probs, labels, n_bins: int = 15) -> Tensor:
    """ECE = sum_b |B_b| / N * |accuracy(B_b) - confidence(B_b)| over ``n_bins`` equal-width bins of
    the top-class probability (Guo et al. 2017). ``probs`` (N, C), ``labels`` (N,) class indices."""
    counts, conf_sum, acc_sum = _confidence_bins(probs, labels, n_bins)
    return (acc_sum - conf_sum).abs().sum() / counts.sum()


def reliability_diagram(probs, labels, n_bins: int = 15) -> Dict[str, Tensor]:
    """The data of a reliability diagram: ``bin_edges`` (n_bins + 1), and per bin ``counts``,
    ``confidence`` (mean top probability) and ``accuracy`` (NaN for empty bins), plus ``ece``."""
    counts, conf_sum, acc_sum = _confidence_bins(probs, labels, n_bins)
    nan = torch.full_like(counts, float("nan"))
    nonempty = counts > 0
    safe = counts.clamp_min(1)
    return {
        "bin_edges": torch.linspace(0, 1, n_bins + 1, dtype=counts.dtype),
        "counts": counts,
        "confidence": torch.where(nonempty, conf_sum / safe, nan),
        "accuracy": torch.where(nonempty, acc_sum / safe, nan),
        "ece": (acc_sum - conf_sum).abs().sum() / counts.sum(),
    }
