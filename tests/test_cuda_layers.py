"""CUDA, beyond the core op (tests/test_cuda.py): the other ops against their CPU results on the
same seeds, CPU-GPU parity of every layer and estimator, and mixed precision (fp16 / bf16 autocast)
on the GPU. Skipped without a GPU; bench/gpu_check.sh runs them on the GPU machine."""
import contextlib

import pytest
import torch

from bayes_ext import _backend
from bayes_ext.modules import (BayesianConv2d, BayesianEmbedding, BayesianGRU, BayesianLinear, BayesianLSTM)
from helpers import seed_tensor

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA is not available")]
DEV = "cuda"
F32 = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture
def cuda_ops(backend):
    if backend == "compiled" and not torch._C._dispatch_has_kernel_for_dispatch_key("bayes_ext::gaussian_kl", "CUDA"):
        pytest.skip("the compiled extension was built without CUDA kernels")
    return _backend.ops()


def _params(shape, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=dtype) * 0.5, torch.randn(shape, generator=gen, dtype=dtype) - 3


def _cpu_gpu(fn, *cpu_args):
    """fn on the CPU tensors and on their CUDA copies."""
    return fn(*cpu_args), fn(*(a.to(DEV) for a in cpu_args))


def _close(a, b, **tol):
    if isinstance(a, (tuple, list)):
        for x, y in zip(a, b):
            _close(x, y, **tol)
    elif isinstance(a, torch.Tensor) and a.numel():
        torch.testing.assert_close(b.cpu(), a, **tol)


def test_closed_form_kl_ops(cuda_ops):
    mu, rho = _params((300, 70))
    _close(*_cpu_gpu(lambda m, r: cuda_ops.gaussian_kl(m, r, 0.3), mu, rho), rtol=1e-5, atol=1e-3)
    g = torch.tensor(0.7)
    _close(*_cpu_gpu(lambda m, r: cuda_ops.gaussian_kl_backward(g.to(m.device), m, r, 0.3), mu, rho), **F32)
    _close(*_cpu_gpu(lambda m, r: cuda_ops.lrt_weight_forward(m, r, 0.3), mu, rho), rtol=1e-5, atol=1e-3)

    def lrt_backward(m, r):
        gm, gr = torch.ones_like(m), torch.full_like(m, 0.5)
        s2 = cuda_ops.lrt_weight_backward_(gm, gr, g.to(m.device), m, r, 0.3)
        return gm, gr, s2
    _close(*_cpu_gpu(lrt_backward, mu, rho), **F32)


def test_sample_kl_and_multi_seed_ops(cuda_ops):
    mu, rho = _params((65, 33))
    seed, seeds = seed_tensor(5), torch.tensor([3, 4, 5], dtype=torch.int64)
    _close(*_cpu_gpu(lambda m, r: cuda_ops.sample_kl(m, r, seed.to(m.device), 0, 0.5, 0.3, 1.2), mu, rho),
           rtol=1e-5, atol=1e-3)
    _close(*_cpu_gpu(lambda m, r: cuda_ops.sample_weight_samples(m, r, seeds, 0, 0.5, 0.3, 1.2), mu, rho),
           rtol=1e-5, atol=1e-3)
    grad_w = torch.randn(3, 65, 33)
    glq, glp = torch.tensor([0.1, 0.2, 0.3]), torch.tensor([1.0, -1.0, 0.5])
    _close(*_cpu_gpu(lambda gw, m, r, q, p: cuda_ops.sample_weight_samples_backward(gw, q, p, m, r, seeds, 0, 0.5, 0.3,
                                                                                     1.2, True),
                     grad_w, mu, rho, glq, glp), **F32)


def test_rows_backward_add(cuda_ops):
    mu, rho = _params((50, 12))
    idx = torch.tensor([[3, 7, 3], [49, 0, 7]])
    grad_rows = torch.randn(2, 3, 12)

    def add(m, r, i, g):
        gm, gr = torch.ones_like(m), torch.ones_like(m)
        cuda_ops.sample_rows_backward_add_(gm, gr, g, m, r, i, seed_tensor(9).to(m.device), 0)
        return gm, gr
    _close(*_cpu_gpu(add, mu, rho, idx, grad_rows), **F32)


