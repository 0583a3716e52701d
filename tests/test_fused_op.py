"""The eager fast path of the fused custom ops (bayes_ext/_fused_op.py): an autograd.Function that
runs the op's own implementation and backward must give exactly what the registered custom op
gives, and calls that need the custom op (no grad, fake tensors, torch.compile) must still get it."""
import pytest
import torch

from bayes_ext import functional as BF
from bayes_ext import functional_estimators as BFE
from helpers import seed_tensor

OPS = {"linear_reparam": (BF._linear_reparam, (1.0, 0.1, 0.4)),
       "linear_flipout": (BFE._linear_flipout, (0.5, 0.3, 1.2)),
       "linear_lrt": (BFE._linear_lrt, (0.3,))}


def _args(bias=True):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 7, generator=gen, requires_grad=True)
    mu = (0.3 * torch.randn(4, 7, generator=gen)).requires_grad_()
    rho = (torch.randn(4, 7, generator=gen) - 3).requires_grad_()
    b_mu = (0.1 * torch.randn(4, generator=gen)).requires_grad_() if bias else None
    b_rho = (torch.randn(4, generator=gen) - 3).requires_grad_() if bias else None
    return [x, mu, rho, b_mu, b_rho, seed_tensor(9)]


def _run(fn, args, extra):
    outs = fn(*args, *extra)
    loss = sum(o.float().sum() * (i + 1) for i, o in enumerate(outs))  # every output gets a gradient
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    return outs, torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("name", sorted(OPS))
@pytest.mark.parametrize("bias", [True, False])
def test_fast_path_equals_custom_op(backend, name, bias):
    fused, extra = OPS[name]
    args = _args(bias)
    fast_out, fast_grads = _run(fused, args, extra)
    op_out, op_grads = _run(fused.op, args, extra)
    assert type(fast_out[0].grad_fn).__name__.endswith("_functionBackward")  # the fast path ran
    assert "_function" not in type(op_out[0].grad_fn).__name__
    for a, b in zip(fast_out + fast_grads, op_out + op_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_no_grad_and_fake_tensors_use_the_implementation_or_the_op(backend):
    fused, extra = OPS["linear_reparam"]
    args = _args()
    with torch.no_grad():
        y_fast = fused(*args, *extra)[0]
    with torch.no_grad():
        y_op = fused.op(*args, *extra)[0]
    torch.testing.assert_close(y_fast, y_op, rtol=0, atol=0)
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        y = fused(*fake, *extra)[0]  # a FakeTensor is not plain: the custom op's fake kernel answers
    assert y.shape == (5, 4)


def test_autocast_off_is_a_no_op_context_without_autocast():
    assert BF.autocast_off("cpu") is BF.autocast_off("cpu")  # the shared null context
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with BF.autocast_off("cpu"):
            assert not torch.is_autocast_enabled("cpu")
        assert torch.is_autocast_enabled("cpu")
