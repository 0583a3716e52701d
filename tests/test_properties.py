"""Property-based tests (hypothesis): the compiled ops (torch.ops.bayes_ext) against the pure-PyTorch
reference ops (torch.ops.bayes_ext_py) on random shapes (0-4 dims, zero-size included), dtypes,
priors (pi in [0, 1], sigmas in [1e-8, 10]), seeds (the whole int64 range: the seed's bits are read
as uint64), offsets, starts, rho in [-100, 100], mu up to +/-1e4 and non-contiguous / expanded
layouts. Both must agree within dtype-appropriate tolerances and every output must be finite.

Profiles (tests/hypothesis_profiles.py): "ci" (default, derandomized, >= 500 examples in total),
"long" (HYPOTHESIS_PROFILE=long, by hand) and "sanitize" (tools/sanitize.sh).

Tolerances. The two backends draw the same eps (integer Philox; the compiled float32 path uses
polynomial log / sincos, ~1e-6 relative) and evaluate the same formulas in a different order, so
each output is compared on its own scale:
- w: |dw| <= rtol * (|mu| + sigma (|eps| + 1)) (the float32 sincos error is absolute, ~1e-6 of
  the radius, so eps near 0 is not compared relatively; plus a few of the dtype's smallest normal numbers: the
  compiled float32 kernels flush subnormal results to zero);
- log q, log p: sums of n terms accumulated in double, compared relative to sum |term|;
- gradients: relative to the largest |gradient| of the tensor. d log p / dw = -w / sigma_k^2 makes
  the gradient ill-conditioned for a narrow prior component (an ulp of w is amplified by
  1 / sigma_k^2), so the float32 comparison is on the scale of the whole gradient tensor.
"""
import math

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import bayes_ext
from bayes_ext import _fallback
from hypothesis_profiles import PROFILE
from helpers import seed_tensor

pytestmark = pytest.mark.skipif(not bayes_ext.extension_available(),
                                reason=f"compiled extension not available: {bayes_ext.extension_load_error()}")


@pytest.fixture(autouse=True)
def ieee_subnormals():
    """Subnormals as IEEE has them: on torch 2.5 a torch.compile test earlier in the session can leave
    the CPU flushing them to zero (code built with -ffast-math sets the FPU state on load), and
    hypothesis then refuses to draw floats."""
    torch.set_flush_denormal(False)


RTOL = {torch.float32: 2e-5, torch.float64: 1e-11}
# gradients, relative to the largest |gradient|: float32 is ill-conditioned under a narrow prior
# component
GRAD_RTOL = {torch.float32: 1e-3, torch.float64: 1e-9}
MAX_NUMEL = 4096

dtypes = st.sampled_from([torch.float32, torch.float64])
# 0-4 dims, zero-size dims included; occasionally one long dim that spans several 16384-element
# chunks of the CPU kernel and every vector-tail length.
small_shapes = st.lists(st.integers(0, 9), min_size=0, max_size=4).map(tuple)
long_shapes = st.integers(16380, 33000).map(lambda n: (n,))
shapes = st.one_of(small_shapes, small_shapes, small_shapes, long_shapes)
sigmas = st.one_of(st.floats(-8.0, 1.0).map(lambda e: 10.0 ** e), st.floats(1e-8, 10.0), st.sampled_from([1e-8, 10.0]))
pis = st.one_of(st.sampled_from([0.0, 1.0, 0.5]), st.floats(0.0, 1.0))
priors = st.tuples(pis, sigmas, sigmas)
seeds = st.one_of(st.integers(-2 ** 63, 2 ** 63 - 1), st.sampled_from([0, -1, 2 ** 63 - 1, -2 ** 63, 2 ** 32, 2 ** 32 - 1]))
offsets = st.one_of(st.integers(0, 2 ** 63 - 1), st.integers(0, 3), st.sampled_from([2 ** 32 - 1, 2 ** 32]))
layouts = st.sampled_from(["contiguous", "contiguous", "transposed", "strided", "expanded"])
# (centre, spread) of rho: rho = clamp(centre + spread * N(0, 1), -100, 100); plus extreme values
rho_centres = st.one_of(st.floats(-100.0, 100.0), st.sampled_from([-100.0, -30.0, -20.0, -7.0, 0.0, 30.0, 100.0]))
spreads = st.sampled_from([0.0, 0.1, 1.0, 10.0, 100.0])
mu_scales = st.sampled_from([0.0, 1e-3, 1.0, 100.0, 1e4])


