"""bayes_ext::conv_reparam_layer, the one-call reparameterised convolution with its autograd in C++
(csrc/cpu/conv_reparam_layer.cpp): eager calls of the conv layers take it; it must give the Python
custom op's (bayes_ext::conv_reparam) values and gradients bit for bit, differentiate its recorded
backward to every order, and reject bad input with errors that name the argument."""
import pytest
import torch

from bayes_ext import functional_conv as BFC
from bayes_ext.modules import BayesianConv1d, BayesianConv2d, BayesianConvTranspose2d

PRIOR = (0.5, 0.3, 0.002)
F64 = torch.float64

# (x shape, weight shape, stride, padding, dilation, transposed, output_padding, groups)
CASES = {
    "conv2d": ((2, 3, 9, 9), (4, 3, 3, 3), [1, 1], [1, 1], [1, 1], False, [0, 0], 1),
    "conv2d_strided_grouped_dilated": ((2, 4, 9, 9), (6, 2, 3, 3), [2, 1], [0, 1], [2, 1], False, [0, 0], 2),
    "conv1d": ((2, 3, 11), (5, 3, 4), [1], [2], [1], False, [0], 1),
    "conv3d": ((1, 2, 5, 5, 5), (3, 2, 2, 2, 2), [1, 1, 1], [0, 0, 0], [1, 1, 1], False, [0, 0, 0], 1),
    # transposed: the weight is (in, out / groups, k...), so the bias (out) is not one value per weight row
    "conv_transpose2d": ((2, 4, 5, 5), (4, 3, 3, 3), [2, 2], [1, 1], [1, 1], True, [1, 1], 1),
    "conv_transpose2d_grouped": ((2, 4, 5, 5), (4, 2, 3, 3), [1, 1], [0, 0], [1, 1], True, [0, 0], 2),
}


def _case(name, bias=True, dtype=F64):
    """(x, (weight_mu, weight_rho, bias_mu, bias_rho), conv arguments) of CASES[name]."""
    x_shape, w_shape, stride, padding, dilation, transposed, output_padding, groups = CASES[name]
    g = torch.Generator().manual_seed(len(name))
    x = torch.randn(x_shape, generator=g, dtype=dtype)
    out_channels = w_shape[1] * groups if transposed else w_shape[0]
    params = (0.2 * torch.randn(w_shape, generator=g, dtype=dtype),
              torch.randn(w_shape, generator=g, dtype=dtype) * 0.3 - 3.0,
              0.1 * torch.randn(out_channels, generator=g, dtype=dtype) if bias else None,
              torch.randn(out_channels, generator=g, dtype=dtype) - 3.0 if bias else None)
    return x, params, (stride, padding, dilation, transposed, output_padding, groups)


def _leaves(tensors, need_x=True):
    return tuple(None if t is None else t.detach().clone().requires_grad_(i > 0 or need_x)
                 for i, t in enumerate(tensors))


def _run(op, x, params, conv, seed, need_x=True, loss=lambda y, q, p: 0.3 * y.pow(2).sum() + 0.7 * q - 1.3 * p):
    """(y, log_q, log_p) and the gradients of `loss` w.r.t. x (if need_x) and the parameters."""
    x, *params = _leaves((x,) + params, need_x)
    y, log_q, log_p = op(x, *params, seed, *conv, *PRIOR)
    inputs = ([x] if need_x else []) + [p for p in params if p is not None]
    grads = torch.autograd.grad(loss(y, log_q, log_p), inputs, allow_unused=True)
    return (y.detach(), log_q.detach(), log_p.detach()) + grads


def _assert_equal(got, ref):
    assert len(got) == len(ref)
    for a, b in zip(got, ref):  # (zip's strict= needs Python 3.10; pyproject says 3.9)
        if a is None or b is None:
            assert a is None and b is None
            continue
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a, b)