def _layer_parity(make, x, extra_loss=None, tol=F32):
    torch.manual_seed(0)
    cpu_layer = make()
    gpu_layer = make().to(DEV)
    gpu_layer.load_state_dict(cpu_layer.state_dict())
    results = []
    for layer, dev in ((cpu_layer, "cpu"), (gpu_layer, DEV)):
        torch.manual_seed(42)  # seeds come from the CPU generator on every device
        out = layer(x.to(dev))
        y = out[0] if isinstance(out, tuple) else out
        (y.float().pow(2).sum() + 0.1 * layer.kl_divergence()).backward()
        results.append((y.detach().cpu(), layer.kl_divergence().detach().cpu(),
                        [p.grad.detach().cpu() for p in layer.parameters()]))
    _close(results[0], results[1], **tol)


@pytest.mark.parametrize("estimator,kl", [("reparam", "mc"), ("lrt", "closed_form"), ("lrt", "mc"),
                                          ("flipout", "mc"), ("flipout", "closed_form")])
def test_linear_estimators_cpu_gpu_parity(cuda_ops, estimator, kl):
    prior = {"prior_pi": 0.5} if (estimator, kl) == ("lrt", "mc") else {}
    _layer_parity(lambda: BayesianLinear(33, 17, estimator=estimator, kl=kl, posterior_rho_init=-3.0, **prior),
                  torch.randn(6, 33))


@pytest.mark.parametrize("estimator", ["reparam", "lrt", "flipout"])
def test_conv_cpu_gpu_parity(cuda_ops, estimator):
    # cuDNN and the CPU convolution sum in other orders: a looser tolerance than the linear layer
    _layer_parity(lambda: BayesianConv2d(3, 5, 3, padding=1, estimator=estimator, posterior_rho_init=-3.0),
                  torch.randn(2, 3, 8, 8), tol=dict(rtol=1e-4, atol=1e-4))


@pytest.fixture
def no_tf32():
    """cuDNN's RNNs run fp32 matmuls in TF32 by default (10-bit mantissa: 1e-3 off the CPU); the
    parity tests compare full fp32."""
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


@pytest.mark.parametrize("cls", [BayesianLSTM, BayesianGRU])
def test_rnn_cpu_gpu_parity(cuda_ops, no_tf32, cls):
    _layer_parity(lambda: cls(6, 8, posterior_rho_init=-3.0), torch.randn(3, 7, 6), tol=dict(rtol=1e-4, atol=1e-4))


@pytest.mark.parametrize("kl", ["mc", "closed_form"])
def test_embedding_cpu_gpu_parity(cuda_ops, kl):
    torch.manual_seed(0)
    cpu_layer = BayesianEmbedding(40, 6, kl=kl, padding_idx=0)
    gpu_layer = BayesianEmbedding(40, 6, kl=kl, padding_idx=0).to(DEV)
    gpu_layer.load_state_dict(cpu_layer.state_dict())
    idx = torch.tensor([[0, 5, 5], [39, 2, 0]])
    results = []
    for layer, dev in ((cpu_layer, "cpu"), (gpu_layer, DEV)):
        torch.manual_seed(42)
        y = layer(idx.to(dev))
        (y.pow(2).sum() + 0.1 * layer.kl_divergence()).backward()
        results.append((y.detach().cpu(), layer.kl_divergence().detach().cpu(),
                        [p.grad.detach().cpu() for p in layer.parameters()]))
    _close(results[0], results[1], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("kind", ["linear", "lrt", "conv", "lstm", "gru"])
def test_autocast_on_cuda(cuda_ops, dtype, kind):
    """Under CUDA autocast the layer computes in the autocast dtype, mu / rho and
    their gradients stay float32, the KL is float32, and the result is close to the float32 run."""
    make = {"linear": lambda: BayesianLinear(16, 8, posterior_rho_init=-3.0),
            "lrt": lambda: BayesianLinear(16, 8, estimator="lrt", posterior_rho_init=-3.0),
            "conv": lambda: BayesianConv2d(4, 6, 3, posterior_rho_init=-3.0),
            "lstm": lambda: BayesianLSTM(16, 8, posterior_rho_init=-3.0),
            "gru": lambda: BayesianGRU(16, 8, posterior_rho_init=-3.0)}[kind]
    x = (torch.randn(2, 4, 9, 9) if kind == "conv" else torch.randn(3, 5, 16)).to(DEV)
    # The layer computes in the autocast dtype asked for. nn.LSTM does not under bf16: torch's autocast
    # wrapper of the cuDNN RNN casts to float16 whatever the dtype (pytorch#42385), a float16 output
    # with float16's range; the Bayesian LSTM / GRU run their recurrence in bf16 (rnn_bayesian_layer._fused).
    torch.manual_seed(0)
    layer = make().to(DEV)
    outs = []
    for enabled in (True, False):
        layer.zero_grad()
        torch.manual_seed(7)
        with torch.autocast("cuda", dtype=dtype, enabled=enabled):
            out = layer(x)
            y = out[0] if isinstance(out, tuple) else out
            kl = layer.kl_divergence()
        assert y.dtype == (dtype if enabled else torch.float32)
        assert kl.dtype == torch.float32
        (y.float().sum() + kl).backward()
        assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in layer.parameters())
        outs.append(y.float())
    tol = 2e-2 if dtype == torch.float16 else 8e-2
    torch.testing.assert_close(outs[0], outs[1], rtol=tol, atol=tol)


