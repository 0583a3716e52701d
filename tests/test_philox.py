"""The noise generator: Philox4x32-10 known answers, the stream layout of docs/design.md, its
statistics, and its independence from threads and slicing, on both backends."""
import math

import numpy as np
import pytest
import torch
from scipy import stats

from bayes_ext import _philox
from helpers import PHILOX_KAT, as_int64, np_design_normals, np_philox4x32_10, np_stream_words, seed_tensor

EPS_MAX = math.sqrt(48.0 * math.log(2.0))  # largest |eps| the radius uniform allows


def _words_to_ints(words):
    return tuple(int(w) & 0xFFFFFFFF for w in words)


# ---- known-answer vectors ----------------------------------------------------------------------

@pytest.mark.parametrize("ctr,key,expected", PHILOX_KAT)
def test_known_answers_numpy_reference(ctr, key, expected):
    # The test's own reference must reproduce Random123 before it is used to judge anything.
    out = np_philox4x32_10(*[np.array([c], dtype=np.uint64) for c in ctr], *key)
    assert _words_to_ints(o[0] for o in out) == expected


@pytest.mark.parametrize("ctr,key,expected", PHILOX_KAT)
def test_known_answers_fallback_rounds(ctr, key, expected):
    words = [torch.tensor([c], dtype=torch.int64) for c in ctr]
    out = _philox.philox4x32_10(*words, key[0], key[1])
    assert all(o.dtype == torch.int64 for o in out)
    assert _words_to_ints(o.item() for o in out) == expected


@pytest.mark.parametrize("ctr,key,expected", PHILOX_KAT)
def test_known_answers_fallback_stream_layout(ctr, key, expected):
    # counter words 0-1 = block, 2-3 = offset, key = seed
    seed = key[0] | (key[1] << 32)
    offset = ctr[2] | (ctr[3] << 32)
    block = ctr[0] | (ctr[1] << 32)
    out = _philox.philox_blocks(as_int64(seed), as_int64(offset), as_int64(block), 1)
    assert _words_to_ints(o.item() for o in out) == expected


@pytest.mark.parametrize("ctr,key,expected", PHILOX_KAT)
def test_known_answers_compiled(compiled, ctr, key, expected):
    seed = seed_tensor(key[0] | (key[1] << 32))
    offset = as_int64(ctr[2] | (ctr[3] << 32))
    block = as_int64(ctr[0] | (ctr[1] << 32))
    out = compiled.philox4x32(seed, offset, block, 1)
    assert out.dtype == torch.int64 and out.shape == (1, 4)
    assert _words_to_ints(out[0].tolist()) == expected


@pytest.mark.parametrize("seed,offset,first_block", [
    (0, 0, 0),
    (12345, 1, 7),
    (2 ** 63 + 99, 2 ** 40 + 3, 2 ** 32 - 3),   # block index carries into the high counter word
    (2 ** 64 - 1, 2 ** 63 - 1, 2 ** 64 - 2),    # block index wraps around 2^64
])
def test_compiled_words_match_references(compiled, seed, offset, first_block):
    n = 6
    got = compiled.philox4x32(seed_tensor(seed), as_int64(offset), as_int64(first_block), n)
    ref = np.stack(np_stream_words(seed, offset, first_block, n), axis=-1).astype(np.int64)
    np.testing.assert_array_equal(got.numpy(), ref)
    fb = torch.stack(_philox.philox_blocks(as_int64(seed), as_int64(offset), as_int64(first_block), n), dim=-1)
    np.testing.assert_array_equal(fb.numpy(), ref)


# ---- the Box-Muller stream of docs/design.md --------------------------------------------------

STREAMS = [(0, 0), (1, 1), (as_int64(2 ** 64 - 1), 5), (as_int64(0xDEADBEEF_00000001), 2 ** 33 + 1), (42, 2 ** 63 - 1)]


@pytest.mark.parametrize("seed,offset", STREAMS)
def test_philox_normal_matches_design_float64(ops, seed, offset):
    n = 4099  # not a multiple of 4
    eps = ops.philox_normal(torch.empty(n, dtype=torch.float64), seed_tensor(seed), offset)
    ref = np_design_normals(n, seed, offset)
    np.testing.assert_allclose(eps.numpy(), ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("seed,offset", STREAMS)
def test_philox_normal_matches_design_float32(ops, seed, offset):
    n = 4099
    eps = ops.philox_normal(torch.empty(n, dtype=torch.float32), seed_tensor(seed), offset)
    assert eps.dtype == torch.float32
    ref = np_design_normals(n, seed, offset)
    # the compiled float32 path uses polynomial log / sincos (~1e-6 relative)
    np.testing.assert_allclose(eps.numpy().astype(np.float64), ref, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float64, 1e-12)])
