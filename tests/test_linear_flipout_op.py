"""bayes_ext::linear_flipout_rows, the CPU's one-call Flipout layer with its autograd in C++
(csrc/cpu/linear_flipout_cpu.cpp): eager CPU calls of linear_flipout (and so the flipout layers)
take it; it must give the Python custom op's values and gradients bit for bit, whole and in row
blocks, and reject bad input with errors that name the argument."""
import pytest
import torch

from bayes_ext import functional as BF
from bayes_ext import functional_estimators as BFE

from helpers import check_layer_op_rejects_bad_inputs, detached_as, layer_params

F64 = torch.float64
MIXTURE = (0.3, 0.8, 0.05)


def _run(fn, x, params, g_out, g_q, g_p, need_x):
    """(outputs, gradients w.r.t. x (if need_x) and the parameters) of one call of fn."""
    inputs = ([x] if need_x else []) + [p for p in params if p is not None]
    y, log_q, log_p = fn()
    loss = (y * g_out).sum() + g_q * log_q + g_p * log_p
    return (y.detach(), log_q.detach(), log_p.detach()), torch.autograd.grad(loss, inputs)


@pytest.mark.parametrize("need_x", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("prior", [(1.0, 0.5, 0.1), MIXTURE])
@pytest.mark.parametrize("block_rows", [None, 1, 3])  # None: the whole weight in one block
def test_equals_the_python_custom_op(compiled, monkeypatch, block_rows, prior, dtype, bias, need_x):
    params = layer_params(7, 9, bias, dtype)
    if block_rows is not None:  # the Python op's blocks must be the ones the C++ op is given
        monkeypatch.setattr(BF, "BLOCK_ELEMENTS", block_rows * 9)
    rows = BF._block_rows(params[0])
    assert rows == (7 if block_rows is None else block_rows)
    x = torch.randn(4, 3, 9, dtype=dtype, requires_grad=need_x)
    g_out = torch.randn(4, 3, 7, dtype=dtype)
    seed = torch.tensor([2 ** 62 + 5])
    got = _run(lambda: compiled.linear_flipout_rows(x, *params, seed, *prior, rows), x, params, g_out, 0.3, -0.7,
               need_x)
    ref = _run(lambda: BFE._linear_flipout.op(x, *params, seed, *prior), x, params, g_out, 0.3, -0.7, need_x)
    for a, b in zip(got[0] + got[1], ref[0] + ref[1]):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b)
        assert torch.isfinite(a).all()