def _start(draw, numel):
    high = 2 ** 62 - numel
    return draw(st.one_of(st.just(0), st.integers(0, 7), st.integers(0, high), st.just(high)))


def _make(shape, layout, gen, dtype, fill):
    """A tensor of `shape` in the given memory layout whose values come from fill(shape)."""
    if layout == "transposed" and len(shape) >= 2:
        return fill(shape[::-1]).to(dtype).permute(*reversed(range(len(shape))))
    if layout == "strided" and len(shape) >= 1:
        big = fill(shape[:-1] + (2 * shape[-1] + 1,)).to(dtype)
        return big[..., 1::2]
    if layout == "expanded" and len(shape) >= 1:
        return fill(shape[:-1] + (1,)).to(dtype).expand(shape)
    return fill(shape).to(dtype)


@st.composite
def posteriors(draw):
    """(mu, rho, dtype, gen) with mu up to +/-1e4, rho in [-100, 100], in some memory layout."""
    dtype = draw(dtypes)
    shape = draw(shapes)
    numel = math.prod(shape)
    assume(numel <= MAX_NUMEL or len(shape) == 1)
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2 ** 32 - 1)))
    layout = draw(layouts)
    mu_scale, centre, spread = draw(mu_scales), draw(rho_centres), draw(spreads)
    mu = _make(shape, layout, gen, dtype,
               lambda s: (mu_scale * torch.randn(s, generator=gen, dtype=torch.float64)).clamp(-1e4, 1e4))
    rho = _make(shape, draw(layouts), gen, dtype,
                lambda s: (centre + spread * torch.randn(s, generator=gen, dtype=torch.float64)).clamp(-100, 100))
    assert mu.shape == rho.shape == shape
    return mu, rho, dtype, gen


def _close(got, ref, scale, rtol, what):
    """|got - ref| <= rtol * scale elementwise (scale broadcast), with a readable failure."""
    dtype = got.dtype
    got, ref = got.double(), ref.double()
    scale = torch.as_tensor(scale, dtype=torch.float64)
    # below the smallest normal number the compiled float32 kernels flush to zero (FTZ): an
    # absolute floor of a few tiny() ignores that
    bound = rtol * scale + 4 * torch.finfo(dtype).tiny
    bad = (got - ref).abs() > bound
    if bad.any():
        idx = bad.nonzero()[0].tolist() if bad.dim() else []
        g = got[tuple(idx)].item() if idx else got.item()
        r = ref[tuple(idx)].item() if idx else ref.item()
        s = scale.expand_as(got)[tuple(idx)].item() if scale.dim() and idx else scale.max().item()
        raise AssertionError(f"{what}: {bad.sum().item()} mismatches, first at {idx}: compiled {g!r} vs "
                             f"reference {r!r} (allowed {rtol} * {s!r})")


def _grad_floor(dtype, prior, grad_log_p):
    """Absolute floor of the gradient comparison. The compiled float32 kernels give sigma = 0 for
    rho < -87.3 (exp underflows to 0, no subnormals), so w = mu exactly there, while the reference
    keeps a subnormal sigma (< 1.2e-38); the gradients then differ by up to
    |grad_log_p| / sigma_k^2 * sigma |eps| (and grad_rho by a sigmoid(rho) of the same size)."""
    if dtype != torch.float32:
        return 1e-300
    b_max = 1.0 / min(prior[1], prior[2]) ** 2
    return 10 * (abs(float(grad_log_p)) + 1.0) * b_max * 6.0 * torch.finfo(torch.float32).tiny


def _all_finite(*tensors):
    return all(bool(torch.isfinite(t).all()) for t in tensors)


def _sigma64(rho):
    return torch.nn.functional.softplus(rho.double())