@pytest.mark.parametrize("shape", [(1,), (3,), (5, 7), (2, 3, 4, 5), (70001,)])
def test_compiled_and_fallback_eps_agree(compiled, dtype, tol, shape):
    like = torch.empty(shape, dtype=dtype)
    for seed, offset in STREAMS:
        a = compiled.philox_normal(like, seed_tensor(seed), offset)
        b = torch.ops.bayes_ext_py.philox_normal(like, seed_tensor(seed), offset)
        assert a.shape == b.shape == like.shape and a.dtype == b.dtype == dtype
        torch.testing.assert_close(a, b, rtol=tol, atol=tol)


def test_philox_normal_output_layout(ops):
    like = torch.empty(6, 10, dtype=torch.float64).t()[1:]  # non-contiguous, shape (9, 6)
    eps = ops.philox_normal(like, seed_tensor(3), 0)
    assert eps.shape == like.shape and eps.is_contiguous() and eps.dtype == torch.float64
    # element i of the row-major logical order gets stream element i, whatever the strides
    flat = ops.philox_normal(torch.empty(54, dtype=torch.float64), seed_tensor(3), 0)
    assert torch.equal(eps.reshape(-1), flat)
    # a 0-dim seed is the same seed
    assert torch.equal(ops.philox_normal(like, torch.tensor(3), 0), eps)


def test_philox_normal_empty(ops):
    for shape in [(0,), (3, 0), (0, 2, 2)]:
        eps = ops.philox_normal(torch.empty(shape), seed_tensor(1), 0)
        assert eps.shape == shape


# ---- statistics --------------------------------------------------------------------------------

N_STATS = 1 << 20


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_normal_moments_and_ks(ops, dtype):
    eps = ops.philox_normal(torch.empty(N_STATS, dtype=dtype), seed_tensor(20240607), 0).to(torch.float64)
    n = eps.numel()
    assert n >= 1_000_000
    assert torch.isfinite(eps).all()
    mean = eps.mean().item()
    var = eps.var().item()
    assert abs(mean) < 5.0 / math.sqrt(n), mean
    assert abs(var - 1.0) < 5.0 * math.sqrt(2.0 / n), var
    # skewness and excess kurtosis of a normal are 0 (standard errors sqrt(6/n), sqrt(24/n))
    z = (eps - mean) / math.sqrt(var)
    assert abs((z ** 3).mean().item()) < 5.0 * math.sqrt(6.0 / n)
    assert abs((z ** 4).mean().item() - 3.0) < 5.0 * math.sqrt(24.0 / n)
    assert eps.abs().max().item() <= EPS_MAX * (1 + 1e-6)
    ks = stats.kstest(eps.numpy(), "norm")
    assert ks.pvalue > 1e-3, ks


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a = a.to(torch.float64)
    b = b.to(torch.float64)
    return torch.corrcoef(torch.stack([a, b]))[0, 1].item()


def test_streams_uncorrelated(ops):
    n = 1 << 18
    like = torch.empty(n, dtype=torch.float64)
    bound = 5.0 / math.sqrt(n)
    base = ops.philox_normal(like, seed_tensor(7), 0)
    others = {
        "seed + 1": ops.philox_normal(like, seed_tensor(8), 0),
        "seed + 2^32 (high key word)": ops.philox_normal(like, seed_tensor(7 + 2 ** 32), 0),
        "offset 1": ops.philox_normal(like, seed_tensor(7), 1),
        "offset 2^32 (high counter word)": ops.philox_normal(like, seed_tensor(7), 2 ** 32),
    }
    for name, other in others.items():
        assert not torch.equal(base, other), name
        r = _corr(base, other)
        assert abs(r) < bound, (name, r)
        # squared values too: a shared radius would show up here
        assert abs(_corr(base ** 2, other ** 2)) < bound, name


