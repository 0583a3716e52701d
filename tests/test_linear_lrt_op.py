"""bayes_ext::linear_lrt_rows, the CPU's one-call local-reparameterisation layer with its autograd
in C++ (csrc/cpu/linear_lrt_cpu.cpp): eager CPU calls of linear_lrt / linear_lrt_with_kl take it; it
must give the Python custom op's values and gradients (bit for bit for small layers, to float32
rounding where its GEMMs run side by side on two threads), whole and in row blocks, and reject bad
input with errors that name the argument."""
import pytest
import torch

from bayes_ext import functional as BF
from bayes_ext import functional_estimators as BFE

from helpers import (check_layer_op_rejects_bad_inputs, check_two_forward_step_gradients, detached_as,
                     layer_params)

F64 = torch.float64


def _run(fn, x, params, g_out, g_kl, need_x):
    """(outputs, gradients w.r.t. x (if need_x) and the parameters) of one call of fn."""
    inputs = ([x] if need_x else []) + [p for p in params if p is not None]
    y, std, kl = fn()
    loss = (y * g_out).sum() + g_kl * kl
    return (y.detach(), std.detach(), kl.detach()), torch.autograd.grad(loss, inputs)


@pytest.mark.parametrize("need_x", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("prior_sigma", [0.0, 0.7])  # 0: no KL
@pytest.mark.parametrize("block_rows", [None, 1, 3])  # None: the whole weight in one block
def test_equals_the_python_custom_op(compiled, monkeypatch, block_rows, prior_sigma, dtype, bias, need_x):
    params = layer_params(7, 9, bias, dtype)
    if block_rows is not None:  # the Python op's blocks must be the ones the C++ op is given
        monkeypatch.setattr(BF, "LRT_BLOCK_ELEMENTS", block_rows * 9)
    rows = BF._block_rows(params[0], BF.LRT_BLOCK_ELEMENTS)
    assert rows == (7 if block_rows is None else block_rows)
    x = torch.randn(4, 3, 9, dtype=dtype, requires_grad=need_x)
    x.data[0, 0] = 0  # an all-zero row: std = 0 without a bias (the subgradient 0, no NaN)
    g_out = torch.randn(4, 3, 7, dtype=dtype)
    seed = torch.tensor([2 ** 62 + 5])
    got = _run(lambda: compiled.linear_lrt_rows(x, *params, seed, prior_sigma, rows), x, params, g_out, 0.3, need_x)
    ref = _run(lambda: BFE._linear_lrt.op(x, *params, seed, prior_sigma), x, params, g_out, 0.3, need_x)
    for a, b in zip(got[0] + got[1], ref[0] + ref[1]):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b)
        assert torch.isfinite(a).all()


@pytest.mark.parametrize("need_x", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block_rows", [None, 3])
def test_lower_precision_x_equals_the_python_custom_op(compiled, monkeypatch, block_rows, low, bias, need_x):
    """x in bf16 / fp16 with float32 parameters (what CPU autocast hands the op): the GEMMs in x's
    dtype, mean, var, std and the KL in float32, y in x's dtype, the parameters' gradients in float32,
    bit for bit the Python op's; other dtype mixes are refused."""
    params = layer_params(7, 9, bias, torch.float32)
    if block_rows is not None:
        monkeypatch.setattr(BF, "LRT_BLOCK_ELEMENTS", block_rows * 9)
    rows = BF._block_rows(params[0], BF.LRT_BLOCK_ELEMENTS)
    x = torch.randn(4, 3, 9).to(low).requires_grad_(need_x)
    g_out = torch.randn(4, 3, 7).to(low)
    seed = torch.tensor([77])
    got = _run(lambda: compiled.linear_lrt_rows(x, *params, seed, 0.7, rows), x, params, g_out, 0.3, need_x)
    ref = _run(lambda: BFE._linear_lrt.op(x, *params, seed, 0.7), x, params, g_out, 0.3, need_x)
    y, std, kl = got[0]
    assert y.dtype == low and std.dtype == torch.float32 and kl.dtype == torch.float32
    assert all(g.dtype == torch.float32 for g in got[1][int(need_x):])
    for a, b in zip(got[0] + got[1], ref[0] + ref[1]):
        assert a.dtype == b.dtype and torch.equal(a, b)
    with pytest.raises(TypeError, match="x must have the dtype"):  # only lower than fp32 weights
        compiled.linear_lrt_rows(x.detach(), *detached_as(params, torch.float64), seed, 0.7, rows)


@pytest.mark.parametrize("block_rows", [None, 16])
# (batch, in, out): whole-weight GEMMs of 491K / 300K multiply-adds; in blocks of 16 rows 98K (side by
# side) and 24K (below side_by_side.h's 64K: one after the other)
@pytest.mark.parametrize("shape", [(64, 96, 80), (5, 300, 200)])
def test_side_by_side_gemms_give_the_python_ops_values(compiled, monkeypatch, two_threads, shape, block_rows):
    """On two threads the op runs its GEMMs in pairs, one per thread, once they are large enough
    (csrc/cpu/side_by_side.h): the Python op's values to float32 rounding (MKL may round a GEMM on
    one thread differently), whole and in row blocks."""
    batch, in_f, out_f = shape
    params = layer_params(out_f, in_f, True, torch.float32)
    if block_rows is not None:
        monkeypatch.setattr(BF, "LRT_BLOCK_ELEMENTS", block_rows * in_f)
    rows = BF._block_rows(params[0], BF.LRT_BLOCK_ELEMENTS)
    x = torch.randn(batch, in_f, requires_grad=True)
    g_out = torch.randn(batch, out_f)
    seed = torch.tensor([11])
    got = _run(lambda: compiled.linear_lrt_rows(x, *params, seed, 0.5, rows), x, params, g_out, 0.3, True)
    ref = _run(lambda: BFE._linear_lrt.op(x, *params, seed, 0.5), x, params, g_out, 0.3, True)
    for a, b in zip(got[0] + got[1], ref[0] + ref[1]):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-6 * float(b.abs().max()))


