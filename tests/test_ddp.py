"""DistributedDataParallel on 2 CPU processes (gloo): the averaged gradients equal one process's
gradients over the combined batch when the ranks share the noise (same torch.manual_seed on
every rank, as README's "Distributed training" section describes)."""
import torch
import torch.multiprocessing as mp
import torch.nn as nn

import bayes_ext
from bayes_ext.modules import BayesianLinear
from gloo_group import free_port, gloo_group

KL_WEIGHT = 1e-3


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = BayesianLinear(6, 16, posterior_rho_init=-3.0)
        self.l2 = BayesianLinear(16, 1, posterior_rho_init=-3.0)

    def forward(self, x):
        return self.l2(torch.relu(self.l1(x)))

    def kl(self):
        return sum(m.log_variational_posterior - m.log_prior for m in (self.l1, self.l2))


def data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(8, 6, generator=g), torch.randn(8, 1, generator=g)


def step(model, net, x, y):
    """One step's loss: mean squared error over the (local) batch plus the KL."""
    loss = nn.functional.mse_loss(model(x), y) + KL_WEIGHT * net.kl()
    loss.backward()
    return {name: p.grad.clone() for name, p in net.named_parameters()}


def worker(rank, world, port, backend_name, out_path):
    with gloo_group(rank, world, port), bayes_ext.use_backend(backend_name):
        torch.manual_seed(1)  # the same model and the same noise on every rank
        net = Net()
        model = nn.parallel.DistributedDataParallel(net)
        x, y = data()
        rows = slice(rank * x.shape[0] // world, (rank + 1) * x.shape[0] // world)
        grads = step(model, net, x[rows], y[rows])
        if rank == 0:
            torch.save(grads, out_path)


def test_ddp_gradients_equal_single_process_on_the_combined_batch(backend, tmp_path):
    with bayes_ext.use_backend(backend):
        torch.manual_seed(1)
        net = Net()
        x, y = data()
        expected = step(net, net, x, y)
    out_path = str(tmp_path / "grads.pt")
    mp.spawn(worker, args=(2, free_port(), backend, out_path), nprocs=2, join=True)
    got = torch.load(out_path, weights_only=True)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)


def test_ranks_with_different_seeds_draw_different_noise(backend):
    """Independent noise per rank is what a different seed per rank gives (the default when each
    process seeds differently)."""
    with bayes_ext.use_backend(backend):
        x, _ = data()
        torch.manual_seed(1)
        net = Net()
        torch.manual_seed(100)
        a = net(x)
        torch.manual_seed(101)
        b = net(x)
    assert not torch.allclose(a, b)
