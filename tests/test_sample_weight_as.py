"""bayes_ext::sample_weight_as, the layer op's sampling call: sample_weight's w in the dtype of the
matmul (autocast's bf16 / fp16), and its log q / log p only when asked. On the CPU it is
sample_weight then a cast; CUDA's kernel writes the dtype itself (tests/test_cuda.py checks it
against this definition bit for bit)."""
import pytest
import torch

PRIOR = (0.5, 0.1, 0.4)


def _params(shape, dtype=torch.float32):
    gen = torch.Generator().manual_seed(11)
    return (torch.randn(shape, generator=gen).to(dtype) * 0.3,
            (torch.randn(shape, generator=gen) - 3).to(dtype))


@pytest.mark.parametrize("param_dtype, dtype", [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                                                (torch.float32, torch.float16), (torch.float64, torch.bfloat16),
                                                (torch.float64, torch.float64)])
@pytest.mark.parametrize("with_kl", [True, False])
def test_is_sample_weight_then_a_cast(compiled, param_dtype, dtype, with_kl):
    mu, rho = _params((9, 7), param_dtype)
    seed = torch.tensor([2 ** 61 + 3])
    w, log_q, log_p = compiled.sample_weight_as(mu, rho, seed, 1, *PRIOR, dtype, with_kl)
    ref_w, ref_q, ref_p = compiled.sample_weight(mu, rho, seed, 1, *PRIOR)
    assert w.dtype == dtype and w.shape == mu.shape
    assert torch.equal(w, ref_w.to(dtype))
    if with_kl:
        assert torch.equal(log_q, ref_q) and torch.equal(log_p, ref_p)
    else:  # not computed: two empty tensors
        assert log_q.numel() == 0 and log_p.numel() == 0


def test_fake_tensors_get_the_shapes_and_dtypes(compiled):
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode():
        mu, rho = torch.empty(4, 6), torch.empty(4, 6)
        w, log_q, _ = compiled.sample_weight_as(mu, rho, torch.tensor([1]), 0, *PRIOR, torch.bfloat16, True)
        assert w.shape == (4, 6) and w.dtype == torch.bfloat16 and log_q.shape == ()


def test_bad_inputs_name_the_argument(compiled):
    mu, rho = _params((3, 4))
    seed = torch.tensor([1])
    with pytest.raises(TypeError, match="dtype must be a floating-point dtype"):
        compiled.sample_weight_as(mu, rho, seed, 0, *PRIOR, torch.int32, True)
    with pytest.raises(ValueError, match="rho"):
        compiled.sample_weight_as(mu, rho[:2], seed, 0, *PRIOR, torch.bfloat16, True)
    with pytest.raises(TypeError, match="seed"):
        compiled.sample_weight_as(mu, rho, seed.float(), 0, *PRIOR, torch.bfloat16, True)