@pytest.mark.parametrize("lag", [1, 2, 3, 4, 5, 8])
def test_neighbouring_elements_uncorrelated(ops, lag):
    n = 1 << 18
    eps = ops.philox_normal(torch.empty(n + lag, dtype=torch.float64), seed_tensor(11), 3)
    bound = 5.0 / math.sqrt(n)
    assert abs(_corr(eps[:-lag], eps[lag:])) < bound
    if lag % 2 == 0:  # Box-Muller partners (lanes 0/1, 2/3) share a radius; other lags do not
        assert abs(_corr(eps[:-lag] ** 2, eps[lag:] ** 2)) < bound


def test_box_muller_partners_uncorrelated(ops):
    n = 1 << 18
    eps = ops.philox_normal(torch.empty(2 * n, dtype=torch.float64), seed_tensor(12), 0)
    assert abs(_corr(eps[0::2], eps[1::2])) < 5.0 / math.sqrt(n)


# ---- independence from threads and from slicing ------------------------------------------------

def _run_all(ops, mu, rho, seed, prior):
    eps = ops.philox_normal(mu, seed, 2)
    w, log_q, log_p = ops.sample_weight(mu, rho, seed, 2, *prior)
    one = torch.ones((), dtype=mu.dtype)
    g_mu, g_rho, w2 = ops.sample_weight_backward(torch.ones_like(mu), one, -one, mu, rho, seed, 2, *prior, True)
    return eps, w, log_q, log_p, g_mu, g_rho, w2


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_stream_independent_of_thread_count(ops, backend, dtype):
    gen = torch.Generator().manual_seed(5)
    shape = (101, 1003)  # > 6 chunks of 16384 elements, not a multiple of 4
    mu = torch.randn(shape, generator=gen, dtype=dtype)
    rho = torch.randn(shape, generator=gen, dtype=dtype) - 3
    seed = seed_tensor(987654321)
    prior = (0.5, 0.1, 0.4)
    results = []
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        results.append(_run_all(ops, mu, rho, seed, prior))
    names = ["eps", "w", "log_q", "log_p", "grad_mu", "grad_rho", "w (backward)"]
    for other in results[1:]:
        for name, a, b in zip(names, results[0], other):
            if backend == "python" and name != "eps":
                # The fallback's eps is integer Philox + float64 math: bitwise stable. Its w, log q,
                # log p and gradients go through torch's own float kernels (F.softplus, sigmoid),
                # which round the tail of each thread's chunk differently (an ulp or two).
                torch.testing.assert_close(a, b, rtol=1e-6 if dtype == torch.float32 else 1e-14, atol=1e-12)
            else:
                assert torch.equal(a, b), name


@pytest.mark.parametrize("start", [0, 1, 2, 3, 5, 6, 7, 4097, 2 ** 33 + 3])
@pytest.mark.parametrize("numel", [1, 2, 3, 5, 13])
def test_fallback_slice_equals_full_stream(start, numel):
    seed, offset = as_int64(0xABCDEF0123456789), 4
    part = _philox.normal(numel, seed, offset, dtype=torch.float64, start=start)
    assert part.shape == (numel,)
    if start < 10_000:
        full = _philox.normal(start + numel + 3, seed, offset, dtype=torch.float64)
        assert torch.equal(part, full[start:start + numel])
    ref = np_design_normals(numel, seed, offset, start=start)
    np.testing.assert_allclose(part.numpy(), ref, rtol=1e-12, atol=1e-12)


def test_compiled_block_slice_equals_full(compiled):
    seed = seed_tensor(99)
    full = compiled.philox4x32(seed, 3, 0, 40)
    for first in (0, 1, 7, 33):
        part = compiled.philox4x32(seed, 3, first, 40 - first)
        assert torch.equal(part, full[first:])
    assert compiled.philox4x32(seed, 3, 5, 0).shape == (0, 4)


@pytest.mark.parametrize("start", [0, 3, 4, 17])
def test_fallback_chunking_does_not_change_the_stream(monkeypatch, start):
    """The pure-PyTorch generator works in chunks of CHUNK_BLOCKS blocks; the stream must not see them."""
    numel = 4 * 37 + 3
    whole = _philox.normal(numel, 77, 5, dtype=torch.float64, start=start)
    monkeypatch.setattr(_philox, "CHUNK_BLOCKS", 4)
    chunked = _philox.normal(numel, 77, 5, dtype=torch.float64, start=start)
    assert torch.equal(whole, chunked)
    assert torch.equal(chunked[5:9], _philox.normal(4, 77, 5, dtype=torch.float64, start=start + 5))
