"""The layers under test: one factory and one forward adapter per library.

Every case is driven through `forward(module, x, need_kl) -> (out, kl or None)`, so the timing and
memory code never needs to know which library it is running. Imports of the libraries happen
inside the functions: the bayes_ext Python fallback must be imported in a process that set
BAYES_EXT_FORCE_PYTHON=1 first, and missing reference packages must only skip their rows.
"""
import importlib
import importlib.metadata
import os
import sys
from dataclasses import dataclass, field

import torch
from torch import nn

# `python bench/bench_layers.py` puts bench/ on sys.path, not the repo root. Appending the root lets
# an in-place build of bayes_ext be found when it is not pip-installed, without shadowing one that is.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.append(_ROOT)


@dataclass(frozen=True)
class Case:
    name: str        # key in JSON and on the command line
    label: str       # row label in the tables
    dist: str        # distribution whose version is reported ("torch" for nn.Linear)
    kl: str          # how the KL term is obtained, shown in the table
    env: dict = field(default_factory=dict)  # env vars to set ("0": unset) before importing bayes_ext
    own_process: bool = False                # env differs from the parent's: time it in a worker
    linear_factory_ok: bool = False          # usable as a transformer linear layer


CASES = {c.name: c for c in [
    Case("linear", "nn.Linear", "torch", "none"),
    # nn.Linear on the GEMMs bayes_ext's CPU layer ops take on AMD CPUs (bench/onednn_linear.py)
    Case("linear_onednn", "nn.Linear, oneDNN GEMMs (reference)", "torch", "none"),
    Case("bayes_ext", "bayes_ext (compiled)", "bayes_ext", "MC log q - log p (fused)",
         env={"BAYES_EXT_FORCE_PYTHON": "0"}, linear_factory_ok=True),
    Case("bayes_ext_py", "bayes_ext (python fallback)", "bayes_ext", "MC log q - log p",
         env={"BAYES_EXT_FORCE_PYTHON": "1"}, own_process=True, linear_factory_ok=True),
    # the other estimators of the same layer (compiled kernels), side by side with the default reparam
    Case("bayes_ext_lrt", "bayes_ext lrt", "bayes_ext", "closed form",
         env={"BAYES_EXT_FORCE_PYTHON": "0"}),
    Case("bayes_ext_flipout", "bayes_ext flipout", "bayes_ext", "MC log q - log p (fused)",
         env={"BAYES_EXT_FORCE_PYTHON": "0"}),
    Case("blitz", "BLiTZ 0.2.8", "blitz-bayesian-pytorch", "MC log q - log p",
         linear_factory_ok=True),
    Case("bt_reparam", "bayesian-torch Reparameterization", "bayesian-torch", "closed form"),
    Case("bt_flipout", "bayesian-torch Flipout", "bayesian-torch", "closed form"),
    Case("torchbnn", "torchbnn BayesLinear", "torchbnn", "closed form (BKLLoss sum)"),
]}
ESTIMATOR_CASES = {"bayes_ext_lrt": "lrt", "bayes_ext_flipout": "flipout"}  # case -> estimator=


def dist_version(dist):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def availability(name, device="cpu"):
    """(ok, note). Checked in the parent; the fallback's real backend is checked in its own process."""
    try:
        if name == "linear":
            return True, ""
        if name == "linear_onednn":
            import onednn_linear
            return onednn_linear.available(device)
        if name in ("bayes_ext", "bayes_ext_py") + tuple(ESTIMATOR_CASES):
            import bayes_ext
            if name != "bayes_ext_py" and not bayes_ext.extension_available():
                return False, "skipped: bayes_ext extension not built"
            return True, ""
        mod = {"blitz": "blitz.modules", "bt_reparam": "bayesian_torch.layers",
               "bt_flipout": "bayesian_torch.layers", "torchbnn": "torchbnn"}[name]
        importlib.import_module(mod)
        return True, ""
    except Exception as e:  # ImportError, or a broken install: skip the row, do not crash
        return False, f"skipped: {type(e).__name__}: {str(e).splitlines()[0][:80] if str(e) else ''}"


def make_linear(name, in_f, out_f):
    """One layer of the case, with each library's own default hyper-parameters."""
    if name == "linear":
        return nn.Linear(in_f, out_f)
    if name == "linear_onednn":
        import onednn_linear
        return onednn_linear.OneDnnLinear(in_f, out_f)
    if name in ("bayes_ext", "bayes_ext_py"):
        from bayes_ext.modules import BayesianLinear
        return BayesianLinear(in_f, out_f)
    if name in ESTIMATOR_CASES:
        from bayes_ext.modules import BayesianLinear
        return BayesianLinear(in_f, out_f, estimator=ESTIMATOR_CASES[name])
    if name == "blitz":
        from blitz.modules import BayesianLinear
        return BayesianLinear(in_f, out_f)
    if name == "bt_reparam":
        from bayesian_torch.layers import LinearReparameterization
        return LinearReparameterization(in_f, out_f)
    if name == "bt_flipout":
        from bayesian_torch.layers import LinearFlipout
        return LinearFlipout(in_f, out_f)
    if name == "torchbnn":
        import torchbnn
        return torchbnn.BayesLinear(prior_mu=0, prior_sigma=0.1, in_features=in_f, out_features=out_f)
    raise KeyError(name)


def model_kl(model):
    """Sum of log q - log p over BLiTZ-style layers (BLiTZ, bayes_ext) after a forward.

    BLiTZ's samplers have a *method* called log_prior, so only tensor attributes count."""
    kl = None
    for m in model.modules():
        lp, lq = getattr(m, "log_prior", None), getattr(m, "log_variational_posterior", None)
        if isinstance(lp, torch.Tensor) and isinstance(lq, torch.Tensor):
            kl = (lq - lp) if kl is None else kl + (lq - lp)
    return kl


def model_kl_fn(name):
    """The KL of a many-layer model (the transformer) as each library's users compute it: bayes_ext's
    own kl_divergence_from_nn (the layers' terms stacked and summed: a fixed number of ops, where
    the layer-by-layer sum costs three kernel launches a layer on a GPU), and for BLiTZ model_kl
    (BLiTZ's kl_divergence_from_nn without its first `0 + term`)."""
    if name in CASES and CASES[name].dist == "bayes_ext":
        from bayes_ext.losses import kl_divergence_from_nn
        return kl_divergence_from_nn
    return model_kl


def layer_forward(name):
    """forward(module, x, need_kl) -> (out, kl or None) for a single layer of case `name`."""
    if name in ("linear", "linear_onednn"):
        return lambda m, x, need_kl: (m(x), None)
    if name in ("bayes_ext", "bayes_ext_py", "blitz") + tuple(ESTIMATOR_CASES):
        # These layers always compute log q / log p in a sampled forward; we only skip using it.
        return lambda m, x, need_kl: (m(x), model_kl(m) if need_kl else None)
    if name in ("bt_reparam", "bt_flipout"):
        def fwd(m, x, need_kl):
            if need_kl:
                return m(x)  # (out, kl)
            return m(x, return_kl=False), None
        return fwd
    if name == "torchbnn":
        import torchbnn
        kl_loss = torchbnn.BKLLoss(reduction="sum", last_layer_only=False)
        return lambda m, x, need_kl: (m(x), kl_loss(m) if need_kl else None)
    raise KeyError(name)
