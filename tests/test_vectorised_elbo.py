"""The vectorised multi-sample path of sample_elbo / sample_elbo_detailed_loss / mfvi_forward
(issue 5): the N samples as one batched forward through bayes_ext::linear_reparam_samples.

- The op: sample s equals the single-sample op on x[s] with seeds[s]; hand-written backward
  against gradcheck; autograd saves only x and the seeds, whatever N.
- The model path: for the same torch.manual_seed, the same loss, parameter and input gradients,
  KL terms and generator state as the plain loop (float64, both backends).
- Automatic selection: unsupported Bayesian layers, batch-statistics modules, dropout and models
  that move the batch out of dim 0 run the loop; vectorized=True refuses them with a ValueError.
"""
import pytest
import torch
from torch import nn

from bayes_ext import functional as BF
from bayes_ext import functional_samples as FS
from bayes_ext.modules import BayesianLinear
from bayes_ext.utils import variational_estimator
from bayes_ext.utils import vectorised as V

F64 = torch.float64
PRIOR = (0.5, 0.1, 0.4)


# ---- the op ---------------------------------------------------------------------------------

def _params(out_f, in_f, bias=True, dtype=F64):
    g = torch.Generator().manual_seed(1)
    wm = torch.randn(out_f, in_f, dtype=dtype, generator=g).mul_(0.3).requires_grad_()
    wr = (torch.randn(out_f, in_f, dtype=dtype, generator=g) - 3).requires_grad_()
    if not bias:
        return wm, wr, None, None
    bm = torch.randn(out_f, dtype=dtype, generator=g).mul_(0.3).requires_grad_()
    br = (torch.randn(out_f, dtype=dtype, generator=g) - 3).requires_grad_()
    return wm, wr, bm, br


def _grads(tensors):
    return [None if t is None or t.grad is None else t.grad.clone() for t in tensors]


def _clear(tensors):
    for t in tensors:
        if t is not None:
            t.grad = None