def test_backward_into_may_overwrite_grad_w(cuda_ops):
    """The linear backward passes its grad_w buffer as grad_mu (one weight-sized gradient fewer):
    the result must equal the out-of-place backward's."""
    mu, rho = (t.to(DEV) for t in _params((129, 67)))
    grad_w = torch.randn(129, 67, device=DEV)
    glq, glp = torch.tensor(0.3, device=DEV), torch.tensor(-0.7, device=DEV)
    seed = seed_tensor(11)
    ref_mu, ref_rho, ref_w = cuda_ops.sample_weight_backward(grad_w, glq, glp, mu, rho, seed, 0, 0.5, 0.3, 1.2, True)
    buf, grad_rho = grad_w.clone(), torch.empty_like(grad_w)
    w = cuda_ops.sample_weight_backward_into(buf, grad_rho, buf, glq, glp, mu, rho, seed, 0, 0.5, 0.3, 1.2, True, 0)
    torch.testing.assert_close(buf, ref_mu, rtol=0, atol=0)
    torch.testing.assert_close(grad_rho, ref_rho, rtol=0, atol=0)
    torch.testing.assert_close(w, ref_w, rtol=0, atol=0)


def test_mm_in_dtype(no_tf32):
    """The linear backward's grad_W under CUDA autocast: bf16 operands, an fp32 product accumulated
    without rounding to bf16 where torch has aten::mm.dtype (else the bf16 product, cast)."""
    from bayes_ext import functional as BF
    a = torch.randn(64, 33, device=DEV).bfloat16()
    b = torch.randn(33, 17, device=DEV).bfloat16()
    out = BF.mm_in_dtype(a, b, torch.float32)
    assert out.dtype == torch.float32
    exact = a.float() @ b.float()
    tol = 1e-5 if BF._MM_OUT_DTYPE[0] else 1e-2  # the fallback rounds the product to bf16 first
    torch.testing.assert_close(out, exact, rtol=tol, atol=tol)


def _layer_op_and_python_op(x, params, seed, g_out):
    """(outputs, input and parameter gradients) of bayes_ext::linear_reparam_rows (what eager CUDA
    calls of bayesian_linear take) and of the Python custom op, on the same seed."""
    from bayes_ext import functional as BF
    prior, results = (0.5, 0.3, 1.5), []
    for fn in (lambda: torch.ops.bayes_ext.linear_reparam_rows(x, *params, seed, *prior, params[0].shape[0]),
               lambda: BF._linear_reparam.op(x, *params, seed, *prior)):
        y, log_q, log_p = fn()
        loss = (y * g_out).float().sum() + 0.3 * log_q - 0.7 * log_p
        results.append((y, log_q, log_p) + torch.autograd.grad(loss, (x,) + params))
    return results


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_layer_op_equals_the_python_op_on_cuda(cuda_ops, x_dtype):
    """The one-call C++ layer op registered for CUDA: same values and gradients as the Python op, x
    in fp32 or in autocast's bf16 / fp16 with fp32 parameters (the op's sampling kernel writes W in
    x's dtype, the Python op casts an fp32 W: the same rounding)."""
    if cuda_ops is not torch.ops.bayes_ext:
        pytest.skip("a compiled-backend op")
    gen = torch.Generator().manual_seed(3)
    params = tuple(t.to(DEV).requires_grad_() for t in (torch.randn(33, 20, generator=gen) * 0.3,
                                                        torch.randn(33, 20, generator=gen) - 3,
                                                        torch.randn(33, generator=gen) * 0.3,
                                                        torch.randn(33, generator=gen) - 3))
    x = torch.randn(6, 5, 20, generator=gen).to(DEV, x_dtype).requires_grad_()
    g_out = torch.randn(6, 5, 33, generator=gen).to(DEV, x_dtype)
    got, ref = _layer_op_and_python_op(x, params, seed_tensor(5).to(DEV), g_out)
    for a, b in zip(got, ref):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    from bayes_ext import functional as BF
    with torch.profiler.profile() as prof:
        with torch.autocast("cuda", dtype=x_dtype, enabled=x_dtype != torch.float32):
            BF.bayesian_linear(x.detach().float(), *params, seed=seed_tensor(5))
    assert "bayes_ext::linear_reparam_rows" in {e.key for e in prof.key_averages()}


