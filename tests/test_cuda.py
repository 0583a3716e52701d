"""CUDA: the op against the reference on the device, the same noise on CPU and GPU, CPU-GPU parity
of BayesianLinear, device seeds, and launches on the current stream. Skipped without a GPU."""
import copy

import pytest
import torch
import torch.nn.functional as F

import bayes_ext
from bayes_ext import _backend
from bayes_ext.modules import BayesianLinear
from helpers import ref_grads, ref_sample, seed_tensor, to64

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")]

DTYPES = [torch.float32, torch.float64]
PRIORS = [(1.0, 0.1, 0.4), (0.5, 0.3, 1.5), (0.0, 0.1, 0.4)]
DEV = "cuda"


def _has_cuda_kernels():
    return torch._C._dispatch_has_kernel_for_dispatch_key("bayes_ext::sample_weight", "CUDA")


@pytest.fixture
def cuda_ops(backend):
    """The active backend's ops, skipping the compiled one when it was built without CUDA kernels."""
    if backend == "compiled" and not _has_cuda_kernels():
        pytest.skip("the compiled extension was built without CUDA kernels")
    return _backend.ops()


def _params(shape, dtype, device=DEV, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mu = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    rho = (torch.randn(shape, generator=gen, dtype=torch.float64) - 2).to(dtype)
    return mu.to(device), rho.to(device)


def _tol(dtype):
    return dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("prior", PRIORS)
@pytest.mark.parametrize("shape", [(7,), (33, 65), (3, 4, 5, 6)])
def test_op_matches_reference_on_cuda(cuda_ops, dtype, prior, shape):
    mu, rho = _params(shape, dtype)
    seed, offset = seed_tensor(1234), 3
    w, log_q, log_p = cuda_ops.sample_weight(mu, rho, seed, offset, *prior)
    assert w.device.type == "cuda" and log_q.device.type == "cuda"
    eps = cuda_ops.philox_normal(mu, seed, offset)
    rw, rq, rp = ref_sample(*to64(mu, rho, eps), prior)
    torch.testing.assert_close(w.double(), rw, **_tol(dtype))
    torch.testing.assert_close(log_q.double(), rq, rtol=_tol(dtype)["rtol"], atol=1e-6)
    torch.testing.assert_close(log_p.double(), rp, rtol=_tol(dtype)["rtol"], atol=1e-6)
    grad_w = torch.randn(shape, dtype=dtype, device=DEV)
    one = torch.ones((), dtype=dtype, device=DEV)
    g_mu, g_rho, w_bw = cuda_ops.sample_weight_backward(grad_w, 0.5 * one, -2.0 * one, mu, rho, seed, offset, *prior,
                                                        True)
    r_mu, r_rho = ref_grads(*to64(mu, rho, eps), prior, grad_w.double(), 0.5, -2.0)
    torch.testing.assert_close(g_mu.double(), r_mu, **_tol(dtype))
    torch.testing.assert_close(g_rho.double(), r_rho, **_tol(dtype))
    torch.testing.assert_close(w_bw, w, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("numel", [1, 5, 4099, (1 << 22) + 13])  # the last exceeds one grid pass
def test_same_eps_on_cpu_and_cuda(backend, cuda_ops, dtype, tol, numel):
    if backend == "python" and numel > 1 << 20:
        pytest.skip("the pure-PyTorch Philox on 4M CPU elements is slow; the compiled run covers the grid loop")
    for seed, offset in [(0, 0), (2 ** 64 - 1, 1), (123456789, 2 ** 40 + 7)]:
        cpu = cuda_ops.philox_normal(torch.empty(numel, dtype=dtype), seed_tensor(seed), offset)
        gpu = cuda_ops.philox_normal(torch.empty(numel, dtype=dtype, device=DEV), seed_tensor(seed), offset)
        torch.testing.assert_close(gpu.cpu(), cpu, rtol=tol, atol=tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_same_sample_on_cpu_and_cuda(cuda_ops, dtype):
    mu, rho = _params((257, 129), dtype, device="cpu")
    seed, prior = seed_tensor(77), (0.5, 0.3, 1.5)
    cpu = cuda_ops.sample_weight(mu, rho, seed, 1, *prior)
    gpu = cuda_ops.sample_weight(mu.to(DEV), rho.to(DEV), seed, 1, *prior)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    for a, b in zip(gpu, cpu):
        torch.testing.assert_close(a.cpu(), b, **tol)


def test_device_seed(cuda_ops):
    mu, rho = _params((40, 30), torch.float32)
    host = cuda_ops.sample_weight(mu, rho, seed_tensor(2 ** 63 + 5), 0, 0.5, 0.1, 0.4)
    dev = cuda_ops.sample_weight(mu, rho, seed_tensor(2 ** 63 + 5, device=DEV), 0, 0.5, 0.1, 0.4)
    for a, b in zip(host, dev):
        assert torch.equal(a, b)
    one = torch.ones((), device=DEV)
    gh = cuda_ops.sample_weight_backward(None, one, one, mu, rho, seed_tensor(9), 0, 0.5, 0.1, 0.4, True)
    gd = cuda_ops.sample_weight_backward(None, one, one, mu, rho, seed_tensor(9, device=DEV), 0, 0.5, 0.1, 0.4, True)
    for a, b in zip(gh, gd):
        assert torch.equal(a, b)
    assert torch.equal(cuda_ops.philox_normal(mu, seed_tensor(9), 0),
                       cuda_ops.philox_normal(mu, seed_tensor(9, device=DEV), 0))


def test_non_contiguous_and_empty_on_cuda(cuda_ops):
    base_mu, base_rho = _params((12, 10), torch.float32)
    mu, rho = base_mu.t()[::2], base_rho.t()[::2]
    seed = seed_tensor(4)
    a = cuda_ops.sample_weight(mu, rho, seed, 0, 0.5, 0.1, 0.4)
    b = cuda_ops.sample_weight(mu.contiguous(), rho.contiguous(), seed, 0, 0.5, 0.1, 0.4)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-7)
    empty = torch.empty(0, 3, device=DEV)
    w, lq, lp = cuda_ops.sample_weight(empty, empty, seed, 0, 0.5, 0.1, 0.4)
    assert w.shape == (0, 3) and lq.item() == 0.0 and lp.item() == 0.0


def test_cuda_errors(cuda_ops):
    mu, rho = _params((3, 4), torch.float32)
    with pytest.raises(ValueError, match="rho.*device"):
        cuda_ops.sample_weight(mu, rho.cpu(), seed_tensor(1), 0, 0.5, 0.1, 0.4)
    layer = BayesianLinear(4, 2).to(DEV)
    with pytest.raises(ValueError, match="input.*device"):
        layer(torch.randn(3, 4))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias", [True, False])
def test_layer_cpu_gpu_parity(cuda_ops, dtype, bias):
    torch.manual_seed(0)
    cpu_layer = BayesianLinear(33, 17, bias=bias, prior_pi=0.5, prior_sigma_1=0.3, prior_sigma_2=1.5,
                               posterior_rho_init=-3.0, dtype=dtype)
    gpu_layer = BayesianLinear(33, 17, bias=bias, prior_pi=0.5, prior_sigma_1=0.3, prior_sigma_2=1.5,
                               posterior_rho_init=-3.0, dtype=dtype).to(DEV)
    gpu_layer.load_state_dict(cpu_layer.state_dict())
    x = torch.randn(2, 5, 33, dtype=dtype)
    results = []
    for layer, dev in ((cpu_layer, "cpu"), (gpu_layer, DEV)):
        xd = x.to(dev).detach().requires_grad_()  # a leaf of its own on each device
        torch.manual_seed(42)  # seeds come from the CPU generator on every device
        y = layer(xd)
        loss = (y ** 2).sum() + 0.1 * layer.kl_divergence()
        loss.backward()
        results.append((y.detach().cpu(), layer.log_variational_posterior.detach().cpu(),
                        layer.log_prior.detach().cpu(), xd.grad.cpu(),
                        {n: p.grad.cpu() for n, p in layer.named_parameters()}))
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    (yc, qc, pc, xc, gc), (yg, qg, pg, xg, gg) = results
    torch.testing.assert_close(yg, yc, **tol)
    torch.testing.assert_close(qg, qc, **tol)
    torch.testing.assert_close(pg, pc, **tol)
    torch.testing.assert_close(xg, xc, **tol)
    for name in gc:
        torch.testing.assert_close(gg[name], gc[name], **tol, msg=lambda m, name=name: f"{name}: {m}")
    # frozen forward on the GPU (BLiTZ crashed here with bias=False)
    gpu_layer.freeze = True
    torch.testing.assert_close(gpu_layer(x.to(DEV)).cpu(), F.linear(x, cpu_layer.weight_mu, cpu_layer.bias_mu), **tol)


def test_ops_run_on_current_stream(cuda_ops):
    """The op must read its inputs on the caller's current stream: inputs written on a side stream
    behind a long sleep are only correct there."""
    n = 1 << 16
    mu_src, rho_src = _params((n,), torch.float32)
    mu = torch.zeros(n, device=DEV)
    rho = torch.zeros(n, device=DEV)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    seed = seed_tensor(5)
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)  # keeps `side` busy long enough to expose a wrong stream
        mu.copy_(mu_src)
        rho.copy_(rho_src)
        w, log_q, log_p = cuda_ops.sample_weight(mu, rho, seed, 0, 0.5, 0.1, 0.4)
        eps = cuda_ops.philox_normal(mu, seed, 0)
        one = torch.ones((), device=DEV)
        g_mu, g_rho, w_bw = cuda_ops.sample_weight_backward(None, one, one, mu, rho, seed, 0, 0.5, 0.1, 0.4, True)
        std = rho.exp()
        y = cuda_ops.lrt_output_(std, mu, seed, 2)
        half_u = cuda_ops.lrt_noise_grad(mu, std, seed, 2)
    side.synchronize()
    ref = cuda_ops.sample_weight(mu_src, rho_src, seed, 0, 0.5, 0.1, 0.4)
    for a, b in zip((w, log_q, log_p), ref):
        assert torch.equal(a, b)
    assert torch.equal(w_bw, ref[0])
    assert torch.equal(eps, cuda_ops.philox_normal(mu_src, seed, 0))
    std_ref = rho_src.exp()
    assert torch.equal(y, cuda_ops.lrt_output_(std_ref, mu_src, seed, 2))
    assert torch.equal(half_u, cuda_ops.lrt_noise_grad(mu_src, std_ref, seed, 2))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("numel", [5, 4099, (1 << 18) + 3])
def test_lrt_noise_ops_on_cuda(cuda_ops, dtype, numel):
    """lrt_output_ / lrt_noise_grad on the device: the definition with the device's philox_normal,
    the CPU's result on the same seed, and the same with the seed in device memory."""
    gen = torch.Generator().manual_seed(2)
    mean, grad = (torch.randn(numel, generator=gen, dtype=torch.float64).to(dtype) for _ in range(2))
    var = torch.rand(numel, generator=gen, dtype=torch.float64).to(dtype)
    var[0] = 0  # no derivative there: a 0 gradient
    var[1] = -1e-4  # rounded below 0: std 0
    std_cpu = var.clone()
    y_cpu = cuda_ops.lrt_output_(std_cpu, mean, seed_tensor(321), 2)
    u_cpu = cuda_ops.lrt_noise_grad(grad, std_cpu, seed_tensor(321), 2)
    cross = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    for seed in (seed_tensor(321), seed_tensor(321, device=DEV)):
        std = var.to(DEV)
        y = cuda_ops.lrt_output_(std, mean.to(DEV), seed, 2)
        eps = cuda_ops.philox_normal(std, seed, 2)
        torch.testing.assert_close(std, var.to(DEV).clamp_min(0).sqrt(), **_tol(dtype))
        torch.testing.assert_close(y, mean.to(DEV) + std * eps, **_tol(dtype))
        u = cuda_ops.lrt_noise_grad(grad.to(DEV), std, seed, 2)
        ref_u = torch.where(std > 0, grad.to(DEV) * eps / std / 2, torch.zeros((), dtype=dtype, device=DEV))
        torch.testing.assert_close(u, ref_u, **_tol(dtype))
        assert u[0] == 0 and u[1] == 0 and std[1] == 0
        for a, b in ((y, y_cpu), (std, std_cpu), (u, u_cpu)):
            torch.testing.assert_close(a.cpu(), b, **cross)


@pytest.mark.parametrize("seeds_on", ["cpu", DEV, "strided " + DEV])
def test_lrt_noise_seed_groups_on_cuda(cuda_ops, seeds_on):
    """N seeds (the vectorised ELBO's LRT samples): group s of the elements as a single-seed call
    with seeds[s], on the device (a launch per group) and as on the CPU. "strided": a column of a
    seed table, as the vectorised ELBO passes each layer call's seeds."""
    gen = torch.Generator().manual_seed(4)
    mean, grad = (torch.randn(3, 1031, generator=gen) for _ in range(2))
    var = torch.rand(3, 1031, generator=gen)
    values = [9, -2 ** 62, 2 ** 62 + 1]
    if seeds_on.startswith("strided"):
        seeds = torch.tensor([[v, 0] for v in values], device=DEV)[:, 0]
        assert not seeds.is_contiguous()
    else:
        seeds = torch.tensor(values, device=seeds_on)
    std = var.to(DEV)
    y = cuda_ops.lrt_output_(std, mean.to(DEV), seeds, 2)
    u = cuda_ops.lrt_noise_grad(grad.to(DEV), std, seeds, 2)
    for s in range(3):
        std_s = var[s].to(DEV)
        assert torch.equal(y[s], cuda_ops.lrt_output_(std_s, mean[s].to(DEV), seeds[s:s + 1], 2))
        assert torch.equal(u[s], cuda_ops.lrt_noise_grad(grad[s].to(DEV), std_s, seeds[s:s + 1], 2))
    std_cpu = var.clone()
    y_cpu = cuda_ops.lrt_output_(std_cpu, mean, seeds.cpu(), 2)
    u_cpu = cuda_ops.lrt_noise_grad(grad, std_cpu, seeds.cpu(), 2)
    for a, b in ((y, y_cpu), (std, std_cpu), (u, u_cpu)):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-5, atol=1e-5)


