"""bayes_ext::linear_reparam_rows, the CPU's one-call reparameterised linear layer with its autograd
in C++ (csrc/cpu/linear_reparam_cpu.cpp): eager CPU calls of bayesian_linear take it; it must give
the Python custom op's values and gradients bit for bit, whole and in row blocks, and reject bad
input with errors that name the argument."""
import pytest
import torch

from bayes_ext import functional as BF

from helpers import check_layer_op_rejects_bad_inputs, check_two_forward_step_gradients, layer_params

PRIOR = (0.5, 0.3, 1.5)
F64 = torch.float64


def _run(fn, x, params, g_out, glq, glp, need_x):
    """(outputs, gradients w.r.t. x (if need_x) and the parameters) of one call of fn."""
    inputs = ([x] if need_x else []) + [p for p in params if p is not None]
    y, log_q, log_p = fn()
    loss = (y * g_out).sum() + glq * log_q + glp * log_p
    return (y.detach(), log_q.detach(), log_p.detach()), torch.autograd.grad(loss, inputs)


@pytest.mark.parametrize("need_x", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("block_rows", [None, 1, 3])  # None: the whole weight in one block
def test_equals_the_python_custom_op(compiled, monkeypatch, block_rows, dtype, bias, need_x):
    params = layer_params(7, 9, bias, dtype)
    if block_rows is not None:  # the Python op's blocks must be the ones the C++ op is given
        monkeypatch.setattr(BF, "BLOCK_ELEMENTS", block_rows * 9)
    rows = BF._block_rows(params[0])
    assert rows == (7 if block_rows is None else block_rows)
    x = torch.randn(4, 3, 9, dtype=dtype, requires_grad=need_x)
    g_out = torch.randn(4, 3, 7, dtype=dtype)
    seed = torch.tensor([2 ** 62 + 5])
    got = _run(lambda: compiled.linear_reparam_rows(x, *params, seed, *PRIOR, rows), x, params, g_out, 0.3, -0.7,
               need_x)
    ref = _run(lambda: BF._linear_reparam.op(x, *params, seed, *PRIOR), x, params, g_out, 0.3, -0.7, need_x)
    for a, b in zip(got[0] + got[1], ref[0] + ref[1]):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b)


@pytest.mark.parametrize("block_rows", [None, 3])
def test_lower_precision_x_equals_the_python_custom_op(compiled, monkeypatch, block_rows):
    """x in bf16 with float32 parameters (what CUDA autocast hands the op; the same code runs on the
    CPU): W is cast to x's dtype for the matmuls, the gradients come back in float32, bit for bit
    the Python op's."""
    params = layer_params(7, 9, True, torch.float32)
    if block_rows is not None:
        monkeypatch.setattr(BF, "BLOCK_ELEMENTS", block_rows * 9)
    rows = BF._block_rows(params[0])
    x = torch.randn(4, 9).bfloat16().requires_grad_()
    g_out = torch.randn(4, 7).bfloat16()
    seed = torch.tensor([77])
    got = _run(lambda: compiled.linear_reparam_rows(x, *params, seed, *PRIOR, rows), x, params, g_out, 0.3, -0.7, True)
    ref = _run(lambda: BF._linear_reparam.op(x, *params, seed, *PRIOR), x, params, g_out, 0.3, -0.7, True)
    assert got[0][0].dtype == torch.bfloat16 and got[1][0].dtype == torch.bfloat16
    assert all(g.dtype == torch.float32 for g in got[1][1:])
    for a, b in zip(got[0] + got[1], ref[0] + ref[1]):
        assert torch.equal(a, b)
    with pytest.raises(TypeError, match="x must have the dtype"):  # only lower than fp32 weights
        compiled.linear_reparam_rows(x.detach(), *(p.detach().double() for p in params), seed, *PRIOR, rows)