@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", ["conv2d_strided_grouped_dilated", "conv_transpose2d", "conv1d"])
def test_conv_layer_op_equals_the_python_op_on_cuda(cuda_ops, name, x_dtype):
    """bayes_ext::conv_reparam_layer (what eager CUDA calls of the conv layers take; W and b sampled in
    one launch where the bias has one value per weight row): the Python op's values and gradients,
    x in fp32 or in autocast's bf16 / fp16 with fp32 parameters (tests/test_conv_layer_op.py)."""
    if cuda_ops is not torch.ops.bayes_ext:
        pytest.skip("a compiled-backend op")
    from bayes_ext import functional_conv as BFC
    from test_conv_layer_op import PRIOR, _case
    x, params, conv = _case(name, True, torch.float32)
    x, params = x.to(DEV, x_dtype), tuple(p.to(DEV) for p in params)
    seed = seed_tensor(5).to(DEV)
    results = []
    # cuDNN's deterministic algorithms: its weight-gradient kernels may otherwise sum in any order
    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True, allow_tf32=False):
        for op in (torch.ops.bayes_ext.conv_reparam_layer, BFC._conv_reparam.op):
            leaves = (x.detach().requires_grad_(),) + tuple(p.detach().requires_grad_() for p in params)
            y, log_q, log_p = op(*leaves, seed, *conv, *PRIOR)
            loss = y.float().pow(2).sum() + 0.3 * log_q - 0.7 * log_p
            results.append((y, log_q, log_p) + torch.autograd.grad(loss, leaves))
    for a, b in zip(*results):
        assert a.dtype == b.dtype and a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("amp", [None, torch.bfloat16, torch.float16])
def test_fast_path_equals_the_checked_path_on_cuda(cuda_ops, monkeypatch, amp):
    """bayesian_linear's eager fast path (x cast to autocast's dtype in front of the layer op, the
    Python checks skipped) against the checked path: the same values and gradients, bit for bit."""
    from bayes_ext import functional as BF
    layer = BayesianLinear(20, 33).to(DEV)
    x = torch.randn(6, 20, generator=torch.Generator().manual_seed(4)).to(DEV).requires_grad_()

    def run():
        layer.zero_grad(set_to_none=True)
        x.grad = None
        torch.manual_seed(8)
        with torch.autocast("cuda", dtype=amp or torch.bfloat16, enabled=amp is not None):
            y = layer(x)
        (y.float().sum() + layer.log_variational_posterior - layer.log_prior).backward()
        return [y.detach(), x.grad] + [p.grad for p in layer.parameters()]

    fast = run()
    monkeypatch.setattr(BF, "_layer_op_input", lambda *args: None)
    for a, b in zip(fast, run()):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("path", ["layer op", "python op"])
def test_train_step_memory_is_nn_linear_plus_one_weight(cuda_ops, path):
    """Peak memory of a training step's forward and backward: nn.Linear's plus one weight copy
    (grad_rho, the gradient nn.Linear does not have). The backward rebuilds W for dL/dx and frees it
    before grad_mu / grad_rho exist, and grad_W's buffer becomes grad_mu in place (before: three
    weight-sized buffers at once, two copies above nn.Linear). The gradients are taken with
    autograd.grad, so what is measured is the ops' memory, not whether AccumulateGrad may steal a
    gradient. The pure-PyTorch fallback (the no-compiler path) streams through eager temporaries and
    is not held to this."""
    from bayes_ext import functional as BF
    if cuda_ops is not torch.ops.bayes_ext:
        pytest.skip("the compiled kernels' memory")
    out_f, in_f = 1024, 1024
    weight_bytes = out_f * in_f * 4
    x = torch.randn(64, in_f, device=DEV, requires_grad=True)
    linear = torch.nn.Linear(in_f, out_f, device=DEV)
    params, seed = tuple(BayesianLinear(in_f, out_f).to(DEV).parameters()), seed_tensor(9).to(DEV)

    def linear_step():
        return torch.autograd.grad(linear(x).sum(), (x,) + tuple(linear.parameters()))

    def bayes_step():
        if path == "layer op":
            y, log_q, log_p = torch.ops.bayes_ext.linear_reparam_rows(x, *params, seed, 1.0, 0.1, 0.4, out_f)
        else:
            y, log_q, log_p = BF._linear_reparam.op(x, *params, seed, 1.0, 0.1, 0.4)
        return torch.autograd.grad(y.sum() + log_q - log_p, (x,) + params)

    def peak(step):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        grads = step()
        torch.cuda.synchronize()
        del grads
        return torch.cuda.max_memory_allocated() - base
    for step in (linear_step, bayes_step):  # warm-up: cuBLAS workspaces, the allocator's pools
        step()
    extra = peak(bayes_step) - peak(linear_step)
    assert extra <= 1.1 * weight_bytes, f"{extra / weight_bytes:.2f} weight copies above nn.Linear"