@pytest.mark.parametrize("path", ["whole", "blocks"])
@pytest.mark.parametrize("bias", [True, False])
def test_op_equals_single_sample_op(backend, monkeypatch, path, bias):
    """Sample s of the batched op = bayes_ext::linear_reparam on x[s] with seeds[s], values and
    gradients (whole weights, and blocks of rows as for large weights on the CPU)."""
    if path == "blocks":
        monkeypatch.setattr(BF, "BLOCK_ELEMENTS", 16)  # 7 x 9 weight -> blocks of one row
        monkeypatch.setattr(BF, "FALLBACK_BLOCK_ELEMENTS", 16)
    params = _params(7, 9, bias)
    x = torch.randn(3, 2, 5, 9, dtype=F64, requires_grad=True)
    seeds = torch.tensor([5, -2 ** 62, 2 ** 62 + 123], dtype=torch.int64)
    y, log_q, log_p = FS.bayesian_linear_samples(x, *params, seeds, PRIOR)
    assert y.shape == (3, 2, 5, 7) and log_q.shape == (3,) and log_p.shape == (3,)
    w_out = torch.randn_like(y)
    ((y * w_out).sum() + 0.3 * log_q.sum() - 0.7 * (log_p * torch.arange(1.0, 4.0, dtype=F64)).sum()).backward()
    tensors = (x,) + params
    got = _grads(tensors)
    _clear(tensors)
    total = 0
    for s in range(3):
        y_s, q_s, p_s = BF.bayesian_linear(x[s], *params, seeds[s:s + 1], PRIOR)
        torch.testing.assert_close(y_s, y[s], rtol=0, atol=1e-12)
        torch.testing.assert_close(q_s, log_q[s], rtol=1e-13, atol=1e-10)
        torch.testing.assert_close(p_s, log_p[s], rtol=1e-13, atol=1e-10)
        total = total + (y_s * w_out[s]).sum() + 0.3 * q_s - 0.7 * (s + 1) * p_s
    total.backward()
    for g, t in zip(got, tensors):
        if t is not None:
            torch.testing.assert_close(g, t.grad, rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("need_x", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_whole_layer_op_equals_the_python_steps(compiled, bias, need_x, dtype):
    """bayes_ext::linear_samples_stacked (the CPU's one-call layer) runs the same ops in the same
    order as the Python steps of the stacked path: bit-identical outputs and gradients."""
    wm, wr, bm, br = (None if t is None else t.detach() for t in _params(6, 5, bias, dtype))
    x = torch.randn(4, 3, 2, 5, dtype=dtype)
    seeds = torch.tensor([3, -9, 2 ** 62, 0], dtype=torch.int64)
    y, log_q, log_p = compiled.linear_samples_stacked(x, wm, wr, bm, br, seeds, *PRIOR)
    w, q, p = compiled.sample_weight_samples(wm, wr, seeds, 0, *PRIOR)
    ref = torch.bmm(x.reshape(4, -1, 5), w.transpose(1, 2))
    if bias:
        b, qb, pb = compiled.sample_weight_samples(bm, br, seeds, 1, *PRIOR)
        ref.add_(b.unsqueeze(1))
        q, p = q + qb, p + pb
    assert y.shape == (4, 3, 2, 6)
    assert torch.equal(y, ref.view(4, 3, 2, 6)) and torch.equal(log_q, q) and torch.equal(log_p, p)

    g = torch.randn_like(y)
    glq, glp = torch.randn(4, dtype=dtype), torch.randn(4, dtype=dtype)
    gx, gmu, grho, gbm, gbr = compiled.linear_samples_stacked_backward(g, glq, glp, x, wm, wr, bm, br, seeds, *PRIOR,
                                                                       need_x)
    g3 = g.reshape(4, -1, 6)
    rmu, rrho, rw = compiled.sample_weight_samples_backward(torch.bmm(g3.transpose(1, 2), x.reshape(4, -1, 5)), glq,
                                                            glp, wm, wr, seeds, 0, *PRIOR, need_x)
    assert torch.equal(gmu, rmu) and torch.equal(grho, rrho)
    if need_x:
        assert torch.equal(gx, torch.bmm(g3, rw).view(x.shape))
    else:
        assert gx.numel() == 0
    if bias:
        rbm, rbr, _ = compiled.sample_weight_samples_backward(g3.sum(1), glq, glp, bm, br, seeds, 1, *PRIOR, False)
        assert torch.equal(gbm, rbm) and torch.equal(gbr, rbr)
    else:
        assert gbm.numel() == 0 and gbr.numel() == 0


def test_whole_layer_op_equals_the_python_steps_on_any_thread_count(compiled):
    """The CPU's whole-layer op with a bias, on 1, 2 and 3 threads: bitwise the values of the
    separate multi-seed calls and bmm (rho of both signs, so tiles take both of the kernels' paths;
    sizes over the ops' parallel threshold, so the weight's work is split over the threads)."""
    g = torch.Generator().manual_seed(5)
    wm, wr = 0.2 * torch.randn(9, 1001, generator=g), torch.randn(9, 1001, generator=g) * 0.5 - 3
    bm, br = 0.2 * torch.randn(9, generator=g), torch.randn(9, generator=g) * 0.5 - 3
    wr.view(-1)[::617] = 0.5
    br[2] = 0.5
    seeds = torch.randint(0, 2 ** 62, (8,), generator=g)
    x, g_out = torch.randn(8 * 3, 1001, generator=g), torch.randn(8 * 3, 9, generator=g)
    glq, glp = torch.randn(8, generator=g), torch.randn(8, generator=g)
    x3, g3 = x.view(8, 3, 1001), g_out.view(8, 3, 9)
    previous = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            y, log_q, log_p = compiled.linear_samples_stacked(x, wm, wr, bm, br, seeds, *PRIOR)
            grads = compiled.linear_samples_stacked_backward(g_out, glq, glp, x, wm, wr, bm, br, seeds, *PRIOR, True)
            w, q, p = compiled.sample_weight_samples(wm, wr, seeds, 0, *PRIOR)
            b, qb, pb = compiled.sample_weight_samples(bm, br, seeds, 1, *PRIOR)
            assert torch.equal(y, torch.bmm(x3, w.transpose(1, 2)).add_(b.unsqueeze(1)).view(y.shape))
            assert torch.equal(log_q, q + qb) and torch.equal(log_p, p + pb)
            rmu, rrho, rw = compiled.sample_weight_samples_backward(torch.bmm(g3.transpose(1, 2), x3), glq, glp, wm,
                                                                    wr, seeds, 0, *PRIOR, True)
            rbm, rbr, _ = compiled.sample_weight_samples_backward(g3.sum(1), glq, glp, bm, br, seeds, 1, *PRIOR, False)
            expected = (torch.bmm(g3, rw).view(x.shape), rmu, rrho, rbm, rbr)
            for a, e in zip(grads, expected):
                assert torch.equal(a, e)
    finally:
        torch.set_num_threads(previous)


def test_whole_layer_op_takes_the_samples_grouped_in_dim_0(compiled):
    """x of shape (N*B, ..., I), as the vectorised ELBO's layers see it: sample s is rows
    [s*B, (s+1)*B) of dim 0, the same numbers as (N, B, ..., I), and the gradients likewise."""
    wm, wr, bm, br = _params(6, 5, True, F64)
    seeds = torch.tensor([3, -9, 2 ** 62], dtype=torch.int64)
    x = torch.randn(3, 4, 2, 5, dtype=F64, requires_grad=True)
    y, log_q, log_p = compiled.linear_samples_stacked(x, wm, wr, bm, br, seeds, *PRIOR)
    (y.square().sum() + log_q.sum() - 2 * log_p.sum()).backward()
    expected = [y.detach().flatten(0, 1), log_q.detach(), log_p.detach()] + _grads([x, wm, wr, bm, br])
    _clear([x, wm, wr, bm, br])
    flat = x.detach().flatten(0, 1).requires_grad_()
    y2, log_q2, log_p2 = compiled.linear_samples_stacked(flat, wm, wr, bm, br, torch.stack([-seeds, seeds], 1)[:, 1],
                                                         *PRIOR)  # strided seeds are read in place
    assert y2.shape == (12, 2, 6)
    (y2.square().sum() + log_q2.sum() - 2 * log_p2.sum()).backward()
    got = [y2.detach(), log_q2.detach(), log_p2.detach(), flat.grad.view(x.shape)] + _grads([wm, wr, bm, br])
    for a, b in zip(got, expected):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="x must be"):  # 10 rows do not split into 3 samples
        compiled.linear_samples_stacked(torch.randn(10, 5, dtype=F64), wm, wr, bm, br, seeds, *PRIOR)


@pytest.mark.parametrize("used", ["output", "log_q", "log_p"])
def test_backward_through_one_output_only(backend, used):
    """An unused output gets no gradient from autograd (the compiled path's C++ autograd and the
    Python one both fill in zeros): the gradients equal those of the same loss with the other
    outputs multiplied by zero."""
    params = _params(6, 5, True)
    x = torch.randn(3, 4, 5, dtype=F64, requires_grad=True)
    seeds = torch.tensor([7, 8, 9], dtype=torch.int64)
    pick = {"output": lambda y, q, p: y.sum(), "log_q": lambda y, q, p: q.sum(), "log_p": lambda y, q, p: p.sum()}
    pick[used](*FS.bayesian_linear_samples(x, *params, seeds, PRIOR)).backward()
    got = _grads((x,) + params)
    _clear((x,) + params)
    y, q, p = FS.bayesian_linear_samples(x, *params, seeds, PRIOR)
    (pick[used](y, q, p) + 0 * (y.sum() + q.sum() + p.sum())).backward()
    for a, t in zip(got, (x,) + params):
        torch.testing.assert_close(a if a is not None else torch.zeros_like(t), t.grad, rtol=0, atol=0)


def test_eager_cpu_calls_take_the_compiled_autograd(compiled):
    """On the compiled backend an eager CPU call of a small layer runs the whole-layer op with its
    C++ autograd (one node, no Python in forward or backward)."""
    params = _params(6, 5, True, torch.float32)
    y, _, _ = FS.bayesian_linear_samples(torch.randn(2, 3, 5), *params, torch.tensor([1, 2]), PRIOR)
    assert type(y.grad_fn).__name__ == "CppFunction"


def test_whole_layer_op_rejects_bad_arguments(compiled):
    wm, wr, bm, br = (t.detach() for t in _params(6, 5, True, torch.float32))
    seeds = torch.tensor([1, 2], dtype=torch.int64)
    x = torch.randn(2, 3, 5)
    with pytest.raises(ValueError, match="x must be"):
        compiled.linear_samples_stacked(torch.randn(3, 3, 5), wm, wr, bm, br, seeds, *PRIOR)  # 3 samples, 2 seeds
    with pytest.raises(ValueError, match="x must be"):
        compiled.linear_samples_stacked(torch.randn(2, 3, 4), wm, wr, bm, br, seeds, *PRIOR)  # in_features
    with pytest.raises(TypeError, match="x must have the dtype"):
        compiled.linear_samples_stacked(x.double(), wm, wr, bm, br, seeds, *PRIOR)
    with pytest.raises(ValueError, match="bias_mu and bias_rho"):
        compiled.linear_samples_stacked(x, wm, wr, bm, None, seeds, *PRIOR)
    with pytest.raises(TypeError, match="seeds must be an int64"):
        compiled.linear_samples_stacked(x, wm, wr, bm, br, seeds.float(), *PRIOR)
    y = compiled.linear_samples_stacked(x, wm, wr, bm, br, seeds, *PRIOR)[0]
    with pytest.raises(ValueError, match="grad_out must have shape"):
        compiled.linear_samples_stacked_backward(y[:, :2], torch.ones(2), torch.ones(2), x, wm, wr, bm, br, seeds,
                                                 *PRIOR, True)
    with pytest.raises(TypeError, match="grad_out must have the dtype"):
        compiled.linear_samples_stacked_backward(y.double(), torch.ones(2), torch.ones(2), x, wm, wr, bm, br, seeds,
                                                 *PRIOR, True)


@pytest.mark.parametrize("bias", [True, False])
def test_op_gradcheck(backend, bias):
    params = _params(3, 4, bias)
    x = torch.randn(2, 3, 4, dtype=F64, requires_grad=True)
    seeds = torch.tensor([11, 12], dtype=torch.int64)

    def f(x, wm, wr, *b):
        bm, br = b if b else (None, None)
        return FS.bayesian_linear_samples(x, wm, wr, bm, br, seeds, PRIOR)

    inputs = (x,) + tuple(p for p in params if p is not None)
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-6)


