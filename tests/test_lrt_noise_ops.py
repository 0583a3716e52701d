"""bayes_ext::lrt_output_ and bayes_ext::lrt_noise_grad, the batch-sized ends of the local
reparameterisation layers: y = mean + sqrt(max(var, 0)) * eps (var overwritten with std) and
dL/dvar = g eps / (2 std), each one pass that draws eps itself. Checked against the same formulas
written with torch ops on the backend's own philox_normal (the noise the layers used before)."""
import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from helpers import seed_tensor

OFFSET = 2  # the LRT layers' noise stream
DTYPES = [torch.float32, torch.float64]
# one element, odd sizes (partial Philox blocks and tiles), more than one 16384-element chunk
SHAPES = [(1,), (3, 7), (2, 5, 33), (40000,)]


def _tol(dtype):
    return dict(rtol=2e-7, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-15, atol=1e-15)


def _batch(shape, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    mean = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    var = torch.rand(shape, generator=gen, dtype=torch.float64).to(dtype)
    grad = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    return mean, var, grad


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_output_is_mean_plus_std_times_the_stream(ops, dtype, shape):
    mean, var, _ = _batch(shape, dtype)
    var.view(-1)[0] = -1e-3  # a variance rounded below 0: std 0, y = mean
    seed = seed_tensor(2 ** 63 + 11)
    std = var.clone()
    y = ops.lrt_output_(std, mean, seed, OFFSET)
    eps = ops.philox_normal(var, seed, OFFSET).double()
    ref_std = var.double().clamp_min(0).sqrt()
    torch.testing.assert_close(std.double(), ref_std, **_tol(dtype))
    torch.testing.assert_close(y.double(), mean.double() + ref_std * eps, **_tol(dtype))
    assert std.view(-1)[0] == 0 and y.view(-1)[0] == mean.view(-1)[0]
    assert y.dtype == dtype and y.shape == shape and y.is_contiguous()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_noise_grad_is_g_eps_over_two_std(ops, dtype, shape):
    _, var, grad = _batch(shape, dtype, seed=1)
    std = var.sqrt()
    std.view(-1)[-1] = 0  # an all-zero input row without bias: no derivative, 0 taken
    seed = seed_tensor(5)
    half_u = ops.lrt_noise_grad(grad, std, seed, OFFSET)
    eps = ops.philox_normal(std, seed, OFFSET).double()
    ref = torch.where(std > 0, grad.double() * eps / std.double() / 2, torch.zeros((), dtype=torch.float64))
    torch.testing.assert_close(half_u.double(), ref, **_tol(dtype))
    assert half_u.view(-1)[-1] == 0
    assert half_u.dtype == dtype and half_u.shape == shape


def test_non_finite_values_propagate_as_the_eager_ops_did(ops):
    """A NaN variance gives NaN std and y (clamp_min keeps NaN); a NaN std gives a 0 gradient (the
    eager version masked every std that is not > 0)."""
    mean, var, grad = _batch((4, 8), torch.float32)
    var[1, 2] = float("nan")
    y = ops.lrt_output_(var, mean, seed_tensor(3), OFFSET)
    assert torch.isnan(var[1, 2]) and torch.isnan(y[1, 2])
    assert torch.isfinite(y).sum() == y.numel() - 1
    half_u = ops.lrt_noise_grad(grad, var, seed_tensor(3), OFFSET)
    assert half_u[1, 2] == 0 and torch.isfinite(half_u).all()


def test_grad_may_be_expanded_or_strided(ops):
    """dL/dy of y.sum() arrives as an expanded scalar, a transposed one in logical order."""
    _, var, grad = _batch((6, 5), torch.float32)
    std, seed = var.sqrt(), seed_tensor(8)
    ones = torch.ones(()).expand(6, 5)
    torch.testing.assert_close(ops.lrt_noise_grad(ones, std, seed, OFFSET),
                               ops.lrt_noise_grad(ones.contiguous(), std, seed, OFFSET), rtol=0, atol=0)
    g_t = grad.t().contiguous().t()
    assert not g_t.is_contiguous()
    torch.testing.assert_close(ops.lrt_noise_grad(g_t, std, seed, OFFSET), ops.lrt_noise_grad(grad, std, seed, OFFSET),
                               rtol=0, atol=0)


def test_backends_agree(compiled):
    mean, var, grad = _batch((17, 129), torch.float32)
    seed = seed_tensor(99)
    py = torch.ops.bayes_ext_py
    std_c, std_p = var.clone(), var.clone()
    torch.testing.assert_close(compiled.lrt_output_(std_c, mean, seed, OFFSET), py.lrt_output_(std_p, mean, seed, OFFSET),
                               rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(std_c, std_p, rtol=1e-6, atol=0)
    torch.testing.assert_close(compiled.lrt_noise_grad(grad, std_c, seed, OFFSET),
                               py.lrt_noise_grad(grad, std_c, seed, OFFSET), rtol=1e-5, atol=1e-6)


def test_thread_count_does_not_change_the_result(compiled):
    mean, var, grad = _batch((50000,), torch.float32)
    seed, threads = seed_tensor(4), torch.get_num_threads()
    results = []
    for n in (1, 2):
        torch.set_num_threads(n)
        try:
            std = var.clone()
            results.append((compiled.lrt_output_(std, mean, seed, OFFSET), compiled.lrt_noise_grad(grad, std, seed, OFFSET)))
        finally:
            torch.set_num_threads(threads)
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_empty_and_fake_tensors(ops):
    empty = torch.empty(0, 3)
    assert ops.lrt_output_(empty, empty, seed_tensor(1), OFFSET).shape == (0, 3)
    assert ops.lrt_noise_grad(empty, empty, seed_tensor(1), OFFSET).shape == (0, 3)
    with FakeTensorMode():
        var, mean = torch.empty(4, 6, dtype=torch.float64), torch.empty(4, 6, dtype=torch.float64)
        y = ops.lrt_output_(var, mean, torch.tensor([1]), OFFSET)
        u = ops.lrt_noise_grad(mean, var, torch.tensor([1]), OFFSET)
        assert y.shape == u.shape == (4, 6) and y.dtype == u.dtype == torch.float64


def test_bad_inputs_name_the_argument(ops):
    mean, var, grad = _batch((3, 4), torch.float32)
    seed = seed_tensor(1)
    with pytest.raises(TypeError, match="mean must have the dtype of var"):
        ops.lrt_output_(var, mean.double(), seed, OFFSET)
    with pytest.raises(ValueError, match=r"mean must have the shape of var"):
        ops.lrt_output_(var, mean[:2], seed, OFFSET)
    with pytest.raises(ValueError, match="var must be contiguous"):
        ops.lrt_output_(var.t(), mean.t(), seed, OFFSET)
    with pytest.raises(TypeError, match="var must be a float32 or float64 tensor"):
        ops.lrt_output_(var.int(), mean.int(), seed, OFFSET)
    with pytest.raises(ValueError, match="grad must have the shape of std"):
        ops.lrt_noise_grad(grad[:, :2], var, seed, OFFSET)
    with pytest.raises(TypeError, match="grad must have the dtype of std"):
        ops.lrt_noise_grad(grad.half(), var, seed, OFFSET)
    with pytest.raises(TypeError, match="seed"):
        ops.lrt_noise_grad(grad, var, seed.float(), OFFSET)
    with pytest.raises(ValueError, match="offset"):
        ops.lrt_output_(var, mean, seed, -1)


# ---- N seeds: N equal groups of elements, each with its own stream (the vectorised ELBO) ----------

@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(3, 5, 7), (2, 20001)])  # groups ending mid-block; spanning two chunks
def test_seed_groups_are_separate_calls(ops, dtype, shape):
    mean, var, grad = _batch(shape, dtype, seed=5)
    seeds = torch.tensor([7, -2 ** 62, 2 ** 62 + 3, 11][:shape[0]], dtype=torch.int64)
    std = var.clone()
    y = ops.lrt_output_(std, mean, seeds, OFFSET)
    u = ops.lrt_noise_grad(grad, std, seeds, OFFSET)
    for s in range(shape[0]):
        std_s = var[s].clone()
        assert torch.equal(y[s], ops.lrt_output_(std_s, mean[s], seeds[s:s + 1], OFFSET))
        assert torch.equal(std[s], std_s)
        assert torch.equal(u[s], ops.lrt_noise_grad(grad[s], std_s, seeds[s], OFFSET))  # a 0-d seed too