@pytest.mark.parametrize("name", ["regression", "lrt", "flipout"])
def test_vectorised_sample_elbo_equals_the_loop_on_cuda(cuda_ops, name):
    """sample_elbo's batched samples on the GPU (reparam and Flipout layers' multi-seed sampling, LRT
    layers' seed groups of output noise) against the sequential loop: the same loss, gradients, KL."""
    from test_vectorised_elbo import MODELS, _assert_same, _elbo_step
    cls, data = MODELS[name]
    model = cls().to(DEV)
    x, y, crit = (t.to(DEV) if isinstance(t, torch.Tensor) else t for t in data())
    loop = _elbo_step(model, x, y, crit, 8, vectorized=False)
    batched = _elbo_step(model, x, y, crit, 8, vectorized=True)
    _assert_same(batched, loop)


@pytest.mark.parametrize("name", ["linear", "linear_lrt", "linear_flipout", "conv_lrt", "lstm",
                                  "embedding_closed_form"])
def test_recorded_backwards_have_exact_second_derivatives_on_cuda(cuda_ops, name):
    """create_graph=True on the GPU: the C++ layer op (AutogradCUDA) and the Python ops differentiate
    their rebuilt forward (tests/test_double_backward.py's gradgradcheck, on CUDA tensors)."""
    from test_double_backward import layer_function
    f, inputs = layer_function(name, DEV)
    # cuDNN's RNN has no double backward (nn.LSTM raises the same, naming the cudnn flag to clear):
    # the LSTM's recurrence runs on torch's native CUDA kernels here, its weight sampling as always
    with torch.backends.cudnn.flags(enabled=False) if name == "lstm" else contextlib.nullcontext():
        assert torch.autograd.gradgradcheck(f, inputs, eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["linear", "linear_lrt", "linear_flipout", "conv_lrt",
                                  "embedding_closed_form_padding"])
def test_torch_func_grad_and_per_sample_grads_on_cuda(cuda_ops, name):
    """torch.func on the GPU (tests/test_func_transforms.py): grad equals autograd on the same seed,
    and vmap(grad) per-sample gradients equal the one-by-one ones."""
    from torch.func import functional_call, grad, vmap
    from test_func_transforms import assert_grads_close, detached_params, make, output
    from bayes_ext.losses import kl_divergence_from_nn
    layer, x = make(name)
    layer, x = layer.to(DEV), x.to(DEV)
    params = detached_params(layer)

    def loss(p, inp):
        return output(functional_call(layer, p, (inp,))).square().sum() + kl_divergence_from_nn(layer)

    torch.manual_seed(7)
    eager = loss(dict(layer.named_parameters()), x)
    eager.backward()
    torch.manual_seed(7)
    assert_grads_close(grad(loss)(params, x), {k: v.grad for k, v in layer.named_parameters()})
    torch.manual_seed(7)
    per_sample = vmap(grad(lambda p, s: loss(p, s[None])), in_dims=(None, 0), randomness="same")(params, x)
    for i in range(x.shape[0]):
        torch.manual_seed(7)
        assert_grads_close({k: v[i] for k, v in per_sample.items()}, grad(lambda p: loss(p, x[i][None]))(params))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("name", ["linear", "linear_lrt", "linear_flipout", "conv2d", "lstm", "gru", "embedding"])
def test_low_precision_layer_is_its_float32_self_under_autocast_on_cuda(cuda_ops, name, dtype):
    """model.half() / .to(torch.bfloat16) on the GPU: output, KL and gradients bit for bit those of
    the float32 layer under autocast on the same seed (tests/test_low_precision.py)."""
    from test_low_precision import check_low_precision_layer
    check_low_precision_layer(name, dtype, DEV)
