"""The BLiTZ README's regression example, unchanged apart from two things: `blitz` -> `bayes_ext` in
the imports, and scikit-learn's bundled diabetes data (load_boston was removed in scikit-learn 1.2).
After BLiTZ's loop it reports test RMSE and interval coverage and saves a figure of the
prediction bands (`--out`, default examples/output/).

    python examples/bayesian_regression.py [--epochs 100] [--out DIR]
"""
import argparse
import os

import numpy as np
import torch
import torch.nn as nn
import torch.optim as optim
from sklearn.datasets import load_diabetes
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

from bayes_ext.modules import BayesianLinear
from bayes_ext.utils import variational_estimator


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


def main(epochs=100, lr=0.001, seed=0, verbose=True, out=None):
    torch.manual_seed(seed)
    X, y = load_diabetes(return_X_y=True)
    X = StandardScaler().fit_transform(X)
    y = StandardScaler().fit_transform(np.expand_dims(y, 1))
    X_train, X_test, y_train, y_test = train_test_split(X, y, test_size=.25, random_state=42)
    X_train, y_train = torch.tensor(X_train).float(), torch.tensor(y_train).float()
    X_test, y_test = torch.tensor(X_test).float(), torch.tensor(y_test).float()

    regressor = BayesianRegressor(X.shape[1], 1)  # 10 features here (13 in the Boston data)
    optimizer = optim.SGD(regressor.parameters(), lr=lr)
    criterion = torch.nn.MSELoss()
    ds_train = torch.utils.data.TensorDataset(X_train, y_train)
    dataloader_train = torch.utils.data.DataLoader(ds_train, batch_size=16, shuffle=True)

    iteration = 0
    for epoch in progress(range(epochs), verbose):
        for i, (datapoints, labels) in enumerate(dataloader_train):
            optimizer.zero_grad()
            loss = regressor.sample_elbo(inputs=datapoints, labels=labels, criterion=criterion, sample_nbr=3)
            loss.backward()
            optimizer.step()
            iteration += 1
            if iteration % 100 == 0 and verbose:
                ic_acc, under_ci_upper, over_ci_lower = evaluate_regression(regressor, X_test, y_test, samples=25,
                                                                            std_multiplier=3)
                print("CI acc: {:.2f}, CI upper acc: {:.2f}, CI lower acc: {:.2f}".format(ic_acc, under_ci_upper,
                                                                                          over_ci_lower))
                print("Loss: {:.4f}".format(loss))
    result = evaluate_regression(regressor, X_test, y_test, samples=25, std_multiplier=3)
    if out is not None:
        report(regressor, X_test, y_test, out, verbose)
    return regressor, result


def progress(iterable, verbose):
    """A tqdm bar when tqdm is installed and output is wanted."""
    try:
        from tqdm import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, desc="epochs", disable=not verbose)


def report(regressor, X_test, y_test, out, verbose):
    """Test RMSE of the predictive mean, 2-std interval coverage, Gaussian NLL and calibration error of
    the predictive distribution, and a figure of the bands."""
    from bayes_ext import metrics, plots

    with torch.no_grad():
        mean, std = metrics.predictive_mean_std(regressor, X_test, samples=100)
    rmse = float(((mean - y_test) ** 2).mean().sqrt())
    coverage = float(metrics.interval_coverage(mean, std, y_test, std_multiplier=2)[0])
    nll = float(metrics.gaussian_nll(mean, std.clamp_min(1e-6), y_test))
    calibration_error = float(metrics.regression_calibration(mean, std, y_test)["error"])
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "bayesian_regression.png")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(7, 4))
        order = torch.arange(len(y_test))  # test points sorted by predicted mean below
        plots.plot_regression_bands(order, *(t.reshape(-1)[mean.reshape(-1).argsort()] for t in (mean, std, y_test)),
                                    ax=ax)
        ax.set_xlabel("test point (sorted by predicted mean)")
        ax.set_ylabel("standardised target")
        fig.savefig(path, dpi=120, bbox_inches="tight")
        plt.close(fig)
    except ImportError:
        path = None
    if verbose:
        print(f"test RMSE {rmse:.3f}, 2-std interval coverage {coverage:.2f}, Gaussian NLL {nll:.3f}, "
              f"calibration error {calibration_error:.3f}, figure {path}")
    return {"rmse": rmse, "coverage": coverage, "nll": nll, "calibration_error": calibration_error, "figure": path}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=100)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "output"))
    args = parser.parse_args()
    main(epochs=args.epochs, out=args.out)