def test_cuda_graph_replay_picks_up_new_device_seed(backend):
    if backend != "compiled" or not _has_cuda_kernels():
        pytest.skip("graph capture needs the compiled CUDA kernels (the fallback reads the seed on the host)")
    ops = torch.ops.bayes_ext
    mu, rho = _params((64, 32), torch.float32)
    seed = seed_tensor(1, device=DEV)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        ops.sample_weight(mu, rho, seed, 0, 0.5, 0.1, 0.4)  # warm up
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        w, log_q, log_p = ops.sample_weight(mu, rho, seed, 0, 0.5, 0.1, 0.4)
    for s in (7, 8):
        seed.fill_(s)
        graph.replay()
        torch.cuda.synchronize()
        ref = ops.sample_weight(mu, rho, seed_tensor(s), 0, 0.5, 0.1, 0.4)
        for a, b in zip((w, log_q, log_p), ref):
            assert torch.equal(a, b)


def test_sequential_model_on_cuda(cuda_ops):
    torch.manual_seed(0)
    model = torch.nn.Sequential(BayesianLinear(8, 16), torch.nn.ReLU(), BayesianLinear(16, 3)).to(DEV)
    x = torch.randn(5, 8, device=DEV, requires_grad=True)
    y = model(x)
    (y.sum() + bayes_ext.losses.kl_divergence_from_nn(model)).backward()
    assert y.device.type == "cuda" and x.grad is not None
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_model_kl_on_cuda_equals_the_cpu_models(cuda_ops):
    # four layers: kl_divergence_from_nn stacks their terms (a cat kernel on CUDA)
    torch.manual_seed(0)
    cpu = torch.nn.Sequential(*[BayesianLinear(8, 8, posterior_rho_init=-3.0) for _ in range(4)])
    gpu = copy.deepcopy(cpu).to(DEV)
    x = torch.randn(5, 8)
    kls, grads = [], []
    for model, inp in ((cpu, x), (gpu, x.to(DEV))):
        torch.manual_seed(3)
        model(inp)
        kl = bayes_ext.losses.kl_divergence_from_nn(model)
        kl.backward()
        kls.append(kl.cpu())
        grads.append([p.grad.cpu() for p in model.parameters()])
    assert kls[1].shape == () and torch.isfinite(kls[1])
    torch.testing.assert_close(kls[1], kls[0], rtol=1e-5, atol=1e-3)
    for g_gpu, g_cpu in zip(grads[1], grads[0]):
        torch.testing.assert_close(g_gpu, g_cpu, rtol=1e-4, atol=1e-5)


