"""Matplotlib plots of the uncertainty metrics (matplotlib is imported only when a plot is made).

- ``plot_reliability_diagram(probs, labels, n_bins=15, ax=None)``: accuracy against confidence per
  bin, with the diagonal of perfect calibration, the gaps, and the ECE in the title.
- ``plot_regression_bands(x, mean, std, y=None, std_multiplier=2, ax=None)``: the predictive mean
  and the band mean +- std_multiplier * std, with the observations when given.
- ``plot_regression_calibration(mean, std, y, levels=None, ax=None)``: the observed coverage of the
  central Gaussian intervals against their levels, with the diagonal and the calibration error.

All return the matplotlib ``Axes`` they drew on (``ax.figure`` is the figure).
"""
import numpy as np
import torch

from . import metrics

__all__ = ["plot_reliability_diagram", "plot_regression_bands", "plot_regression_calibration"]


def _axes(ax):
    if ax is not None:
        return ax
    import matplotlib.pyplot as plt  # lazy: matplotlib is an optional dependency
    _, ax = plt.subplots(figsize=(5, 4))
    return ax


def _numpy(x):
    return torch.as_tensor(x).detach().cpu().double().numpy()


def _calibration_axes(ax, xlabel: str, ylabel: str, title: str):
    """The unit square of a calibration plot: the diagonal of perfect calibration, labels, title, legend."""
    ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(loc="upper left")
    return ax


def plot_reliability_diagram(probs, labels, n_bins: int = 15, ax=None, title: str = "Reliability diagram"):
    """Bars of per-bin accuracy (empty bins left out) against the diagonal; returns the Axes."""
    data = metrics.reliability_diagram(probs, labels, n_bins)
    ax = _axes(ax)
    edges = _numpy(data["bin_edges"])
    width = edges[1] - edges[0]
    centers = edges[:-1] + width / 2
    counts, acc, conf = _numpy(data["counts"]), _numpy(data["accuracy"]), _numpy(data["confidence"])
    keep = counts > 0
    ax.bar(centers[keep], acc[keep], width=width, edgecolor="black", color="tab:blue", alpha=0.8, label="accuracy")
    ax.bar(centers[keep], conf[keep] - acc[keep], bottom=acc[keep], width=width, edgecolor="tab:red",
           color="tab:red", alpha=0.3, hatch="//", label="gap to confidence")
    return _calibration_axes(ax, "confidence", "accuracy", f"{title} (ECE = {float(data['ece']):.3f})")


def plot_regression_bands(x, mean, std, y=None, std_multiplier: float = 2, ax=None, label: str = "prediction"):
    """The mean as a line over ``x`` (sorted) with the band mean +- std_multiplier * std shaded, and the
    observations ``y`` as points; returns the Axes."""
    x, mean, std = (_numpy(v).reshape(-1) for v in (x, mean, std))
    if not (x.shape == mean.shape == std.shape):
        raise ValueError(f"x, mean and std must have the same number of elements, got {x.size}, {mean.size}, "
                         f"{std.size}")
    if not 0 <= std_multiplier < float("inf"):
        raise ValueError(f"std_multiplier must be non-negative and finite, got {std_multiplier}")
    for name, values in (("x", x), ("mean", mean), ("std", std)):
        if not np.isfinite(values).all():  # matplotlib would leave gaps in the band without a word
            raise ValueError(f"{name} must be finite")
    if (std < 0).any():
        raise ValueError("std must be non-negative")
    order = x.argsort()
    x, mean, std = x[order], mean[order], std[order]
    ax = _axes(ax)
    ax.fill_between(x, mean - std_multiplier * std, mean + std_multiplier * std, color="tab:blue", alpha=0.25,
                    label=f"mean $\\pm$ {std_multiplier:g} std")
    ax.plot(x, mean, color="tab:blue", linewidth=1.5, label=label)
    if y is not None:
        y = _numpy(y).reshape(-1)
        if y.shape != order.shape:
            raise ValueError(f"y must have {order.size} elements, got {y.size}")
        ax.plot(x, y[order], ".", color="black", markersize=3, label="observed")
    ax.legend(loc="best")
    return ax


def plot_regression_calibration(mean, std, y, levels=None, ax=None, title: str = "Regression calibration"):
    """Observed against expected coverage of the central intervals of N(mean, std^2)
    (``metrics.regression_calibration``): below the diagonal is overconfident; returns the Axes."""
    data = metrics.regression_calibration(mean, std, y, levels)
    ax = _axes(ax)
    levels, observed = _numpy(data["levels"]), _numpy(data["observed"])
    ax.plot(levels, observed, "o-", color="tab:blue", markersize=3, label="observed")
    return _calibration_axes(ax, "expected coverage (interval level)", "observed coverage",
                             f"{title} (error = {float(data['error']):.3f})")
