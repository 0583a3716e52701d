"""Layers built on the meta device (no memory, as for models too large to initialise twice) and
materialised with ``to_empty`` + ``reset_parameters()``, as torch.nn layers are (FSDP's
param_init_fn, accelerate's init_empty_weights): the same parameters as a layer built directly."""
import pytest
import torch

from bayes_ext.modules import BayesianEmbedding, BayesianLSTM
from helpers import SMALL_LAYERS

LAYERS = dict(SMALL_LAYERS, lstm_sharpened=(lambda: BayesianLSTM(4, 5, sharpen=True), None),
              embedding_max_norm=(lambda: BayesianEmbedding(10, 4, padding_idx=3, max_norm=1.0), None))


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_meta_layer_reset_parameters_equals_a_direct_build(name):
    make, _ = LAYERS[name]
    torch.manual_seed(0)
    direct = make()
    with torch.device("meta"):
        layer = make()
    assert all(p.is_meta for p in layer.parameters())
    layer = layer.to_empty(device="cpu")
    torch.manual_seed(0)
    layer.reset_parameters()
    for (pname, p), (_, q) in zip(layer.named_parameters(), direct.named_parameters()):
        assert torch.equal(p, q), pname


def test_reset_parameters_redraws_and_keeps_the_padding_row_zero():
    layer = BayesianEmbedding(10, 4, padding_idx=2)
    before = layer.weight_mu.detach().clone()
    layer.reset_parameters()
    assert not torch.equal(layer.weight_mu, before)
    assert torch.equal(layer.weight_mu[2], torch.zeros(4))
    assert abs(float(layer.weight_rho.detach().mean()) - layer.posterior_rho_init) < 0.1