@PROFILE
@given(post=posteriors(), prior=priors, seed=seeds, offset=offsets, data=st.data())
def test_sample_weight_matches_reference(post, prior, seed, offset, data):
    mu, rho, dtype, _ = post
    start = _start(data.draw, mu.numel())
    s = seed_tensor(seed)
    w, log_q, log_p = torch.ops.bayes_ext.sample_weight(mu, rho, s, offset, *prior, start)
    rw, rlog_q, rlog_p = torch.ops.bayes_ext_py.sample_weight(mu, rho, s, offset, *prior, start)
    assert w.shape == mu.shape and w.dtype == dtype and w.is_contiguous()
    assert log_q.shape == log_p.shape == () and log_q.dtype == log_p.dtype == dtype
    assert _all_finite(w, log_q, log_p), (w, log_q, log_p)
    assert _all_finite(rw, rlog_q, rlog_p)

    rtol = RTOL[dtype]
    eps = torch.ops.bayes_ext_py.philox_normal(mu, s, offset, start).double()
    sigma = _sigma64(rho)
    _close(w, rw, mu.double().abs() + sigma * (eps.abs() + 1), rtol, "w")
    # log q = sum(-log sqrt(2 pi) - log sigma - eps^2 / 2)
    _, log_sigma, _, _ = _fallback.softplus_terms(rho.double())
    q_scale = (log_sigma.abs() + 0.5 * eps ** 2 + _fallback.HALF_LOG_2PI).sum() + 1.0
    _close(log_q, rlog_q, q_scale, rtol, "log_q")
    p_scale = _fallback.log_prior_terms(rw.double(), *prior).abs().sum() + 1.0
    # log p of float32 w: an ulp of w moves each term by |w| ulp(w) / sigma_k^2
    if dtype == torch.float32:
        b_max = 1.0 / min(prior[1], prior[2]) ** 2
        p_scale = p_scale + (b_max * rw.double() ** 2).sum() * 1e-2
    _close(log_p, rlog_p, p_scale, rtol * 10, "log_p")


@PROFILE
@given(post=posteriors(), prior=priors, seed=seeds, offset=offsets, data=st.data())
def test_sample_weight_backward_matches_reference(post, prior, seed, offset, data):
    mu, rho, dtype, gen = post
    start = _start(data.draw, mu.numel())
    s = seed_tensor(seed)
    with_grad_w = data.draw(st.booleans())
    return_weight = data.draw(st.booleans())
    grad_w = None
    if with_grad_w:
        scale = data.draw(st.sampled_from([0.0, 1e-3, 1.0, 1e3]))
        grad_w = _make(mu.shape, data.draw(layouts), gen, dtype,
                       lambda sh: scale * torch.randn(sh, generator=gen, dtype=torch.float64))
    glq = torch.tensor(data.draw(st.floats(-10.0, 10.0)), dtype=dtype)
    glp = torch.tensor(data.draw(st.floats(-10.0, 10.0)), dtype=dtype)
    args = (grad_w, glq, glp, mu, rho, s, offset, *prior, return_weight, start)
    got = torch.ops.bayes_ext.sample_weight_backward(*args)
    ref = torch.ops.bayes_ext_py.sample_weight_backward(*args)
    for name, g, r in zip(("grad_mu", "grad_rho", "w"), got, ref):
        assert g.shape == r.shape and g.dtype == r.dtype == dtype, name
        assert g.is_contiguous(), name
        assert _all_finite(g), (name, g)
        assert _all_finite(r), (name, r)
    if not return_weight:
        assert got[2].numel() == 0
    rtol = RTOL[dtype]
    # float32: a narrow prior component makes d log p / dw ill-conditioned (module docstring)
    grad_rtol = GRAD_RTOL[dtype]
    floor = _grad_floor(dtype, prior, glp)
    for name, g, r in zip(("grad_mu", "grad_rho"), got[:2], ref[:2]):
        scale = r.double().abs().max().item() if r.numel() else 0.0
        _close(g, r, scale + floor / grad_rtol, grad_rtol, name)
    if return_weight:
        w = torch.ops.bayes_ext_py.sample_weight(mu, rho, s, offset, *prior, start)[0]
        assert torch.equal(ref[2], w)
        eps = torch.ops.bayes_ext_py.philox_normal(mu, s, offset, start).double()
        scale = mu.double().abs() + _sigma64(rho) * (eps.abs() + 1)
        _close(got[2], ref[2], scale, rtol, "w (backward)")
        # the compiled op's backward writes exactly the weight its forward sampled
        assert torch.equal(got[2], torch.ops.bayes_ext.sample_weight(mu, rho, s, offset, *prior, start)[0])