@pytest.mark.parametrize("need_x", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block_rows", [None, 3])
def test_lower_precision_x_equals_the_python_custom_op(compiled, monkeypatch, block_rows, low, bias, need_x):
    """x in bf16 / fp16 with float32 parameters (what CPU autocast hands the op): the GEMMs and the
    signs in x's dtype, dW and the KL terms in float32, y in x's dtype, the parameters' gradients in
    float32, bit for bit the Python op's; other dtype mixes are refused."""
    params = layer_params(7, 9, bias, torch.float32)
    if block_rows is not None:
        monkeypatch.setattr(BF, "BLOCK_ELEMENTS", block_rows * 9)
    rows = BF._block_rows(params[0])
    x = torch.randn(4, 3, 9).to(low).requires_grad_(need_x)
    g_out = torch.randn(4, 3, 7).to(low)
    seed = torch.tensor([77])
    got = _run(lambda: compiled.linear_flipout_rows(x, *params, seed, *MIXTURE, rows), x, params, g_out, 0.3, -0.7,
               need_x)
    ref = _run(lambda: BFE._linear_flipout.op(x, *params, seed, *MIXTURE), x, params, g_out, 0.3, -0.7, need_x)
    assert got[0][0].dtype == low and got[0][1].dtype == torch.float32
    assert all(g.dtype == torch.float32 for g in got[1][int(need_x):])
    for a, b in zip(got[0] + got[1], ref[0] + ref[1]):
        assert a.dtype == b.dtype and torch.equal(a, b)
    with pytest.raises(TypeError, match="x must have the dtype"):  # only lower than fp32 weights
        compiled.linear_flipout_rows(x.detach(), *detached_as(params, torch.float64), seed, *MIXTURE, rows)


def _ops_called(fn):
    with torch.profiler.profile() as prof:
        fn()
    return {e.key for e in prof.key_averages()}


def test_linear_flipout_and_the_layer_take_it_in_eager_cpu_calls(compiled):
    from bayes_ext.modules import BayesianLinear
    params = layer_params(4, 5, True)
    x = torch.randn(3, 5, dtype=F64)
    seed = torch.tensor([1])
    assert "bayes_ext::linear_flipout_rows" in _ops_called(lambda: BFE.linear_flipout(x, *params, seed=seed))
    layer = BayesianLinear(5, 4, estimator="flipout")
    assert "bayes_ext::linear_flipout_rows" in _ops_called(lambda: layer(x.float()).sum().backward())
    params32 = [p.detach().float() for p in params]
    for low in (torch.bfloat16, torch.float16):  # x cast to autocast's dtype, the GEMMs in it inside the op
        with torch.autocast("cpu", dtype=low):
            names = _ops_called(lambda: BFE.linear_flipout(x.float(), *params32, seed=seed))
        assert "bayes_ext::linear_flipout_rows" in names


@pytest.mark.parametrize("which", ["output", "log_q", "log_p"])
def test_backward_through_one_output_only(compiled, which):
    """An output that is not used gets no gradient from autograd; the C++ backward fills in zeros."""
    params = layer_params(5, 4, True)
    x = torch.randn(3, 4, dtype=F64, requires_grad=True)
    seed = torch.tensor([9])
    pick = {"output": lambda out: out[0].sum(), "log_q": lambda out: out[1], "log_p": lambda out: out[2]}[which]
    inputs = (x,) + params
    out = compiled.linear_flipout_rows(x, *params, seed, *MIXTURE, 2)
    got = torch.autograd.grad(pick(out), inputs, allow_unused=True)
    out = compiled.linear_flipout_rows(x, *params, seed, *MIXTURE, 2)
    ref = torch.autograd.grad(pick(out) + 0 * (out[0].sum() + out[1] + out[2]), inputs)
    for a, b in zip(got, ref):
        assert torch.equal(torch.zeros_like(b) if a is None else a, b)


@pytest.mark.parametrize("block_rows", [1, 5])
def test_gradcheck(compiled, block_rows):
    params = layer_params(5, 3, True)
    x = torch.randn(2, 3, dtype=F64, requires_grad=True)
    seed = torch.tensor([4])

    def fn(x, *p):
        return compiled.linear_flipout_rows(x, *p, seed, *MIXTURE, block_rows)
    assert torch.autograd.gradcheck(fn, (x,) + params, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_create_graph_keeps_dx_differentiable_in_the_upstream_gradient(compiled):
    """backward(create_graph=True): dL/dx = c mu + ((c * R) dW) * S is linear in the upstream
    gradient c (dW and the signs constants), so d/dc |dL/dx|^2 = 2 A^T A c for that map A."""
    params = layer_params(3, 5, True)
    x = torch.randn(4, 5, dtype=F64, requires_grad=True)
    c = torch.randn(4, 3, dtype=F64, requires_grad=True)
    seed = torch.tensor([5])
    y = compiled.linear_flipout_rows(x, *params, seed, *MIXTURE, 3)[0]
    grad_x, = torch.autograd.grad((y * c).sum(), x, create_graph=True)
    grad_x.pow(2).sum().backward()
    wm, wr = (p.detach() for p in params[:2])
    dw = compiled.sample_weight(wm, wr, seed, 0, *MIXTURE, 0, True)[0]
    s_in = (compiled.philox_normal(torch.empty(4, 5, dtype=F64), seed, 3, 0) >= 0).double() * 2 - 1
    s_out = (compiled.philox_normal(torch.empty(4, 3, dtype=F64), seed, 4, 0) >= 0).double() * 2 - 1
    c_ref = c.detach().clone().requires_grad_()
    dx = c_ref @ wm + ((c_ref * s_out) @ dw) * s_in
    torch.testing.assert_close(grad_x.detach(), dx.detach())
    dx.pow(2).sum().backward()
    torch.testing.assert_close(c.grad, c_ref.grad)


def test_bad_inputs_name_the_argument(compiled):
    x, (wm, wr, bm, br), seed = check_layer_op_rejects_bad_inputs(compiled.linear_flipout_rows, MIXTURE)
    with pytest.raises(ValueError, match="prior_sigma1"):
        compiled.linear_flipout_rows(x, wm, wr, bm, br, seed, 0.5, -1.0, 0.1, 4)
    y = compiled.linear_flipout_rows(x, wm, wr, bm, br, seed, *MIXTURE, 2)[0]
    zero = torch.zeros(())
    with pytest.raises(ValueError, match="grad_y must have shape"):
        compiled.linear_flipout_rows_backward(y[:, :2], zero, zero, x, wm, wr, bm, br, seed, *MIXTURE, 2, True, True,
                                              True)
    with pytest.raises(TypeError, match="grad_y must have the dtype"):
        compiled.linear_flipout_rows_backward(y.double(), zero, zero, x, wm, wr, bm, br, seed, *MIXTURE, 2, True,
                                              True, True)


@pytest.mark.parametrize("block_rows", [2, 7])
def test_opcheck(compiled, block_rows):
    """Schema, fake kernels (the forward's and, through the autograd tests, the backward's) and the
    C++ autograd registration."""
    params = layer_params(7, 4, True)
    x = torch.randn(3, 4, dtype=F64, requires_grad=True)
    result = torch.library.opcheck(compiled.linear_flipout_rows, (x, *params, torch.tensor([3]), *MIXTURE,
                                                                  block_rows))
    assert all(v == "SUCCESS" for v in result.values()), result


@pytest.mark.parametrize("bias_grad", [True, False])
@pytest.mark.parametrize("block_rows", [None, 2])
def test_without_weight_gradients(compiled, monkeypatch, block_rows, bias_grad):
    """Frozen weights (need_w false): dL/dx from the regenerated dW alone, and the bias's gradients
    when only they are asked for, as the Python op gives them."""
    if block_rows is not None:
        monkeypatch.setattr(BF, "BLOCK_ELEMENTS", block_rows * 9)
    wm, wr, bm, br = (p.detach() for p in layer_params(7, 9, True))
    bm.requires_grad_(bias_grad)
    br.requires_grad_(bias_grad)
    x = torch.randn(4, 9, dtype=F64, requires_grad=True)
    g = torch.randn(4, 7, dtype=F64)
    seed = torch.tensor([3])
    inputs = [x] + ([bm, br] if bias_grad else [])
    got = compiled.linear_flipout_rows(x, wm, wr, bm, br, seed, *MIXTURE, BF._block_rows(wm))
    ref = BFE._linear_flipout.op(x, wm, wr, bm, br, seed, *MIXTURE)
    for a, b in zip(got, ref):
        assert torch.equal(a, b)
    got_grads = torch.autograd.grad((got[0] * g).sum() + got[1] - got[2], inputs)
    ref_grads = torch.autograd.grad((ref[0] * g).sum() + ref[1] - ref[2], inputs)
    for a, b in zip(got_grads, ref_grads):
        assert torch.equal(a, b)
