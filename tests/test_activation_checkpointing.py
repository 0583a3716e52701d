"""Activation checkpointing (torch.utils.checkpoint), which large models train with: the forward
runs again in backward, and must draw the same weights there. The per-forward seed comes from
torch's CPU generator, whose state checkpoint saves and restores around the recomputation, so the
checkpointed model gives the values and gradients of the plain one on the same seed."""
import copy
import gc
import weakref

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from bayes_ext.losses import kl_divergence_from_nn
from bayes_ext.modules import BayesianConv2d, BayesianLinear, BayesianLSTM
from helpers import SMALL_LAYERS


def _model(kind):
    if kind == "conv":
        return nn.Sequential(BayesianConv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), BayesianLinear(4 * 25, 3)), \
            torch.randn(2, 2, 5, 5)
    if kind == "lstm":
        class LastStep(nn.Module):
            def forward(self, out):
                return out[0][:, -1]
        return nn.Sequential(BayesianLSTM(3, 6), LastStep(), BayesianLinear(6, 2)), torch.randn(2, 4, 3)
    return nn.Sequential(BayesianLinear(8, 16, estimator=kind), nn.Tanh(), BayesianLinear(16, 2, estimator=kind)), \
        torch.randn(4, 8)


def _grads(model, x):
    return [p.grad for p in model.parameters()] + [x.grad]


@pytest.mark.parametrize("kind", ["reparam", "lrt", "flipout", "conv", "lstm"])
def test_checkpointed_model_equals_the_plain_one(backend, kind):
    model, x = _model(kind)
    plain = copy.deepcopy(model)
    x_ckpt, x_plain = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    torch.manual_seed(1)
    out = checkpoint(model, x_ckpt, use_reentrant=False)
    (out.square().sum() + kl_divergence_from_nn(model)).backward()
    torch.manual_seed(1)
    out_plain = plain(x_plain)
    (out_plain.square().sum() + kl_divergence_from_nn(plain)).backward()
    assert torch.equal(out, out_plain)
    for got, want in zip(_grads(model, x_ckpt), _grads(plain, x_plain)):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


def test_reentrant_checkpoint_needs_the_kl_returned(backend):
    """use_reentrant=True runs the first forward without autograd: a KL read from the layers
    afterwards has no gradient, so it must come out of the checkpointed function."""
    model, x = _model("reparam")
    plain = copy.deepcopy(model)

    def forward_and_kl(inp):
        return model(inp), kl_divergence_from_nn(model)

    torch.manual_seed(4)
    out, kl = checkpoint(forward_and_kl, x.clone().requires_grad_(True), use_reentrant=True)
    (out.sum() + kl).backward()
    torch.manual_seed(4)
    (plain(x).sum() + kl_divergence_from_nn(plain)).backward()
    for got, want in zip(model.parameters(), plain.parameters()):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-6, atol=1e-7)


class _KeepRef(nn.Module):
    """Passes a new tensor on and keeps only a weak reference to it."""

    def __init__(self):
        super().__init__()
        self.ref = None

    def forward(self, x):
        x = x * 1
        self.ref = weakref.ref(x)
        return x


@pytest.mark.parametrize("name", sorted(SMALL_LAYERS))
def test_checkpoint_frees_the_layer_input(backend, name):
    """Inside a checkpointed block a layer's input is an activation that checkpoint frees after the
    forward and recomputes in backward: the layer keeps it only as saved tensors (a conv once kept
    it as a plain attribute for its double backward, defeating checkpointing)."""
    make, make_x = SMALL_LAYERS[name]
    keep = _KeepRef()
    block = nn.Sequential(keep, make())
    x = make_x()
    x = x.requires_grad_(True) if x.is_floating_point() else x
    out = checkpoint(block, x, use_reentrant=False)
    gc.collect()
    assert keep.ref() is None
    loss = sum(t.sum() for t in torch.utils._pytree.tree_leaves(out)) + kl_divergence_from_nn(block)
    loss.backward()  # recomputed, and the gradients arrive
    assert all(p.grad is not None for p in block.parameters())


def test_save_for_backward_keeps_its_tensors_in_to_save():
    """_saved_inputs.setup_keeping_inputs reads what an op's setup_context saved from ctx.to_save
    (torch's FunctionCtx keeps them there until the forward returns): this pins that assumption."""
    seen = {}

    class Probe(torch.autograd.Function):
        @staticmethod
        def forward(x):
            return x * 2

        @staticmethod
        def setup_context(ctx, inputs, output):
            ctx.save_for_backward(inputs[0], output)
            seen["to_save"] = getattr(ctx, "to_save", None)

        @staticmethod
        def backward(ctx, grad):
            return grad * 2

    x = torch.randn(3, requires_grad=True)
    y = Probe.apply(x)
    assert seen["to_save"] is not None and len(seen["to_save"]) == 2
    assert seen["to_save"][0] is x and seen["to_save"][1] is y