def test_bayesian_linear_takes_it_in_eager_cpu_calls(compiled):
    params = layer_params(4, 5, True)
    x = torch.randn(3, 5, dtype=F64)

    def ops_called(x, params):
        with torch.profiler.profile() as prof:
            BF.bayesian_linear(x, *params, seed=torch.tensor([1]), prior=PRIOR)
        return {e.key for e in prof.key_averages()}
    assert "bayes_ext::linear_reparam_rows" in ops_called(x, params)
    assert "bayes_ext::linear_reparam_rows" in ops_called(x.float(), [p.detach().float() for p in params])
    for low in (torch.bfloat16, torch.float16):  # x cast to autocast's dtype, W cast to it inside the op
        with torch.autocast("cpu", dtype=low):
            names = ops_called(x.float(), [p.detach().float() for p in params])
        assert "bayes_ext::linear_reparam_rows" in names
    # other dtype mixes keep the Python op (which raises for them)
    assert not BF._eager_layer_op(x, *[p.detach().float() for p in params], torch.tensor([1]))


@pytest.mark.parametrize("which", ["output", "log_q", "log_p"])
def test_backward_through_one_output_only(compiled, which):
    """An output that is not used gets no gradient from autograd; the C++ backward fills in zeros."""
    params = layer_params(5, 4, True)
    x = torch.randn(3, 4, dtype=F64, requires_grad=True)
    seed = torch.tensor([9])
    pick = {"output": lambda y, q, p: y.sum(), "log_q": lambda y, q, p: q, "log_p": lambda y, q, p: p}[which]
    inputs = (x,) + params
    got = torch.autograd.grad(pick(*compiled.linear_reparam_rows(x, *params, seed, *PRIOR, 2)), inputs)
    y, q, p = compiled.linear_reparam_rows(x, *params, seed, *PRIOR, 2)
    ref = torch.autograd.grad(pick(y, q, p) + 0 * (y.sum() + q + p), inputs)
    for a, b in zip(got, ref):
        assert torch.equal(a, b)


@pytest.mark.parametrize("block_rows", [1, 5])
def test_gradcheck(compiled, block_rows):
    params = layer_params(5, 3, True)
    x = torch.randn(2, 3, dtype=F64, requires_grad=True)
    seed = torch.tensor([4])

    def fn(x, *p):
        y, log_q, log_p = compiled.linear_reparam_rows(x, *p, seed, *PRIOR, block_rows)
        return y, log_q, log_p
    assert torch.autograd.gradcheck(fn, (x,) + params, eps=1e-6, atol=1e-6, rtol=1e-5)


def test_bad_inputs_name_the_argument(compiled):
    x, (wm, wr, bm, br), seed = check_layer_op_rejects_bad_inputs(compiled.linear_reparam_rows, PRIOR)
    y = compiled.linear_reparam_rows(x, wm, wr, bm, br, seed, *PRIOR, 2)[0]
    one = torch.ones(())
    with pytest.raises(ValueError, match="grad_out must have shape"):
        compiled.linear_reparam_rows_backward(y[:, :2], one, one, x, wm, wr, bm, br, seed, *PRIOR, 2, True)
    with pytest.raises(TypeError, match="grad_out must have the dtype"):
        compiled.linear_reparam_rows_backward(y.double(), one, one, x, wm, wr, bm, br, seed, *PRIOR, 2, True)


def test_create_graph_keeps_dx_differentiable_in_the_upstream_gradient(backend):
    """backward(create_graph=True) through the layer (gradient penalties, posterior sharpening):
    dL/dx = g W is differentiable in the upstream gradient g, with W a constant, on every path
    (the compiled one-call op, the Python op, the pure-PyTorch kernels). For L = sum(y * c):
    d/dc |dL/dx|^2 = 2 (c W) W^T."""
    from bayes_ext import _backend
    params = layer_params(3, 5, True)
    x = torch.randn(4, 5, dtype=F64, requires_grad=True)
    c = torch.randn(4, 3, dtype=F64, requires_grad=True)
    seed = torch.tensor([5])
    y, _, _ = BF.bayesian_linear(x, *params, seed=seed, prior=PRIOR)
    grad_x, = torch.autograd.grad((y * c).sum(), x, create_graph=True)
    grad_x.pow(2).sum().backward()
    wm, wr = params[0].detach(), params[1].detach()
    w = wm + torch.nn.functional.softplus(wr) * _backend.ops().philox_normal(wm, seed, 0)
    torch.testing.assert_close(c.grad, 2 * (c.detach() @ w) @ w.t())


