"""bayes_ext::sample_weight_bias_as and sample_weight_bias_backward_, the layer op's calls that
sample (and differentiate) a linear layer's weight and bias together: on the CPU the two
one-tensor calls they are defined as; CUDA's one-launch kernels are held to the same bits in
tests/test_cuda.py."""
import pytest
import torch

from helpers import check_weight_bias_ops_are_two_calls

PRIOR = (0.5, 0.1, 0.4)


def _layer(out_f, in_f, dtype=torch.float32):
    gen = torch.Generator().manual_seed(4)
    return tuple((torch.randn(shape, generator=gen) * 0.3 + shift).to(dtype)
                 for shape, shift in (((out_f, in_f), 0), ((out_f, in_f), -3), ((out_f,), 0), ((out_f,), -3)))


@pytest.mark.parametrize("param_dtype, dtype", [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                                                (torch.float64, torch.float64)])
@pytest.mark.parametrize("shape", [(9, 7), (1, 1)])
def test_is_the_weight_call_and_the_bias_call(compiled, param_dtype, dtype, shape):
    check_weight_bias_ops_are_two_calls(compiled, *_layer(*shape, param_dtype), torch.tensor([2 ** 61 + 3]), dtype)


def test_the_bias_draws_its_own_stream(compiled):
    """b is not W's first elements: stream (seed, 1), not (seed, 0)."""
    wm, wr, bm, br = _layer(5, 5)
    w, b, _, _ = compiled.sample_weight_bias_as(wm, wr, wm[:, 0].contiguous(), wr[:, 0].contiguous(),
                                                torch.tensor([7]), *PRIOR, torch.float32)
    assert not torch.equal(b, w[:, 0])


def test_fake_tensors_get_the_shapes_and_dtypes(compiled):
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        params = tuple(torch.empty(s) for s in ((4, 6), (4, 6), (4,), (4,)))
        w, b, log_q, log_p = compiled.sample_weight_bias_as(*params, torch.tensor([1]), *PRIOR, torch.bfloat16)
        assert w.shape == (4, 6) and b.shape == (4,) and w.dtype == b.dtype == torch.bfloat16
        assert log_q.shape == () and log_p.dtype == torch.float32


def test_bad_inputs_name_the_argument(compiled):
    wm, wr, bm, br = _layer(3, 4)
    seed = torch.tensor([1])
    with pytest.raises(ValueError, match=r"bias_mu must have shape \(3,\)"):
        compiled.sample_weight_bias_as(wm, wr, bm[:2], br[:2], seed, *PRIOR, torch.float32)
    with pytest.raises(TypeError, match="bias_mu must have the dtype of weight_mu"):
        compiled.sample_weight_bias_as(wm, wr, bm.double(), br.double(), seed, *PRIOR, torch.float32)
    with pytest.raises(ValueError, match="bias_rho must have the shape of bias_mu"):
        compiled.sample_weight_bias_as(wm, wr, bm, br[:2], seed, *PRIOR, torch.float32)
    with pytest.raises(ValueError, match="weight_mu must be 2-D"):
        compiled.sample_weight_bias_as(wm.flatten(), wr.flatten(), bm, br, seed, *PRIOR, torch.float32)
    with pytest.raises(TypeError, match="dtype must be a floating-point dtype"):
        compiled.sample_weight_bias_as(wm, wr, bm, br, seed, *PRIOR, torch.int32)
    one = torch.ones(())
    with pytest.raises(ValueError, match="grad_weight must be contiguous"):
        compiled.sample_weight_bias_backward_(torch.zeros(4, 3).t(), bm, one, one, wm, wr, bm, br, seed, *PRIOR)
    with pytest.raises(ValueError, match="grad_bias must have the shape of bias_mu"):
        compiled.sample_weight_bias_backward_(torch.zeros(3, 4), bm[:1], one, one, wm, wr, bm, br, seed, *PRIOR)