def _capture(fn):
    """fn() captured into a CUDA graph after one warm-up call on a side stream (as torch's docs do)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph, out


def test_captured_layer_draws_fresh_noise_on_every_replay(backend):
    """A layer's seed is drawn inside the graph (torch's CUDA generator, graph-safe), so replays are
    new Monte Carlo samples, each one a valid sample: within 6 sd of the mean-weight output."""
    torch.manual_seed(0)
    layer = BayesianLinear(32, 16, posterior_rho_init=-2.0).to(DEV)
    x = torch.randn(4, 32, device=DEV)
    with torch.no_grad():
        if backend == "python":
            with pytest.raises(RuntimeError, match="pure-PyTorch backend cannot run inside CUDA graph capture"):
                _capture(lambda: layer(x))
            return
        if not _has_cuda_kernels():
            pytest.skip("the compiled extension was built without CUDA kernels")
        graph, y = _capture(lambda: layer(x))
        outs = []
        for _ in range(3):
            graph.replay()
            outs.append(y.clone())
        torch.cuda.synchronize()
        mean = F.linear(x, layer.weight_mu, layer.bias_mu)
        sd = (F.linear(x * x, F.softplus(layer.weight_rho) ** 2) + F.softplus(layer.bias_rho) ** 2).sqrt()
    for a, b in zip(outs, outs[1:]):
        assert not torch.equal(a, b), "two replays drew the same noise"
    for out in outs:
        assert torch.isfinite(out).all()
        assert ((out - mean).abs() < 6 * sd).all()


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16])
def test_captured_training_step_equals_the_eager_step(backend, x_dtype):
    """Forward, loss and backward of the layer op captured in one CUDA graph (how
    bench/graphed_step.py times a whole model): with the seed in device memory, each replay gives
    the eager step's loss and gradients for the seed it finds there (fp32, and bf16 autocast, where
    the sampling kernel writes W in bf16)."""
    if backend != "compiled" or not _has_cuda_kernels():
        pytest.skip("graph capture needs the compiled CUDA kernels")
    from bayes_ext import functional as BF
    gen = torch.Generator().manual_seed(4)
    params = [t.to(DEV).requires_grad_() for t in (torch.randn(48, 40, generator=gen) * 0.3,
                                                   torch.randn(48, 40, generator=gen) - 3,
                                                   torch.randn(48, generator=gen) * 0.3,
                                                   torch.randn(48, generator=gen) - 3)]
    x = torch.randn(6, 40, generator=gen).to(DEV).requires_grad_()

    def step(seed):
        for t in params + [x]:
            t.grad = None
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=x_dtype != torch.float32, cache_enabled=False):
            y, log_q, log_p = BF.bayesian_linear(x, *params, seed=seed)
        loss = y.float().sum() + (log_q - log_p)
        loss.backward()
        return loss

    seed = seed_tensor(1, device=DEV)
    graph, loss = _capture(lambda: step(seed))
    captured_grads = [t.grad for t in params + [x]]
    losses = []
    for s in (7, 8):
        seed.fill_(s)
        graph.replay()
        got = [loss.clone()] + [g.clone() for g in captured_grads]
        ref = [step(seed_tensor(s, device=DEV)).detach()] + [t.grad for t in params + [x]]
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b)
        losses.append(got[0])
    assert not torch.equal(losses[0], losses[1]), "the replays did not read the new seed"


@pytest.mark.parametrize("start", [0, 1, 4, 6])
@pytest.mark.parametrize("unaligned", [False, True])
def test_vectorised_and_element_paths_agree(cuda_ops, start, unaligned):
    """float32 tensors that start a Philox block at a 16-byte-aligned address take the kernels'
    16-byte path; an offset view or a stream start inside a block takes the element loop. Both
    must give the CPU's values (and the backward's)."""
    n = 4 * 257 + 3  # a partial last block too
    mu_big, rho_big = _params((n + 1,), torch.float32)
    mu, rho = (mu_big[1:], rho_big[1:]) if unaligned else (mu_big[:n].clone(), rho_big[:n].clone())
    seed, prior = seed_tensor(21), (0.5, 0.3, 1.5)
    gpu = cuda_ops.sample_weight(mu, rho, seed, 2, *prior, start)
    cpu = cuda_ops.sample_weight(mu.cpu(), rho.cpu(), seed, 2, *prior, start)
    for a, b in zip(gpu, cpu):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-5, atol=1e-5)
    grad_w = torch.randn(n)
    glq, glp = torch.tensor(0.3), torch.tensor(-0.7)
    gpu = cuda_ops.sample_weight_backward(grad_w.to(DEV), glq.to(DEV), glp.to(DEV), mu, rho, seed, 2, *prior, True,
                                          start)
    cpu = cuda_ops.sample_weight_backward(grad_w, glq, glp, mu.cpu(), rho.cpu(), seed, 2, *prior, True, start)
    for a, b in zip(gpu, cpu):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("start", [0, 6])
@pytest.mark.parametrize("unaligned", [False, True])
def test_noise_only_on_cuda(cuda_ops, start, unaligned):
    """sample_weight(noise_only=True) (Flipout's dW) in both kernel paths: the device's own sample
    minus mu with its log q / log p; the backward keeps grad_w out of grad_mu (also with grad_mu in
    grad_w's memory) and returns the noise; all of it close to the CPU's."""
    n = 4 * 257 + 3
    mu_big, rho_big = _params((n + 1,), torch.float32)
    mu, rho = (mu_big[1:], rho_big[1:]) if unaligned else (mu_big[:n].clone(), rho_big[:n].clone())
    seed, prior = seed_tensor(23), (0.5, 0.3, 1.5)
    w, log_q, log_p = cuda_ops.sample_weight(mu, rho, seed, 0, *prior, start)
    dw, q, p = cuda_ops.sample_weight(mu, rho, seed, 0, *prior, start, True)
    torch.testing.assert_close(dw, w - mu, rtol=0, atol=0)
    assert torch.equal(q, log_q) and torch.equal(p, log_p)
    cpu = cuda_ops.sample_weight(mu.cpu(), rho.cpu(), seed, 0, *prior, start, True)
    for a, b in zip((dw, q, p), cpu):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-5, atol=1e-5)
    grad_w = torch.randn(n, device=DEV)
    glq, glp = torch.tensor(0.3, device=DEV), torch.tensor(-0.7, device=DEV)
    g_mu, g_rho, w_bw = cuda_ops.sample_weight_backward(grad_w, glq, glp, mu, rho, seed, 0, *prior, True, start)
    n_mu, n_rho, dw_bw = cuda_ops.sample_weight_backward(grad_w, glq, glp, mu, rho, seed, 0, *prior, True, start, True)
    torch.testing.assert_close(n_mu, g_mu - grad_w, rtol=0, atol=1e-6)
    torch.testing.assert_close(n_rho, g_rho, rtol=0, atol=0)
    torch.testing.assert_close(dw_bw, w_bw - mu, rtol=0, atol=0)
    shared, out_rho = grad_w.clone(), torch.empty_like(rho)
    cuda_ops.sample_weight_backward_into(shared, out_rho, shared, glq, glp, mu, rho, seed, 0, *prior, False, start,
                                         True)
    assert torch.equal(shared, n_mu) and torch.equal(out_rho, n_rho)
    cpu = cuda_ops.sample_weight_backward(grad_w.cpu(), glq.cpu(), glp.cpu(), mu.cpu(), rho.cpu(), seed, 0, *prior,
                                          True, start, True)
    for a, b in zip((n_mu, n_rho, dw_bw), cpu):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(5, 3), (33, 65), (512, 2050), "unaligned", "float64"])
def test_weight_and_bias_in_one_launch_are_the_two_calls(cuda_ops, dtype, shape):
    """The layer op's one-launch sampling of W and b (and its backward): the same bits as
    sample_weight_as / sample_weight_backward of each, log q / log p included (W's blocks then b's,
    each on the grid of its own launch). Partial Philox blocks (5 x 3, a bias of 33), a weight over
    many CUDA blocks (512 x 2050), and the cases the kernel leaves to the separate calls: a weight
    not 16-byte aligned, float64 parameters."""
    from helpers import check_weight_bias_ops_are_two_calls
    if cuda_ops is not torch.ops.bayes_ext:
        pytest.skip("a compiled-backend op")
    weight_mu, weight_rho, bias_mu, bias_rho = _weight_bias_params(shape)
    out_dtype = torch.float64 if weight_mu.dtype == torch.float64 and dtype == torch.float32 else dtype
    check_weight_bias_ops_are_two_calls(cuda_ops, weight_mu, weight_rho, bias_mu, bias_rho, seed_tensor(99).to(DEV),
                                        out_dtype)


def test_weight_and_bias_sampling_launches_one_kernel_each_way(cuda_ops):
    """The layer op's weight-and-bias calls run the one-launch kernels (the test above holds their
    values). Its own test, as CUPTI (kernel names in the profiler) is unavailable under
    compute-sanitizer, which bench/gpu_check.sh runs the other tests under."""
    from helpers import check_weight_bias_ops_are_two_calls
    if cuda_ops is not torch.ops.bayes_ext:
        pytest.skip("a compiled-backend op")
    with torch.profiler.profile() as prof:
        check_weight_bias_ops_are_two_calls(cuda_ops, *_weight_bias_params((33, 65)), seed_tensor(99).to(DEV),
                                            torch.bfloat16)
    events = prof.key_averages()
    for kernel in ("forward_pair_kernel", "backward_pair_kernel"):
        assert sum(e.count for e in events if kernel in e.key) == 1, [e.key for e in events]


def _weight_bias_params(shape):
    if shape == "unaligned":
        flat_mu, flat_rho = _params((1 + 40 * 24,), torch.float32)
        weight_mu, weight_rho = flat_mu[1:].view(40, 24), flat_rho[1:].view(40, 24)
        assert weight_mu.data_ptr() % 16 != 0
    else:
        param_dtype = torch.float64 if shape == "float64" else torch.float32
        weight_mu, weight_rho = _params((40, 24) if shape == "float64" else shape, param_dtype)
    bias_mu, bias_rho = _params(weight_mu.shape[:1], weight_mu.dtype, seed=1)
    return weight_mu, weight_rho, bias_mu, bias_rho


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("with_kl", [True, False])
@pytest.mark.parametrize("shape", [(7,), (33, 65), (64, 128), "unaligned"])
def test_sample_weight_as_writes_the_cast_sample(cuda_ops, dtype, with_kl, shape):
    """The CUDA kernel writing W straight in bf16 / fp16 (the layer op under autocast): the same bits
    as sample_weight's fp32 W cast by torch, and with_kl the same log q / log p bit for bit (same
    grid, same sums). Whole and partial Philox blocks, and mu / rho not 16-byte aligned (a view one
    element in: the element-wise kernel)."""
    if cuda_ops is not torch.ops.bayes_ext:
        pytest.skip("a compiled-backend op")
    if shape == "unaligned":
        flat_mu, flat_rho = _params((1 + 40 * 24,), torch.float32)
        mu, rho = flat_mu[1:].view(40, 24), flat_rho[1:].view(40, 24)
        assert mu.data_ptr() % 16 != 0
    else:
        mu, rho = _params(shape, torch.float32)
    seed = seed_tensor(99).to(DEV)  # a device seed, as inside graph capture
    w, log_q, log_p = cuda_ops.sample_weight_as(mu, rho, seed, 1, 0.5, 0.1, 0.4, dtype, with_kl)
    ref_w, ref_q, ref_p = cuda_ops.sample_weight(mu, rho, seed, 1, 0.5, 0.1, 0.4)
    assert w.dtype == dtype and w.shape == mu.shape and w.device.type == "cuda"
    assert torch.equal(w, ref_w.to(dtype))
    if with_kl:
        assert torch.equal(log_q, ref_q) and torch.equal(log_p, ref_p)
    else:
        assert log_q.numel() == 0 and log_p.numel() == 0