def test_create_graph_through_the_stacked_samples(backend):
    """The same for N samples at once (the vectorised ELBO's layer op): d/dc |dL/dx|^2 per sample."""
    from bayes_ext import _backend
    from bayes_ext import functional_samples as FS
    params = layer_params(3, 5, True)
    seeds = torch.tensor([4, 9], dtype=torch.int64)
    x = torch.randn(2, 4, 5, dtype=F64, requires_grad=True)
    c = torch.randn(2, 4, 3, dtype=F64, requires_grad=True)
    y, _, _ = FS.bayesian_linear_samples(x, *params, seeds, PRIOR)
    grad_x, = torch.autograd.grad((y * c).sum(), x, create_graph=True)
    grad_x.pow(2).sum().backward()
    wm, wr = params[0].detach(), params[1].detach()
    for s in range(2):
        w = wm + torch.nn.functional.softplus(wr) * _backend.ops().philox_normal(wm, seeds[s:s + 1], 0)
        torch.testing.assert_close(c.grad[s], 2 * (c.detach()[s] @ w) @ w.t())


@pytest.mark.parametrize("path", ["C++ op", "Python op"])
@pytest.mark.parametrize("estimator", ["reparam", "flipout"])
def test_blocked_weight_gradients_are_the_two_halves_of_one_allocation(compiled, monkeypatch, estimator, path):
    """A weight in row blocks gets dL/dmu and dL/drho as halves of one (2, out, in) buffer
    (functional.weight_grad_pair, as the LRT layer: two separate fresh gradients were unmapped by
    glibc and page-faulted in again every step), and .grad keeps them adjacent; a two-forward step
    adds into them (helpers.check_two_forward_step_gradients)."""
    from bayes_ext.modules import BayesianLinear
    monkeypatch.setattr(BF, "BLOCK_ELEMENTS", 2 * 9)
    if path == "Python op":  # both ways to the C++ op: the checked one and bayesian_linear's fast path
        monkeypatch.setattr(BF, "eager_compiled_call", lambda *args, **kwargs: False)
        monkeypatch.setattr(BF, "_layer_op_input", lambda *args: None)
    layer = BayesianLinear(9, 7, estimator=estimator)
    assert BF._block_rows(layer.weight_mu) < 7
    op = "bayes_ext::linear_flipout_rows" if estimator == "flipout" else "bayes_ext::linear_reparam_rows"
    with torch.profiler.profile() as prof:
        (layer(torch.randn(5, 9)).sum() + layer.kl_divergence()).backward()
    assert (op in {e.key for e in prof.key_averages()}) == (path == "C++ op")
    g_mu, g_rho = layer.weight_mu.grad, layer.weight_rho.grad
    assert g_rho.data_ptr() - g_mu.data_ptr() == g_mu.numel() * g_mu.element_size()
    check_two_forward_step_gradients(layer, torch.randn(5, 9))


def test_cpu_training_step_reads_seed_and_scalar_gradients_in_place(compiled):
    """The CPU kernels read the seed and the incoming gradients of log q / log p straight from memory:
    through aten::item each read cost ~1 us, four of them in a small layer's training step."""
    from bayes_ext.modules import BayesianLinear
    layer, x = BayesianLinear(16, 8), torch.randn(4, 16, requires_grad=True)
    with torch.profiler.profile() as prof:
        (layer(x).sum() + layer.kl_divergence()).backward()
    names = {e.key for e in prof.key_averages()}
    assert "bayes_ext::linear_reparam_rows_backward" in names
    assert "aten::item" not in names and "aten::_local_scalar_dense" not in names


def test_a_scalar_gradient_in_another_dtype_is_still_read(compiled):
    """host_scalar reads in place only a CPU tensor of the kernel's dtype; a float64 gradient of log q
    for float32 parameters goes through item(), as before."""
    mu, rho = torch.zeros(3, 4), torch.full((3, 4), -3.0)
    seed = torch.tensor([5])
    one32, two32 = torch.tensor(1.0), torch.tensor(2.0)
    got = compiled.sample_weight_backward(None, one32.double(), two32.double(), mu, rho, seed, 0, 1.0, 0.1, 0.4, False)
    ref = compiled.sample_weight_backward(None, one32, two32, mu, rho, seed, 0, 1.0, 0.1, 0.4, False)
    for a, b in zip(got[:2], ref[:2]):
        assert torch.equal(a, b)