@PROFILE
@given(dtype=dtypes, shape=shapes, layout=layouts, seed=seeds, offset=offsets, data=st.data())
def test_philox_normal_matches_reference(dtype, shape, layout, seed, offset, data):
    assume(math.prod(shape) <= MAX_NUMEL or len(shape) == 1)
    gen = torch.Generator().manual_seed(0)
    like = _make(shape, layout, gen, dtype, lambda s: torch.full(s, float("nan"), dtype=torch.float64))
    start = _start(data.draw, like.numel())
    s = seed_tensor(seed)
    eps = torch.ops.bayes_ext.philox_normal(like, s, offset, start)
    ref = torch.ops.bayes_ext_py.philox_normal(like, s, offset, start)
    assert eps.shape == ref.shape == like.shape and eps.dtype == ref.dtype == dtype and eps.is_contiguous()
    assert _all_finite(eps, ref)
    assert eps.numel() == 0 or eps.abs().max().item() <= math.sqrt(48 * math.log(2)) + 1e-5
    # values depend only on the logical index, not on the layout of `like`
    assert torch.equal(eps, torch.ops.bayes_ext.philox_normal(torch.empty(shape, dtype=dtype), s, offset, start))
    # float32: polynomial log / sincos (~1e-6 relative), radius up to 5.8
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(eps, ref, rtol=tol, atol=tol)


@PROFILE
@given(post=posteriors(), prior=priors, seed=seeds, offset=offsets, data=st.data())
def test_autograd_matches_reference(post, prior, seed, offset, data):
    """Through the registered autograd (what the layers use): a random linear functional of w,
    log q and log p, differentiated on both backends."""
    mu, rho, dtype, gen = post
    start = _start(data.draw, mu.numel())
    s = seed_tensor(seed)
    a, b = data.draw(st.floats(-2.0, 2.0)), data.draw(st.floats(-2.0, 2.0))
    v = torch.randn(mu.shape, generator=gen, dtype=torch.float64).to(dtype)
    results = []
    for ns in (torch.ops.bayes_ext, torch.ops.bayes_ext_py):
        m = mu.detach().clone().requires_grad_(True)
        r = rho.detach().clone().requires_grad_(True)
        w, log_q, log_p = ns.sample_weight(m, r, s, offset, *prior, start)
        loss = (w * v).sum() + a * log_q + b * log_p
        loss.backward()
        results.append((m.grad, r.grad))
    floor = _grad_floor(dtype, prior, b)
    for name, g, r in zip(("grad_mu", "grad_rho"), *results):
        assert g.shape == mu.shape and _all_finite(g, r), name
        scale = r.double().abs().max().item() if r.numel() else 0.0
        _close(g, r, scale + floor / GRAD_RTOL[dtype], GRAD_RTOL[dtype], name)


def test_fallback_softplus_above_threshold_matches_design():
    """The fallback once used F.softplus, which returns rho itself above 20."""
    rho = torch.tensor([20.5, 22.0, 25.0, 30.0], dtype=torch.float64)
    mu = torch.zeros_like(rho)
    s = seed_tensor(7)
    eps = torch.ops.bayes_ext_py.philox_normal(mu, s, 0)
    exact = (rho.clamp_min(0) + torch.log1p(torch.exp(-rho.abs()))) * eps
    w = torch.ops.bayes_ext_py.sample_weight(mu, rho, s, 0, 1.0, 0.1, 0.4)[0]
    torch.testing.assert_close(w, exact, rtol=1e-14, atol=0)