def test_seed_groups_backends_agree(compiled):
    mean, var, grad = _batch((3, 4, 65), torch.float32, seed=6)
    seeds = torch.tensor([1, 2, 3])
    py = torch.ops.bayes_ext_py
    std_c, std_p = var.clone(), var.clone()
    torch.testing.assert_close(compiled.lrt_output_(std_c, mean, seeds, OFFSET),
                               py.lrt_output_(std_p, mean, seeds, OFFSET), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(compiled.lrt_noise_grad(grad, std_c, seeds, OFFSET),
                               py.lrt_noise_grad(grad, std_c, seeds, OFFSET), rtol=1e-5, atol=1e-6)


def test_bad_seed_groups_are_refused(ops):
    mean, var, grad = _batch((3, 4), torch.float32)
    with pytest.raises(ValueError, match="the 5 seeds must split var's 12 elements into equal groups"):
        ops.lrt_output_(var, mean, torch.arange(5), OFFSET)
    with pytest.raises(ValueError, match="the 5 seeds must split std's 12 elements"):
        ops.lrt_noise_grad(grad, var, torch.arange(5), OFFSET)
    with pytest.raises(ValueError, match="1-D tensor of N >= 1 seeds"):
        ops.lrt_output_(var, mean, torch.arange(4).view(2, 2), OFFSET)