def test_interleaved_calls_of_other_layers_keep_their_values(compiled, monkeypatch):
    """sigma^2 is built in a per-thread scratch buffer that every call reuses (csrc/cpu/scratch.h):
    forwards of two layers of other shapes and dtypes (one in row blocks) before either backward,
    the backwards in the other order, must each give the Python op's values and gradients."""
    monkeypatch.setattr(BF, "LRT_BLOCK_ELEMENTS", 4 * 11)  # the Python op's blocks: the second layer's 4 rows
    layers = []
    for out_f, in_f, dtype, rows in ((7, 9, F64, 7), (13, 11, torch.float32, 4)):
        params = layer_params(out_f, in_f, True, dtype)
        x = torch.randn(5, in_f, dtype=dtype, requires_grad=True)
        layers.append((params, x, torch.randn(5, out_f, dtype=dtype), torch.tensor([out_f]), rows))

    def outputs(call):
        return [call(params, x, seed, rows) for params, x, _, seed, rows in layers]

    def gradients(outs):
        grads = []
        for (params, x, g_out, _, _), (y, _, kl) in reversed(list(zip(layers, outs))):
            grads.append(torch.autograd.grad((y * g_out).sum() + 0.3 * kl, [x, *params]))
        return grads[::-1]

    got = outputs(lambda params, x, seed, rows: compiled.linear_lrt_rows(x, *params, seed, 0.5, rows))
    ref = outputs(lambda params, x, seed, rows: BFE._linear_lrt.op(x, *params, seed, 0.5))
    for got_layer, ref_layer in zip(got, ref):
        for a, b in zip(got_layer, ref_layer):
            assert torch.equal(a.detach(), b.detach())
    for got_layer, ref_layer in zip(gradients(got), gradients(ref)):
        for a, b in zip(got_layer, ref_layer):
            assert torch.equal(a, b)


def _ops_called(fn):
    with torch.profiler.profile() as prof:
        fn()
    return {e.key for e in prof.key_averages()}


def test_the_lrt_functions_take_it_in_eager_cpu_calls(compiled):
    params = layer_params(4, 5, True)
    x = torch.randn(3, 5, dtype=F64)
    seed = torch.tensor([1])
    assert "bayes_ext::linear_lrt_rows" in _ops_called(lambda: BFE.linear_lrt(x, *params, seed=seed))
    assert "bayes_ext::linear_lrt_rows" in _ops_called(lambda: BFE.linear_lrt_with_kl(x, *params, seed=seed))
    params32 = [p.detach().float() for p in params]
    for low in (torch.bfloat16, torch.float16):  # x cast to autocast's dtype, the GEMMs in it inside the op
        with torch.autocast("cpu", dtype=low):
            names = _ops_called(lambda: BFE.linear_lrt_with_kl(x.float(), *params32, seed=seed))
            assert "bayes_ext::linear_lrt_rows" in names
            names = _ops_called(lambda: BFE.linear_lrt(x.float(), *params32, seed=seed))
            assert "bayes_ext::linear_lrt_rows" in names


@pytest.mark.parametrize("which", ["output", "kl"])
def test_backward_through_one_output_only(compiled, which):
    """An output that is not used gets no gradient from autograd; the C++ backward fills in zeros."""
    params = layer_params(5, 4, True)
    x = torch.randn(3, 4, dtype=F64, requires_grad=True)
    seed = torch.tensor([9])
    pick = {"output": lambda y, kl: y.sum(), "kl": lambda y, kl: kl}[which]
    inputs = (x,) + params
    y, _, kl = compiled.linear_lrt_rows(x, *params, seed, 0.5, 2)
    got = torch.autograd.grad(pick(y, kl), inputs, allow_unused=True)
    y, _, kl = compiled.linear_lrt_rows(x, *params, seed, 0.5, 2)
    ref = torch.autograd.grad(pick(y, kl) + 0 * (y.sum() + kl), inputs)
    for a, b in zip(got, ref):
        assert torch.equal(torch.zeros_like(b) if a is None else a, b)