def test_custom_op_opcheck_and_gradcheck(backend):
    """The registered op itself (what compiled graphs call; eager calls run the same functions
    through an autograd.Function): schema, fake kernel, autograd registration."""
    wm, wr, bm, br = _params(3, 4)
    x = torch.randn(2, 3, 4, dtype=F64, requires_grad=True)
    seeds = torch.tensor([11, 12], dtype=torch.int64)
    op = torch.ops.bayes_ext.linear_reparam_samples
    torch.library.opcheck(op, (x, wm, wr, bm, br, seeds, *PRIOR))
    torch.library.opcheck(op, (x, wm, wr, None, None, seeds, *PRIOR))
    assert torch.autograd.gradcheck(lambda *t: op(*t, seeds, *PRIOR), (x, wm, wr, bm, br), eps=1e-6, atol=1e-6)


def _saved_beyond_the_input(run, x, params):
    """Bytes autograd saves during run() besides x and the parameters (each storage counted once)."""
    param_ptrs = {p.untyped_storage().data_ptr() for p in params if p is not None}
    seen, total = set(), [0]

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in param_ptrs and ptr not in seen:
            seen.add(ptr)
            total[0] += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    return total[0] - x.numel() * x.element_size(), out


@pytest.mark.parametrize("n", [1, 4, 8])
def test_op_saves_only_the_input(backend, n):
    """Saved for backward: x and the N seeds (8 bytes each), no weight-sized tensor, whatever N."""
    params = _params(64, 32, dtype=torch.float32)
    x = torch.randn(n, 16, 32, requires_grad=True)
    extra, (y, log_q, log_p) = _saved_beyond_the_input(
        lambda: FS.bayesian_linear_samples(x, *params, FS.draw_seeds(n)), x, params)
    assert 0 <= extra <= 256, extra
    (y.sum() + log_q.sum()).backward()  # and backward works from what was saved


