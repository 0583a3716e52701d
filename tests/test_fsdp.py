"""FSDP2 (``fully_shard``) on 2 CPU processes (gloo): the posterior parameters are sharded like any
parameters, each Bayesian layer samples from its unsharded mu / rho inside its forward, and with
the noise shared across ranks (the same torch.manual_seed) two SGD steps give the parameters one
process gets on the combined batch."""
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn

import bayes_ext
from bayes_ext.losses import kl_divergence_from_nn
from bayes_ext.modules import BayesianConv2d, BayesianLinear
from gloo_group import free_port, gloo_group
from helpers import needs_torch

try:
    from torch.distributed.fsdp import fully_shard  # torch >= 2.6
except ImportError:
    fully_shard = None  # (torch 2.4 and 2.5 have it elsewhere, for CUDA devices only)

pytestmark = [needs_torch((2, 9), "FSDP2 on the CPU (torch 2.4 and 2.5's fully_shard needs CUDA streams, 2.6's "
                                 "fails on Stream.record_event, 2.7 and 2.8 sum the ranks' gradients over gloo "
                                 "instead of averaging them, nn.Linear's too)"),
              pytest.mark.skipif(fully_shard is None or not dist.is_available(),
                                 reason="needs torch.distributed with FSDP2 (fully_shard)")]

KL_WEIGHT = 1e-3
STEPS = 2


def build():
    torch.manual_seed(1)  # the same model on every rank
    return nn.Sequential(BayesianConv2d(1, 3, 3, posterior_rho_init=-3.0), nn.ReLU(), nn.Flatten(),
                         BayesianLinear(12, 16, posterior_rho_init=-3.0), nn.ReLU(),
                         BayesianLinear(16, 1, posterior_rho_init=-3.0))


def data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(8, 1, 4, 4, generator=g), torch.randn(8, 1, generator=g)


def train(model, x, y):
    """STEPS SGD steps; returns the first step's gradients. The noise of step s comes from
    torch.manual_seed(10 + s) on every rank."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    first = None
    for s in range(STEPS):
        opt.zero_grad()
        torch.manual_seed(10 + s)
        loss = nn.functional.mse_loss(model(x), y) + KL_WEIGHT * kl_divergence_from_nn(model)
        loss.backward()
        if first is None:
            first = {name: full(p.grad) for name, p in model.named_parameters()}
        opt.step()
    return first


def full(t):
    return (t.full_tensor() if hasattr(t, "full_tensor") else t).detach().clone()


def worker(rank, world, port, backend_name, out_path):
    with gloo_group(rank, world, port), bayes_ext.use_backend(backend_name):
        model = build()
        for layer in model:
            if isinstance(layer, (BayesianConv2d, BayesianLinear)):
                fully_shard(layer)
        fully_shard(model)
        sharded = type(model[0].weight_mu).__name__
        x, y = data()
        rows = slice(rank * x.shape[0] // world, (rank + 1) * x.shape[0] // world)
        grads = train(model, x[rows], y[rows])
        params = {name: full(p) for name, p in model.named_parameters()}
        if rank == 0:
            torch.save({"grads": grads, "params": params, "sharded": sharded}, out_path)


def test_fsdp_training_equals_one_process_on_the_combined_batch(backend, tmp_path):
    with bayes_ext.use_backend(backend):
        model = build()
        x, y = data()
        expected_grads = train(model, x, y)
        expected_params = {name: p.detach() for name, p in model.named_parameters()}
    out_path = str(tmp_path / "fsdp.pt")
    mp.spawn(worker, args=(2, free_port(), backend, out_path), nprocs=2, join=True)
    got = torch.load(out_path, weights_only=True)
    assert got["sharded"] == "DTensor"  # the parameters really were sharded
    assert got["grads"].keys() == expected_grads.keys() == expected_params.keys()
    for name in expected_grads:
        assert got["grads"][name].abs().sum() > 0, name
        torch.testing.assert_close(got["grads"][name], expected_grads[name], rtol=1e-5, atol=1e-6, msg=name)
        torch.testing.assert_close(got["params"][name], expected_params[name], rtol=1e-5, atol=1e-6, msg=name)