@pytest.mark.parametrize("block_rows", [1, 5])
def test_gradcheck(compiled, block_rows):
    params = layer_params(5, 3, True)
    x = torch.randn(2, 3, dtype=F64, requires_grad=True)
    seed = torch.tensor([4])

    def fn(x, *p):
        y, _, kl = compiled.linear_lrt_rows(x, *p, seed, 0.8, block_rows)
        return y, kl
    assert torch.autograd.gradcheck(fn, (x,) + params, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_bad_inputs_name_the_argument(compiled):
    x, (wm, wr, bm, br), seed = check_layer_op_rejects_bad_inputs(compiled.linear_lrt_rows, (0.1,))
    y, std, _ = compiled.linear_lrt_rows(x, wm, wr, bm, br, seed, 0.1, 2)
    one = torch.ones(())
    with pytest.raises(ValueError, match="grad_y and std must have shape"):
        compiled.linear_lrt_rows_backward(y[:, :2], one, x, wm, wr, bm, br, seed, std, 0.1, 2, True, True, True)
    with pytest.raises(TypeError, match=r"grad_y must have the dtype of x \(Float\) and std that of weight_mu"):
        compiled.linear_lrt_rows_backward(y.double(), one, x, wm, wr, bm, br, seed, std, 0.1, 2, True, True, True)
    with pytest.raises(TypeError, match=r"std that of weight_mu \(Float\), got Float and BFloat16"):
        compiled.linear_lrt_rows_backward(y, one, x, wm, wr, bm, br, seed, std.bfloat16(), 0.1, 2, True, True, True)


def test_create_graph_keeps_dx_differentiable_in_the_upstream_gradient(backend):
    """backward(create_graph=True): dL/dx = c mu + x ((c eps / std) sigma^2) is linear in the upstream
    gradient c (the weights' terms constants), so d/dc |dL/dx|^2 = 2 A^T A c for that map A."""
    from bayes_ext import _backend
    params = layer_params(3, 5, True)
    x = torch.randn(4, 5, dtype=F64, requires_grad=True)
    c = torch.randn(4, 3, dtype=F64, requires_grad=True)
    seed = torch.tensor([5])
    y = BFE.linear_lrt(x, *params, seed=seed)
    grad_x, = torch.autograd.grad((y * c).sum(), x, create_graph=True)
    grad_x.pow(2).sum().backward()
    wm, wr, bm, br = (p.detach() for p in params)
    xd = x.detach()
    sigma2 = torch.nn.functional.softplus(wr) ** 2
    std = (xd * xd @ sigma2.t() + torch.nn.functional.softplus(br) ** 2).sqrt()
    eps = _backend.ops().philox_normal(std, seed, 2)
    c_ref = c.detach().clone().requires_grad_()
    dx = c_ref @ wm + xd * ((c_ref * eps / std) @ sigma2)
    torch.testing.assert_close(grad_x.detach(), (c.detach() @ wm + xd * ((c.detach() * eps / std) @ sigma2)))
    dx.pow(2).sum().backward()
    torch.testing.assert_close(c.grad, c_ref.grad)


@pytest.mark.parametrize("path", ["C++ op", "Python op"])
@pytest.mark.parametrize("blocked", [False, True])
def test_weight_gradients_are_the_two_halves_of_one_allocation(compiled, monkeypatch, path, blocked):
    """dL/dmu and dL/drho are written into one (2, out, in) buffer (weight_grad_pair: separate fresh
    gradients were unmapped by glibc and page-faulted in again every step), and .grad receives them
    as they are: AccumulateGrad takes both without copying, so they stay adjacent; a two-forward
    step adds into them (helpers.check_two_forward_step_gradients)."""
    from bayes_ext.modules import BayesianLinear
    if blocked:
        monkeypatch.setattr(BF, "LRT_BLOCK_ELEMENTS", 2 * 9)
    if path == "Python op":  # both ways to the C++ op: the checked one and the functionals' fast path
        monkeypatch.setattr(BF, "eager_compiled_call", lambda *args, **kwargs: False)
        monkeypatch.setattr(BF, "_layer_op_input", lambda *args: None)
    layer = BayesianLinear(9, 7, estimator="lrt")
    assert (BF._block_rows(layer.weight_mu, BF.LRT_BLOCK_ELEMENTS) < 7) == blocked
    x = torch.randn(5, 9)
    with torch.profiler.profile() as prof:
        (layer(x).sum() + layer.kl_divergence()).backward()
    called = {e.key for e in prof.key_averages()}
    assert ("bayes_ext::linear_lrt_rows" in called) == (path == "C++ op")
    g_mu, g_rho = layer.weight_mu.grad, layer.weight_rho.grad
    assert g_rho.data_ptr() - g_mu.data_ptr() == g_mu.numel() * g_mu.element_size()
    check_two_forward_step_gradients(layer, torch.randn(5, 9))
