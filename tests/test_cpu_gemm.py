"""The whole-layer CPU ops' GEMMs (csrc/cpu/cpu_gemm.h): oneDNN's through torch's
mkldnn::_linear_pointwise or torch's own, chosen by BAYES_EXT_CPU_GEMM ("auto": oneDNN on AMD CPUs)
for float32 GEMMs of at least 2^22 multiply-adds. Either way the layer op gives its Python op's
values to float32 rounding; the choice is seen in the ops the call dispatches."""
import pytest
import torch

from bayes_ext import functional as BF
from bayes_ext import functional_estimators as BFE

from helpers import layer_params

ONEDNN_OP = "mkldnn::_linear_pointwise"
MIN_MACS = 1 << 22  # cpu_gemm::kOneDnnMinMacs


def _onednn_in_torch():
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _amd_cpu():
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.split(":")[-1].strip() == "AuthenticAMD" for line in f if line.startswith("vendor_id"))
    except OSError:
        return False


PRIOR = (0.5, 0.3, 1.5)
# op -> (its Python custom op, the module attribute of its block size, its extra arguments)
OPS = {
    "linear_lrt_rows": (lambda: BFE._linear_lrt.op, "LRT_BLOCK_ELEMENTS", (0.5,)),
    "linear_reparam_rows": (lambda: BF._linear_reparam.op, "BLOCK_ELEMENTS", PRIOR),
    "linear_flipout_rows": (lambda: BFE._linear_flipout.op, "BLOCK_ELEMENTS", PRIOR),
}


def _op_step(compiled, monkeypatch, op, shape, block_rows=None, strided=False):
    """Outputs and gradients of one call of the C++ layer op and of its Python op, and the names of
    the ops the C++ one dispatched. strided: x (4, batch / 4, in) as a non-contiguous view."""
    python_op, block_attr, extra = OPS[op]
    batch, in_f, out_f = shape
    params = layer_params(out_f, in_f, True, torch.float32)
    if block_rows is not None:  # the Python op's blocks must be the ones the C++ op is given
        monkeypatch.setattr(BF, block_attr, block_rows * in_f)
    rows = BF._block_rows(params[0], getattr(BF, block_attr))
    assert rows == (out_f if block_rows is None else block_rows)
    if strided:
        x = torch.randn(in_f, 4, batch // 4).permute(1, 2, 0).requires_grad_()
        assert not x.is_contiguous()
    else:
        x = torch.randn(batch, in_f, requires_grad=True)
    g_out = torch.randn(*x.shape[:-1], out_f)
    seed = torch.tensor([7])

    def run(fn):
        y, a, b = fn()
        loss = (y * g_out).sum() + 0.3 * a.sum() - 0.2 * b.sum()  # (LRT: a is std, not differentiable)
        return (y, a, b, *torch.autograd.grad(loss, [x, *params]))

    with torch.profiler.profile() as prof:
        got = run(lambda: getattr(compiled, op)(x, *params, seed, *extra, rows))
    ref = run(lambda: python_op()(x, *params, seed, *extra))
    return got, ref, {e.key: e.count for e in prof.key_averages()}


def _assert_equal_to_float32_rounding(got, ref):
    for a, b in zip(got, ref):
        a, b = a.detach(), b.detach()
        assert a.shape == b.shape and torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))


# oneDNN GEMMs of one call with its backward: every forward and dL/dx GEMM (LRT: the mean and the
# variance paths; Flipout: the perturbation and the mean), per block of rows where the op works in blocks
ONEDNN_CALLS = {("linear_lrt_rows", None): 4, ("linear_lrt_rows", 128): 8,
                ("linear_reparam_rows", None): 2, ("linear_reparam_rows", 128): 6,
                ("linear_flipout_rows", None): 4, ("linear_flipout_rows", 128): 8}


# 64 x 512 x 384: GEMMs of 12.6M multiply-adds whole, 4.2M in blocks of 128 rows (the threshold)
@pytest.mark.parametrize("block_rows", [None, 128])
@pytest.mark.parametrize("op", sorted(OPS))
@pytest.mark.parametrize("choice", ["onednn", "torch", "auto"])
def test_the_layer_ops_take_the_chosen_gemm_with_the_python_ops_values(compiled, monkeypatch, choice, op,
                                                                      block_rows):
    if choice == "onednn" and not _onednn_in_torch():
        pytest.skip("this torch build has no oneDNN linear")
    monkeypatch.setenv("BAYES_EXT_CPU_GEMM", choice)
    got, ref, names = _op_step(compiled, monkeypatch, op, (64, 512, 384), block_rows)
    expect_onednn = _onednn_in_torch() and (choice == "onednn" or (choice == "auto" and _amd_cpu()))
    assert names.get(ONEDNN_OP, 0) == (ONEDNN_CALLS[op, block_rows] if expect_onednn else 0)
    _assert_equal_to_float32_rounding(got, ref)


@pytest.mark.parametrize("block_rows", [None, 128])
@pytest.mark.parametrize("op", sorted(OPS))
def test_onednn_on_two_threads_with_a_strided_input(compiled, monkeypatch, two_threads, op, block_rows):
    """On two threads the LRT op runs its oneDNN GEMMs side by side, one per thread, inside an
    OpenMP region (csrc/cpu/side_by_side.h); x arrives as a non-contiguous 3-D view."""
    if not _onednn_in_torch():
        pytest.skip("this torch build has no oneDNN linear")
    assert torch.get_num_threads() == 2
    monkeypatch.setenv("BAYES_EXT_CPU_GEMM", "onednn")
    got, ref, names = _op_step(compiled, monkeypatch, op, (64, 512, 384), block_rows, strided=True)
    assert names.get(ONEDNN_OP, 0) == ONEDNN_CALLS[op, block_rows]
    _assert_equal_to_float32_rounding(got, ref)


@pytest.mark.parametrize("op", sorted(OPS))
def test_small_gemms_keep_torchs_and_stay_bit_for_bit(compiled, monkeypatch, op):
    assert 16 * 64 * 64 < MIN_MACS
    monkeypatch.setenv("BAYES_EXT_CPU_GEMM", "onednn")
    got, ref, names = _op_step(compiled, monkeypatch, op, (16, 64, 64))
    assert ONEDNN_OP not in names
    for a, b in zip(got, ref):
        assert torch.equal(a.detach(), b.detach())


def test_an_unknown_choice_is_an_error_naming_the_variable(compiled, monkeypatch):
    monkeypatch.setenv("BAYES_EXT_CPU_GEMM", "blas")
    with pytest.raises(ValueError, match="BAYES_EXT_CPU_GEMM"):
        _op_step(compiled, monkeypatch, "linear_lrt_rows", (4, 8, 8))