# ---- the Flipout layers' samples op (bayes_ext/functional_flipout_samples.py) ----------------------

@pytest.mark.parametrize("bias", [True, False])
def test_flipout_samples_op_equals_single_sample_calls(backend, bias):
    """Sample s of linear_flipout_samples is linear_flipout on rows [s*B, (s+1)*B) with seeds[s]:
    outputs, log q / log p and the gradients summed over the samples."""
    from bayes_ext import functional_estimators as BFE
    from bayes_ext import functional_flipout_samples as FFS
    params = _params(6, 5, bias)
    inputs = [p for p in params if p is not None]
    x = torch.randn(3 * 4, 2, 5, dtype=F64, requires_grad=True)
    g = torch.randn(3 * 4, 2, 6, dtype=F64)
    seeds = torch.tensor([3, -9, 2 ** 62], dtype=torch.int64)
    y, log_q, log_p = FFS.linear_flipout_samples(x, *params, seeds, PRIOR)
    got = torch.autograd.grad((y * g).sum() + (log_q * torch.arange(1.0, 4.0, dtype=F64)).sum() - log_p.sum(),
                              [x] + inputs)
    ref_y, ref_q, ref_p = [], [], []
    for s in range(3):
        y_s, q_s, p_s = BFE.linear_flipout(x[4 * s:4 * s + 4], *params, seed=seeds[s], prior=PRIOR)
        ref_y.append(y_s)
        ref_q.append(q_s)
        ref_p.append(p_s)
    ref_y, ref_q, ref_p = torch.cat(ref_y), torch.stack(ref_q), torch.stack(ref_p)
    ref = torch.autograd.grad((ref_y * g).sum() + (ref_q * torch.arange(1.0, 4.0, dtype=F64)).sum() - ref_p.sum(),
                              [x] + inputs)
    torch.testing.assert_close(y, ref_y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(log_q, ref_q, rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(log_p, ref_p, rtol=1e-12, atol=1e-10)
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_flipout_samples_op_opcheck_and_gradcheck(backend):
    from bayes_ext import functional_flipout_samples as FFS  # registers the op
    wm, wr, bm, br = _params(3, 4)
    x = torch.randn(2 * 3, 4, dtype=F64, requires_grad=True)
    seeds = torch.tensor([11, 12], dtype=torch.int64)
    op = torch.ops.bayes_ext.linear_flipout_samples
    for args in ((x, wm, wr, bm, br, seeds, *PRIOR), (x, wm, wr, None, None, seeds, *PRIOR)):
        result = torch.library.opcheck(op, args)
        assert all(v == "SUCCESS" for v in result.values()), result
    assert torch.autograd.gradcheck(lambda *t: FFS.linear_flipout_samples(*t, seeds, PRIOR), (x, wm, wr, bm, br),
                                    eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("n", [1, 8])
def test_flipout_samples_op_saves_only_the_input(backend, n):
    """Saved for backward: x and the N seeds, no weight-sized tensor and no signs, whatever N."""
    from bayes_ext import functional_flipout_samples as FFS
    params = _params(64, 32, dtype=torch.float32)
    x = torch.randn(n * 16, 32, requires_grad=True)
    extra, (y, log_q, log_p) = _saved_beyond_the_input(
        lambda: FFS.linear_flipout_samples(x, *params, FS.draw_seeds(n), PRIOR), x, params)
    assert 0 <= extra <= 256, extra
    (y.sum() + log_q.sum()).backward()


def test_flipout_samples_op_bad_inputs():
    from bayes_ext import functional_flipout_samples as FFS
    wm, wr, bm, br = _params(3, 4)
    x = torch.randn(6, 4, dtype=F64)
    with pytest.raises(ValueError, match="x must hold the 4 samples"):
        FFS.linear_flipout_samples(x, wm, wr, bm, br, torch.tensor([1, 2, 3, 4]), PRIOR)
    with pytest.raises(TypeError, match="seeds must be an int64"):
        FFS.linear_flipout_samples(x, wm, wr, bm, br, torch.tensor([1.0, 2.0]), PRIOR)
    with pytest.raises(ValueError, match="input must have 4 features"):
        FFS.linear_flipout_samples(torch.randn(6, 5, dtype=F64), wm, wr, bm, br, torch.tensor([1, 2]), PRIOR)


def test_flipout_under_autocast_runs_the_loop(monkeypatch):
    """Autocast's mixed precision is the single-sample op's: automatic selection runs the loop, and
    vectorized=True says why."""
    model = WithExtra(nn.Identity(), BayesianLinear(5, 8, estimator="flipout"))
    x, y = torch.randn(4, 5), torch.randn(4, 2)
    spy = Spy(monkeypatch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model.sample_elbo(x, y, nn.MSELoss(), 3)
        assert spy.forwards == 1 and spy.calls == 1  # tried once, refused, then the loop
        with pytest.raises(V.NotVectorisable, match="Flipout layers run vectorised only"):
            model.sample_elbo(x, y, nn.MSELoss(), 3, vectorized=True)


def test_op_bad_inputs():
    wm, wr, bm, br = _params(3, 4)
    x = torch.randn(2, 5, 4, dtype=F64)
    with pytest.raises(TypeError, match="seeds must be an int64"):
        FS.bayesian_linear_samples(x, wm, wr, bm, br, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="1-D"):
        FS.bayesian_linear_samples(x, wm, wr, bm, br, torch.tensor([[1, 2]]))
    with pytest.raises(ValueError, match="one seed per sample"):
        FS.bayesian_linear_samples(x, wm, wr, bm, br, torch.tensor([1, 2, 3]))
    with pytest.raises(TypeError, match="seeds must be a torch.Tensor"):
        FS.bayesian_linear_samples(x, wm, wr, bm, br, [1, 2])
    with pytest.raises(ValueError, match="samples in dim 0"):
        FS.bayesian_linear_samples(x[0, 0], wm, wr, bm, br, torch.tensor([1]))
    with pytest.raises(ValueError, match="4 features"):
        FS.bayesian_linear_samples(x[..., :3], wm, wr, bm, br, torch.tensor([1, 2]))


# ---- model level: same loss and gradients as the loop ------------------------------------------

@variational_estimator
class Regression(nn.Module):
    """The seed's regression model (13 -> H -> 1, ReLU), small H for the tests."""

    def __init__(self, hidden=32, dtype=F64):
        super().__init__()
        self.l1 = BayesianLinear(13, hidden, prior_pi=0.5, dtype=dtype)
        self.l2 = BayesianLinear(hidden, 1, dtype=dtype)

    def forward(self, x):
        return self.l2(torch.relu(self.l1(x)))


@variational_estimator
class Mixed(nn.Module):
    """Sequence input (B, T, 5), a plain nn.Linear and LayerNorm between the Bayesian layers, a
    bias-free layer, layers called in another order than they were registered, and a registered
    layer that is never called (2 calls per forward for 3 layers: the vectorised path reruns)."""

    def __init__(self):
        super().__init__()
        self.unused = BayesianLinear(3, 3, dtype=F64)
        self.head = BayesianLinear(8, 4, bias=False, dtype=F64)
        self.plain = nn.Linear(6, 8, dtype=F64)
        self.norm = nn.LayerNorm(8, dtype=F64)
        self.body = BayesianLinear(5, 6, dtype=F64)

    def forward(self, x):
        return self.head(self.norm(self.plain(torch.tanh(self.body(x))))).mean(1)


@variational_estimator
class Shared(nn.Module):
    """One layer called twice per forward: 4 calls for 3 layers, so the vectorised path reruns with
    the counted calls."""

    def __init__(self):
        super().__init__()
        self.inp = BayesianLinear(4, 6, dtype=F64)
        self.hidden = BayesianLinear(6, 6, dtype=F64)
        self.out = BayesianLinear(6, 3, dtype=F64)

    def forward(self, x):
        h = torch.sigmoid(self.inp(x))
        h = torch.sigmoid(self.hidden(h))
        return self.out(torch.sigmoid(self.hidden(h)))


@variational_estimator
class LocalReparam(nn.Module):
    """Local reparameterisation with the closed-form KL (its default with a Gaussian prior, and
    kl="closed_form"), beside a reparam layer: each runs its own vectorised op."""

    def __init__(self):
        super().__init__()
        self.l1 = BayesianLinear(13, 16, estimator="lrt", dtype=F64)
        self.l2 = BayesianLinear(16, 8, estimator="lrt", kl="closed_form", prior_sigma_1=0.5, dtype=F64)
        self.l3 = BayesianLinear(8, 1, prior_pi=0.5, dtype=F64)

    def forward(self, x):
        return self.l3(torch.tanh(self.l2(torch.relu(self.l1(x)))))


@variational_estimator
class FlipoutModel(nn.Module):
    """Flipout layers (the mixture prior, a bias and none) beside a reparam layer, on a batch with an
    extra dim: each samples its N weights in its own vectorised op."""

    def __init__(self):
        super().__init__()
        self.l1 = BayesianLinear(13, 16, estimator="flipout", prior_pi=0.5, dtype=F64)
        self.l2 = BayesianLinear(16, 8, estimator="flipout", bias=False, dtype=F64)
        self.l3 = BayesianLinear(8, 1, dtype=F64)

    def forward(self, x):
        return self.l3(torch.tanh(self.l2(torch.relu(self.l1(x)))))


def _regression_data():
    return torch.randn(6, 13, dtype=F64), torch.randn(6, 1, dtype=F64), nn.MSELoss()


def _mixed_data():
    return torch.randn(5, 3, 5, dtype=F64), torch.randn(5, 4, dtype=F64), nn.SmoothL1Loss(reduction="sum")


def _shared_data():
    return torch.randn(7, 4, dtype=F64), torch.randint(0, 3, (7,)), nn.CrossEntropyLoss()


MODELS = {"regression": (Regression, _regression_data), "mixed": (Mixed, _mixed_data),
          "shared": (Shared, _shared_data), "lrt": (LocalReparam, _regression_data),
          "flipout": (FlipoutModel, _regression_data)}


class Spy:
    """Counts the vectorised layer calls and forwards (to know which path ran, and the reruns)."""

    def __init__(self, monkeypatch):
        self.calls = self.forwards = 0
        original, original_init = V.SampleBatch.linear, V.SampleBatch.__init__

        def linear(sb, layer, x):
            self.calls += 1
            return original(sb, layer, x)

        def init(sb, *args, **kwargs):
            self.forwards += 1
            original_init(sb, *args, **kwargs)

        monkeypatch.setattr(V.SampleBatch, "linear", linear)
        monkeypatch.setattr(V.SampleBatch, "__init__", init)


def _elbo_step(model, x, y, crit, n, vectorized, seed=123):
    model.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(x.is_floating_point())
    torch.manual_seed(seed)
    loss = model.sample_elbo(x, y, crit, n, complexity_cost_weight=0.01, vectorized=vectorized)
    loss.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    kl_after = model.nn_kl_divergence().detach().clone()
    return loss.detach(), grads, x.grad, kl_after, torch.randint(0, 2 ** 62, ())


def _assert_same(a, b):
    loss_a, grads_a, xg_a, kl_a, next_a = a
    loss_b, grads_b, xg_b, kl_b, next_b = b
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-12, atol=1e-10)
    assert grads_a.keys() == grads_b.keys()
    for k in grads_a:
        torch.testing.assert_close(grads_a[k], grads_b[k], rtol=1e-10, atol=1e-10, msg=k)
    torch.testing.assert_close(xg_a, xg_b, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(kl_a, kl_b, rtol=1e-12, atol=1e-10)  # the layers keep the last sample's KL
    assert next_a == next_b  # the generator is left where the loop leaves it


@pytest.mark.parametrize("n", [1, 3, 8])
@pytest.mark.parametrize("name", list(MODELS))
def test_sample_elbo_equals_loop(backend, monkeypatch, name, n):
    cls, data = MODELS[name]
    model = cls()
    x, y, crit = data()
    loop = _elbo_step(model, x, y, crit, n, vectorized=False)
    spy = Spy(monkeypatch)
    forced = _elbo_step(model, x, y, crit, n, vectorized=True)
    assert spy.forwards == (2 if name in ("mixed", "shared") else 1)  # mixed, shared: one rerun with the counted L
    auto = _elbo_step(model, x, y, crit, n, vectorized=None)
    _assert_same(forced, loop)
    _assert_same(auto, loop)


@pytest.mark.filterwarnings("ignore:Using a target size")
@pytest.mark.parametrize("criterion", ["callable", "none_reduction", "broadcast"])
def test_any_criterion_equals_loop(backend, criterion):
    """Criteria that are not stacked (a callable, reduction='none', broadcasting labels) are applied
    per sample, as in the loop."""
    model = Regression()
    x, y, _ = _regression_data()
    if criterion == "callable":
        crit = lambda out, labels: 0.5 * ((out - labels) ** 2).sum() + out.abs().max()  # noqa: E731
    elif criterion == "none_reduction":
        crit = nn.L1Loss(reduction="none")
    else:  # (B, 1) outputs against (B, 1, 1) labels broadcast to (B, B, 1) in each sample
        crit, y = nn.MSELoss(), y.unsqueeze(-1)
    out = []
    for vectorized in (False, True):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(9)
        loss = model.sample_elbo(x, y, crit, 3, 0.5, vectorized=vectorized)
        loss.sum().backward()
        out.append([loss.detach()] + [p.grad.clone() for p in model.parameters()])
    for a, b in zip(*out):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)


def test_default_is_vectorised(monkeypatch):
    model = Regression()
    x, y, crit = _regression_data()
    spy = Spy(monkeypatch)
    model.sample_elbo(x, y, crit, 4)  # BLiTZ's positional call
    assert spy.calls == 2
    model.sample_elbo(x, y, crit, 4, 1.0, vectorized=False)
    assert spy.calls == 2


@pytest.mark.parametrize("name", ["regression", "mixed", "lrt"])
def test_detailed_loss_equals_loop(backend, name):
    cls, data = MODELS[name]
    model = cls()
    x, y, crit = data()
    results = []
    for vectorized in (False, True):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(7)
        preds, elbo, lik, comp = model.sample_elbo_detailed_loss(x, y, crit, 4, 0.1, vectorized=vectorized)
        elbo.backward()
        results.append((preds, elbo.detach(), lik.detach(), comp.detach(),
                        [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    (p0, *l0, g0), (p1, *l1, g1) = results
    assert p0.shape == p1.shape == (4,) + tuple(model(x).shape)
    torch.testing.assert_close(torch.from_numpy(p1), torch.from_numpy(p0), rtol=1e-12, atol=1e-12)
    for a, b in zip(l0 + g0, l1 + g1):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", list(MODELS))
def test_mfvi_forward_equals_loop(backend, name):
    cls, data = MODELS[name]
    model = cls()
    x = data()[0]
    out = []
    for vectorized in (False, True):
        torch.manual_seed(3)
        with torch.no_grad():
            out.append(model.mfvi_forward(x, 5, vectorized=vectorized))
    for a, b in zip(*out):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)


# ---- automatic selection -----------------------------------------------------------------------

@variational_estimator
class WithExtra(nn.Module):
    def __init__(self, extra, first=None):
        super().__init__()
        self.l1 = first or BayesianLinear(5, 8, dtype=F64)
        self.extra = extra
        self.l2 = BayesianLinear(8, 2, dtype=F64)

    def forward(self, x):
        return self.l2(self.extra(torch.tanh(self.l1(x))))


UNSUPPORTED = {
    "frozen": (lambda: WithExtra(nn.Identity(), BayesianLinear(5, 8, freeze=True, dtype=F64)), "l1"),
    # a scale-mixture prior: the LRT's MC KL draws a weight per sample (sample_kl), not batched
    "lrt_mixture_prior": (lambda: WithExtra(nn.Identity(), BayesianLinear(5, 8, estimator="lrt", prior_pi=0.5,
                                                                          dtype=F64)), "l1"),
    "flipout_closed_form_kl": (lambda: WithExtra(nn.Identity(), BayesianLinear(5, 8, estimator="flipout",
                                                                               kl="closed_form", dtype=F64)), "l1"),
    "prior_dist": (lambda: WithExtra(nn.Identity(), BayesianLinear(
        5, 8, prior_dist=torch.distributions.Normal(torch.tensor(0.0, dtype=F64), 0.5), dtype=F64)), "l1"),
    "batchnorm": (lambda: WithExtra(nn.BatchNorm1d(8, dtype=F64)), "BatchNorm1d"),
}


@pytest.mark.parametrize("case", list(UNSUPPORTED))
def test_unsupported_runs_the_loop(monkeypatch, case):
    make, name = UNSUPPORTED[case]
    model = make()
    x, y = torch.randn(4, 5, dtype=F64), torch.randn(4, 2, dtype=F64)
    spy = Spy(monkeypatch)
    auto = _elbo_step(model, x, y, nn.MSELoss(), 3, vectorized=None)
    assert spy.calls == 0
    loop = _elbo_step(model, x, y, nn.MSELoss(), 3, vectorized=False)
    _assert_same(auto, loop)
    with pytest.raises(ValueError, match=f"vectorized=True.*{name}"):
        model.sample_elbo(x, y, nn.MSELoss(), 3, vectorized=True)
    with pytest.raises(ValueError, match=name):
        model.mfvi_forward(x, 3, vectorized=True)
    with pytest.raises(ValueError, match=name):
        model.sample_elbo_detailed_loss(x, y, nn.MSELoss(), 3, vectorized=True)
    assert all("_sample_batch" not in m.__dict__ for m in model.modules())


def test_batchnorm_in_eval_mode_is_vectorised(monkeypatch):
    """Running statistics do not mix the examples of a batch."""
    model = WithExtra(nn.BatchNorm1d(8, dtype=F64))
    model.extra.eval()
    x, y = torch.randn(4, 5, dtype=F64), torch.randn(4, 2, dtype=F64)
    loop = _elbo_step(model, x, y, nn.MSELoss(), 3, vectorized=False)
    spy = Spy(monkeypatch)
    _assert_same(_elbo_step(model, x, y, nn.MSELoss(), 3, vectorized=None), loop)
    assert spy.calls == 2


def test_dropout_loop_unless_forced(monkeypatch):
    """Dropout draws from the same generator: auto keeps the loop's noise; True still runs."""
    model = WithExtra(nn.Dropout(0.5))
    x, y = torch.randn(4, 5, dtype=F64), torch.randn(4, 2, dtype=F64)
    spy = Spy(monkeypatch)
    _assert_same(_elbo_step(model, x, y, nn.MSELoss(), 3, vectorized=None),
                 _elbo_step(model, x, y, nn.MSELoss(), 3, vectorized=False))
    assert spy.calls == 0
    model.sample_elbo(x, y, nn.MSELoss(), 3, vectorized=True).backward()
    assert spy.calls == 2


@variational_estimator
class Flattening(nn.Module):
    """Folds the sequence into the batch before its layer: the layer's input is not N*B long."""

    def __init__(self):
        super().__init__()
        self.l1 = BayesianLinear(5, 2, dtype=F64)

    def forward(self, x):  # (B, T, 5) -> (B, T * 2)
        b = x.shape[0]
        return self.l1(x.reshape(-1, 5)).reshape(b, -1)


def test_batch_not_in_dim_0_runs_the_loop(monkeypatch):
    model = Flattening()
    x, y = torch.randn(4, 3, 5, dtype=F64), torch.randn(4, 6, dtype=F64)
    _assert_same(_elbo_step(model, x, y, nn.MSELoss(), 3, vectorized=None),
                 _elbo_step(model, x, y, nn.MSELoss(), 3, vectorized=False))
    with pytest.raises(ValueError, match="dim 0"):
        model.sample_elbo(x, y, nn.MSELoss(), 3, vectorized=True)
    assert "_sample_batch" not in model.l1.__dict__


@variational_estimator
class HardCodedBatch(nn.Module):
    """A forward that only works for its own batch size (a view with the batch written in)."""

    def __init__(self):
        super().__init__()
        self.l1 = BayesianLinear(5, 2, dtype=F64)

    def forward(self, x):  # (4, 5) -> (4, 2)
        return self.l1(x).view(4, 2)


def test_a_forward_that_fails_batched_runs_the_loop():
    """Automatic selection never breaks a model the loop runs: it falls back (same loss, gradients
    and generator state as the loop); vectorized=True lets the model's own error through."""
    model = HardCodedBatch()
    x, y = torch.randn(4, 5, dtype=F64), torch.randn(4, 2, dtype=F64)
    _assert_same(_elbo_step(model, x, y, nn.MSELoss(), 3, vectorized=None),
                 _elbo_step(model, x, y, nn.MSELoss(), 3, vectorized=False))
    with pytest.raises(RuntimeError, match="shape"):
        model.sample_elbo(x, y, nn.MSELoss(), 3, vectorized=True)
    assert "_sample_batch" not in model.l1.__dict__


def test_layer_state_restored_after_an_error():
    @variational_estimator
    class Failing(nn.Module):
        def __init__(self):
            super().__init__()
            self.l1 = BayesianLinear(3, 2)

        def forward(self, x):
            self.l1(x)
            raise RuntimeError("boom")

    model = Failing()
    with pytest.raises(RuntimeError, match="boom"):
        model.sample_elbo(torch.randn(2, 3), torch.randn(2, 2), nn.MSELoss(), 2)
    assert "_sample_batch" not in model.l1.__dict__
    assert not isinstance(model.l1.log_variational_posterior, torch.Tensor) or \
        model.l1.log_variational_posterior.dim() == 0  # the last sample's term, not the vector


def test_an_own_nn_kl_divergence_is_used(backend):
    """A model that overrides nn_kl_divergence gets its own KL in the vectorised path too (the
    default is computed from the layers the path already found)."""
    class Scaled(Regression):
        def nn_kl_divergence(self):
            return 3 * super().nn_kl_divergence() + 1

    model = Scaled()
    x, y, crit = _regression_data()
    _assert_same(_elbo_step(model, x, y, crit, 4, vectorized=False), _elbo_step(model, x, y, crit, 4, vectorized=True))
    default = Regression()
    default.load_state_dict(model.state_dict())
    loss_scaled = _elbo_step(model, x, y, crit, 4, vectorized=True)[0]
    loss_default = _elbo_step(default, x, y, crit, 4, vectorized=True)[0]
    assert not torch.allclose(loss_scaled, loss_default)


def test_kl_terms_set_after_a_vectorised_step():
    """The layers report the last sample's terms; setting one keeps the other's value."""
    model = Regression()
    x, y, crit = _regression_data()
    _elbo_step(model, x, y, crit, 3, vectorized=True)
    q, p = model.l1.log_variational_posterior, model.l1.log_prior
    assert q.dim() == 0 and p.dim() == 0
    model.l1.log_prior = torch.tensor(2.0, dtype=F64)
    assert torch.equal(model.l1.log_variational_posterior, q) and model.l1.log_prior.item() == 2.0


def test_bad_inputs_get_the_layers_errors():
    """vectorized=True with a bad input raises the layer's own clear error (not the op's)."""
    model = Regression(dtype=torch.float32)
    y = torch.randn(4, 1)
    with pytest.raises(ValueError, match="13 features"):
        model.sample_elbo(torch.randn(4, 12), y, nn.MSELoss(), 3, vectorized=True)
    with pytest.raises(TypeError, match="dtype of the layer's parameters"):
        model.sample_elbo(torch.randn(4, 13, dtype=F64), y, nn.MSELoss(), 3, vectorized=True)


def test_kl_terms_intact_after_a_refused_vectorised_forward():
    """A layer that refuses its input (vectorized=True) keeps the terms it had, readable."""
    model = Regression()
    x, y, crit = _regression_data()
    _elbo_step(model, x, y, crit, 2, vectorized=False)
    q = model.l2.log_variational_posterior

    class Narrowing(nn.Module):  # hands l2 one sample's rows only
        def forward(self, h):
            return h[:6]
    model.l2.register_forward_pre_hook(lambda m, args: (Narrowing()(args[0]),))
    with pytest.raises(V.NotVectorisable):
        model.sample_elbo(x, y, crit, 3, vectorized=True)
    assert torch.equal(model.l2.log_variational_posterior, q)


def test_vectorized_argument_checked():
    model = Regression()
    x, y, crit = _regression_data()
    with pytest.raises(TypeError, match="vectorized"):
        model.sample_elbo(x, y, crit, 2, vectorized="yes")
    with pytest.raises(ValueError, match="sample_nbr"):
        model.sample_elbo(x, y, crit, 0, vectorized=True)


@pytest.mark.parametrize("first", ["reparam", "lrt"])
def test_compile_fullgraph_vectorised_forward(backend, first):
    """A model forward in vectorised mode compiles without graph breaks and matches eager."""
    model = Regression(hidden=8, dtype=torch.float32)
    if first == "lrt":
        model.l1 = BayesianLinear(13, 8, estimator="lrt")
    x = torch.randn(4, 13)
    n = 3
    seeds = FS.draw_seeds(n * 2).view(n, 2)
    layers = [model.l1, model.l2]

    def run(fn):
        sb = V.SampleBatch(n, x.shape[0], 2, seeds=seeds)
        for layer in layers:
            layer.__dict__["_sample_batch"] = sb
        try:
            out = fn(x.repeat(n, 1))
            return out, model.nn_kl_divergence()
        finally:
            for layer in layers:
                layer.__dict__.pop("_sample_batch", None)

    torch._dynamo.reset()
    eager = run(model)
    compiled = run(torch.compile(model, fullgraph=True))
    torch.testing.assert_close(compiled[0], eager[0])
    torch.testing.assert_close(compiled[1], eager[1])
    assert compiled[1].shape == (n,)
