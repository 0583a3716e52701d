"""torch.export of Bayesian layers (the deployment path: AOTInductor, ExecuTorch, ONNX's dynamo
exporter start from an ExportedProgram). The ops are registered custom ops with fake kernels, so
export captures them, and the per-forward seed draw is captured too: the exported program samples
fresh weights on every call, the ones the eager layer samples for the same torch.manual_seed."""
import warnings

import pytest
import torch
from torch import nn

from bayes_ext.losses import kl_divergence_from_nn
from bayes_ext.modules import BayesianLinear
from helpers import SMALL_LAYERS, needs_torch

pytestmark = needs_torch((2, 8), "torch 2.4 to 2.7's export refuse the KL terms a layer's forward keeps on "
                                 "the layer ('Mutating module attribute _kl_terms during export')")


def _outputs(out):
    return torch.utils._pytree.tree_leaves(out)


@pytest.mark.parametrize("name", sorted(SMALL_LAYERS))
def test_exported_layer_samples_as_the_eager_layer(backend, name):
    make, make_x = SMALL_LAYERS[name]
    layer, x = make(), make_x()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assigned during export")  # the KL terms: see below
        exported = torch.export.export(layer, (x,)).module()
    torch.manual_seed(5)
    got = _outputs(exported(x))
    torch.manual_seed(5)
    want = _outputs(layer(x))
    assert len(got) == len(want)
    for g, w in zip(got, want):
        # export traces the RNNs' step loop instead of torch's fused LSTM / GRU kernel: rounding only
        torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-7)
    assert not torch.equal(_outputs(exported(x))[0], got[0])  # a fresh sample on the next call


class _WithKL(nn.Module):
    """A forward that returns its complexity cost, which export must capture with the output."""

    def __init__(self):
        super().__init__()
        self.hidden = BayesianLinear(4, 8)
        self.out = BayesianLinear(8, 2, estimator="lrt")

    def forward(self, x):
        y = self.out(torch.relu(self.hidden(x)))
        return y, kl_divergence_from_nn(self)


def test_exported_model_returns_the_kl_of_its_own_sample(backend):
    model, x = _WithKL(), torch.randn(3, 4)
    with warnings.catch_warnings():
        # The layers keep the last forward's KL terms as attributes (BLiTZ's log_variational_posterior
        # / log_prior); export reports that and restores them afterwards. Returned, the KL is captured.
        warnings.filterwarnings("ignore", message=".*assigned during export")
        exported = torch.export.export(model, (x,)).module()
    torch.manual_seed(2)
    y, kl = exported(x)
    torch.manual_seed(2)
    y_eager, kl_eager = model(x)
    assert torch.equal(y, y_eager) and torch.equal(kl, kl_eager)


def test_exported_program_has_dynamic_batch(backend):
    layer = BayesianLinear(6, 3)
    batch = torch.export.Dim("batch")
    exported = torch.export.export(layer, (torch.randn(4, 6),), dynamic_shapes=({0: batch},)).module()
    for rows in (1, 9):
        x = torch.randn(rows, 6)
        torch.manual_seed(1)
        got = exported(x)
        torch.manual_seed(1)
        assert torch.equal(got, layer(x))