@pytest.mark.parametrize("need_x", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("name", sorted(CASES))
def test_equals_the_python_custom_op(compiled, name, dtype, bias, need_x):
    x, params, conv = _case(name, bias, dtype)
    seed = torch.tensor([2 ** 62 + 5])
    got = _run(compiled.conv_reparam_layer, x, params, conv, seed, need_x)
    ref = _run(BFC._conv_reparam.op, x, params, conv, seed, need_x)
    _assert_equal(got, ref)


@pytest.mark.parametrize("name", ["conv2d", "conv_transpose2d"])
def test_lower_precision_x_equals_the_python_custom_op(compiled, name):
    """x in bf16 with float32 parameters (what autocast hands the op): W and b are sampled straight
    into bf16, the gradients come back in float32, bit for bit the Python op's."""
    x, params, conv = _case(name, True, torch.float32)
    seed = torch.tensor([77])
    got = _run(compiled.conv_reparam_layer, x.bfloat16(), params, conv, seed)
    ref = _run(BFC._conv_reparam.op, x.bfloat16(), params, conv, seed)
    assert got[0].dtype == torch.bfloat16 and got[3].dtype == torch.bfloat16
    assert all(g.dtype == torch.float32 for g in got[4:])
    _assert_equal(got, ref)


@pytest.mark.parametrize("which", ["output", "log_q", "log_p", "kl"])
def test_backward_through_some_outputs_only(compiled, which):
    """An output that is not used gets no gradient from autograd: with y unused the backward runs no
    convolution (and x gets none); the gradients are the Python op's."""
    x, params, conv = _case("conv2d")
    seed = torch.tensor([9])
    pick = {"output": lambda y, q, p: y.sum(), "log_q": lambda y, q, p: q, "log_p": lambda y, q, p: p,
            "kl": lambda y, q, p: q - p}[which]
    _assert_equal(_run(compiled.conv_reparam_layer, x, params, conv, seed, loss=pick),
                  _run(BFC._conv_reparam.op, x, params, conv, seed, loss=pick))


@pytest.mark.parametrize("name", ["conv2d_strided_grouped_dilated", "conv_transpose2d"])
def test_gradcheck(compiled, name):
    x, params, conv = _case(name)
    seed = torch.tensor([4])

    def fn(x, *p):
        return compiled.conv_reparam_layer(x, *p, seed, *conv, *PRIOR)
    assert torch.autograd.gradcheck(fn, _leaves((x,) + params), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_gradgradcheck(compiled):
    """create_graph=True differentiates the Python op's recorded backward: exact second derivatives."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 2, 4, 4, generator=g, dtype=F64)
    params = (0.2 * torch.randn(2, 2, 2, 2, generator=g, dtype=F64), torch.randn(2, 2, 2, 2, generator=g, dtype=F64) - 3,
              0.1 * torch.randn(2, generator=g, dtype=F64), torch.randn(2, generator=g, dtype=F64) - 3)
    conv, seed = ([2, 1], [1, 0], [1, 1], False, [0, 0], 1), torch.tensor([6])

    def fn(x, *p):
        return compiled.conv_reparam_layer(x, *p, seed, *conv, *PRIOR)
    assert torch.autograd.gradgradcheck(fn, _leaves((x,) + params), eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("layer", ["conv1d", "conv2d", "conv_transpose2d"])
def test_the_layers_take_it_in_eager_calls(compiled, layer):
    """Eager calls (functional_call too) take the C++ op; torch.func keeps the Python op (its
    registered autograd), with the same gradients on the same seed."""
    make, shape = {"conv1d": (lambda: BayesianConv1d(3, 4, 3), (2, 3, 8)),
                   "conv2d": (lambda: BayesianConv2d(3, 4, 3), (2, 3, 8, 8)),
                   "conv_transpose2d": (lambda: BayesianConvTranspose2d(3, 4, 3), (2, 3, 8, 8))}[layer]
    module, x = make(), torch.randn(shape)
    params = dict(module.named_parameters())

    def loss(p):
        y = torch.func.functional_call(module, p, (x,))
        return y.pow(2).sum() + module.log_variational_posterior - module.log_prior

    torch.manual_seed(5)
    assert "ConvReparamFunction" in torch.func.functional_call(module, params, (x,)).grad_fn.name()
    torch.manual_seed(5)
    eager = torch.autograd.grad(loss(params), list(params.values()))
    torch.manual_seed(5)
    transformed = torch.func.grad(loss)({k: v.detach() for k, v in params.items()})
    for name, grad in zip(params, eager):
        torch.testing.assert_close(transformed[name], grad, rtol=1e-6, atol=1e-6)


def test_bad_inputs_name_the_argument(compiled):
    x, (wm, wr, bm, br), conv = _case("conv2d", True, torch.float32)
    seed = torch.tensor([1])
    op = compiled.conv_reparam_layer
    with pytest.raises(TypeError, match="x must have the dtype of weight_mu"):
        op(x.double(), wm, wr, bm, br, seed, *conv, *PRIOR)
    with pytest.raises(TypeError, match="x must have the dtype of weight_mu"):  # only lower than fp32 weights
        op(x.bfloat16(), wm.double(), wr.double(), bm.double(), br.double(), seed, *conv, *PRIOR)
    with pytest.raises(ValueError, match="weight_rho must have the shape of weight_mu"):
        op(x, wm, wr[:2], bm, br, seed, *conv, *PRIOR)
    with pytest.raises(ValueError, match="bias_mu and bias_rho must be given together"):
        op(x, wm, wr, bm, None, seed, *conv, *PRIOR)
    with pytest.raises(ValueError, match="weight_mu must be a non-empty"):
        op(x, wm[0, 0], wr[0, 0], None, None, seed, *conv, *PRIOR)
    with pytest.raises(ValueError, match=r"bias_mu must have shape \(4,\)"):
        op(x, wm, wr, bm[:2], br[:2], seed, *conv, *PRIOR)
    with pytest.raises(ValueError, match="bias_rho must have the shape of bias_mu"):
        op(x, wm, wr, bm, br[:2], seed, *conv, *PRIOR)
    with pytest.raises(TypeError, match="seed"):
        op(x, wm, wr, bm, br, seed.float(), *conv, *PRIOR)
