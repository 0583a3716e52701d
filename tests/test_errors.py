"""Bad arguments raise ValueError / TypeError whose message names the argument, on both backends."""
import math

import numpy as np
import pytest
import torch
from torch import nn

import bayes_ext
from bayes_ext import functional as BF
from bayes_ext import functional_estimators as BFE
from bayes_ext.modules import (BayesianConv2d, BayesianEmbedding, BayesianGRU, BayesianLinear, BayesianLSTM,
                               PriorWeightDistribution)
from bayes_ext.utils import variational_estimator
from helpers import seed_tensor

PRIOR = (0.5, 0.1, 0.4)


def _mu_rho(shape=(3, 4), dtype=torch.float32):
    return torch.randn(shape, dtype=dtype), torch.randn(shape, dtype=dtype) - 3


# ---- the ops ------------------------------------------------------------------------------------------

def test_rho_shape_mismatch(ops):
    mu, _ = _mu_rho()
    with pytest.raises(ValueError, match="rho.*shape"):
        ops.sample_weight(mu, torch.zeros(4, 3), seed_tensor(1), 0, *PRIOR)
    with pytest.raises(ValueError, match="rho.*shape"):
        ops.sample_weight(mu, torch.zeros(12), seed_tensor(1), 0, *PRIOR)


def test_dtype_mismatch(ops):
    mu, rho = _mu_rho()
    with pytest.raises(TypeError, match="rho.*dtype"):
        ops.sample_weight(mu, rho.double(), seed_tensor(1), 0, *PRIOR)
    with pytest.raises(TypeError, match="rho.*dtype"):
        ops.sample_weight(mu.double(), rho, seed_tensor(1), 0, *PRIOR)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int32, torch.bool, torch.complex64, torch.float16,
                                   torch.bfloat16])
def test_unsupported_parameter_dtypes(ops, dtype):
    mu = torch.zeros(3, 4, dtype=dtype)
    with pytest.raises(TypeError, match="mu"):
        ops.sample_weight(mu, mu.clone(), seed_tensor(1), 0, *PRIOR)
    with pytest.raises(TypeError, match="like"):
        ops.philox_normal(mu, seed_tensor(1), 0)


@pytest.mark.parametrize("seed,exc", [
    (torch.tensor([1.0]), TypeError),
    (torch.tensor([1], dtype=torch.int32), TypeError),
    (torch.tensor([1, 2]), ValueError),
    (torch.tensor([], dtype=torch.int64), ValueError),
], ids=["float", "int32", "two-values", "empty"])
def test_bad_seed(ops, seed, exc):
    mu, rho = _mu_rho()
    with pytest.raises(exc, match="seed"):
        ops.sample_weight(mu, rho, seed, 0, *PRIOR)
    with pytest.raises(exc, match="seed"):
        ops.philox_normal(mu, seed, 0)
    one = torch.ones(())
    with pytest.raises(exc, match="seed"):
        ops.sample_weight_backward(None, one, one, mu, rho, seed, 0, *PRIOR, False)


@pytest.mark.parametrize("offset", [-1, -2 ** 63])
def test_negative_offset(ops, offset):
    mu, rho = _mu_rho()
    with pytest.raises(ValueError, match="offset"):
        ops.sample_weight(mu, rho, seed_tensor(1), offset, *PRIOR)
    with pytest.raises(ValueError, match="offset"):
        ops.philox_normal(mu, seed_tensor(1), offset)
    one = torch.ones(())
    with pytest.raises(ValueError, match="offset"):
        ops.sample_weight_backward(None, one, one, mu, rho, seed_tensor(1), offset, *PRIOR, False)


@pytest.mark.parametrize("prior,name", [
    ((-0.1, 0.1, 0.4), "prior_pi"),
    ((1.5, 0.1, 0.4), "prior_pi"),
    ((math.nan, 0.1, 0.4), "prior_pi"),
    ((0.5, 0.0, 0.4), "prior_sigma1"),
    ((0.5, -1.0, 0.4), "prior_sigma1"),
    ((0.5, math.inf, 0.4), "prior_sigma1"),
    ((0.5, math.nan, 0.4), "prior_sigma1"),
    ((0.5, 0.1, 0.0), "prior_sigma2"),
    ((0.5, 0.1, -2.0), "prior_sigma2"),
])
def test_bad_prior(ops, prior, name):
    mu, rho = _mu_rho()
    with pytest.raises(ValueError, match=name):
        ops.sample_weight(mu, rho, seed_tensor(1), 0, *prior)
    one = torch.ones(())
    with pytest.raises(ValueError, match=name):
        ops.sample_weight_backward(None, one, one, mu, rho, seed_tensor(1), 0, *prior, False)


def test_bad_backward_gradients(ops):
    mu, rho = _mu_rho()
    one = torch.ones(())
    seed = seed_tensor(1)
    with pytest.raises(ValueError, match="grad_w.*shape"):
        ops.sample_weight_backward(torch.ones(4, 3), one, one, mu, rho, seed, 0, *PRIOR, False)
    with pytest.raises(TypeError, match="grad_w.*dtype"):
        ops.sample_weight_backward(torch.ones(3, 4, dtype=torch.float64), one, one, mu, rho, seed, 0, *PRIOR, False)
    with pytest.raises(ValueError, match="grad_log_q"):
        ops.sample_weight_backward(None, torch.ones(2), one, mu, rho, seed, 0, *PRIOR, False)
    with pytest.raises(ValueError, match="grad_log_p"):
        ops.sample_weight_backward(None, one, torch.ones(3), mu, rho, seed, 0, *PRIOR, False)


def test_compiled_only_ops_errors(compiled):
    with pytest.raises(TypeError, match="seed"):
        compiled.philox4x32(torch.tensor([1.0]), 0, 0, 1)
    with pytest.raises(ValueError, match="num_blocks"):
        compiled.philox4x32(seed_tensor(1), 0, 0, -1)


def test_set_backend_rejects_unknown_name():
    with pytest.raises(ValueError, match="backend"):
        bayes_ext.set_backend("fortran")
    with pytest.raises(ValueError, match="backend"):
        with bayes_ext.use_backend("cuda"):
            pass
    assert bayes_ext.get_backend() in ("compiled", "python")


# ---- functional ---------------------------------------------------------------------------------------

def test_functional_bayesian_linear_errors(backend):
    mu, rho = _mu_rho((5, 4))
    b_mu, b_rho = torch.zeros(5), torch.zeros(5)
    x = torch.randn(2, 4)
    with pytest.raises(ValueError, match="weight_mu"):
        BF.bayesian_linear(x, mu.reshape(-1), rho.reshape(-1))
    with pytest.raises(ValueError, match="bias_mu and bias_rho"):
        BF.bayesian_linear(x, mu, rho, b_mu, None)
    with pytest.raises(ValueError, match="bias_mu"):
        BF.bayesian_linear(x, mu, rho, torch.zeros(4), torch.zeros(4))
    with pytest.raises(ValueError, match="rho.*shape"):
        BF.bayesian_linear(x, mu, rho, b_mu, torch.zeros(3))
    with pytest.raises(ValueError, match="input"):
        BF.bayesian_linear(torch.randn(2, 5), mu, rho, b_mu, b_rho)
    with pytest.raises(TypeError, match="input"):
        BF.bayesian_linear(x.double(), mu, rho, b_mu, b_rho)
    with pytest.raises(TypeError, match="seed"):
        BF.bayesian_linear(x, mu, rho, b_mu, b_rho, seed=torch.tensor([1.5]))
    with pytest.raises(ValueError, match="seed"):
        BF.bayesian_linear(x, mu, rho, b_mu, b_rho, seed=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="prior_pi"):
        BF.bayesian_linear(x, mu, rho, b_mu, b_rho, prior=(2.0, 0.1, 0.4))
    with pytest.raises(ValueError, match="prior_sigma2"):
        BF.bayesian_linear(x, mu, rho, b_mu, b_rho, prior=(0.5, 0.1, 0.0))
    # the prior tuple itself: three numbers, or an error that says so (it was Python's unpacking error)
    for bad, error, message in (((0.5, 0.1), ValueError, r"prior must be three numbers \(pi, sigma1, sigma2\)"),
                                (None, ValueError, "prior must be three numbers"),
                                ("0.5", ValueError, "prior must be three numbers"),
                                ((0.5, None, 0.4), TypeError, "prior_sigma1 must be a real number")):
        for call in (lambda: BF.bayesian_linear(x, mu, rho, b_mu, b_rho, prior=bad),
                     lambda: BFE.linear_flipout(x, mu, rho, b_mu, b_rho, prior=bad),
                     lambda: BF.sample_weight(mu, rho, seed_tensor(1), prior=bad)):
            with pytest.raises(error, match=message):
                call()


@pytest.mark.parametrize("estimator", ["reparam", "lrt", "flipout"])
def test_functional_linear_rejects_a_bias_in_another_dtype(backend, estimator):
    """The bias posterior must be in the weight's dtype (Flipout and LRT added a float64 bias to float32
    outputs without a word; the reparameterised op refused it in its own words)."""
    mu, rho = _mu_rho((5, 4))
    b_mu, b_rho = torch.zeros(5, dtype=torch.float64), torch.zeros(5, dtype=torch.float64)
    x = torch.randn(2, 4)
    call = {"reparam": lambda: BF.bayesian_linear(x, mu, rho, b_mu, b_rho),
            "lrt": lambda: BFE.linear_lrt_with_kl(x, mu, rho, b_mu, b_rho),
            "flipout": lambda: BFE.linear_flipout(x, mu, rho, b_mu, b_rho)}[estimator]
    message = r"bias_mu must have the dtype of weight_mu \(torch.float32\), got torch.float64"
    with pytest.raises(TypeError, match=message):
        call()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("estimator", ["reparam", "lrt", "flipout"])
def test_functionals_refuse_low_precision_posteriors_with_what_to_do_instead(backend, estimator, dtype):
    """The functionals take float32 / float64 posteriors (the layers upcast bf16 / fp16 ones
    themselves: tests/test_low_precision.py); the error says to compute in bf16 / fp16 through
    torch.autocast."""
    mu, rho = _mu_rho((3, 4))
    mu, rho = mu.to(dtype), rho.to(dtype)
    x = torch.randn(2, 4, dtype=dtype)
    call = {"reparam": lambda: BF.bayesian_linear(x, mu, rho),
            "lrt": lambda: BFE.linear_lrt(x, mu, rho),
            "flipout": lambda: BFE.linear_flipout(x, mu, rho)}[estimator]
    with pytest.raises(TypeError, match=r"weight_mu must be a float32 or float64 tensor, got .*use torch\.autocast"):
        call()


@pytest.mark.parametrize("shape", [(0, 4), (5, 0)])
@pytest.mark.parametrize("estimator", ["reparam", "lrt", "flipout"])
def test_functional_linear_rejects_empty_weights(backend, estimator, shape):
    """A weight without rows or columns is refused up front, naming weight_mu (it used to fail deep
    inside the ops, on a reshape or a block size)."""
    mu, rho = torch.zeros(shape), torch.full(shape, -3.0)
    x = torch.randn(2, shape[1])
    call = {"reparam": lambda: BF.bayesian_linear(x, mu, rho),
            "lrt": lambda: BFE.linear_lrt(x, mu, rho),
            "flipout": lambda: BFE.linear_flipout(x, mu, rho)}[estimator]
    with pytest.raises(ValueError, match=r"weight_mu must not be empty, got shape \(" + f"{shape[0]}, {shape[1]}"):
        call()


# ---- the layer ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("args,name", [((0, 3), "in_features"), ((3, 0), "out_features"), ((-2, 3), "in_features")])
def test_constructor_bad_sizes(args, name):
    with pytest.raises(ValueError, match=name):
        BayesianLinear(*args)


@pytest.mark.parametrize("kwargs,name", [
    (dict(prior_sigma_1=0.0), "prior_sigma_1"),
    (dict(prior_sigma_1=-0.1), "prior_sigma_1"),
    (dict(prior_sigma_2=0.0), "prior_sigma_2"),
    (dict(prior_pi=1.5), "prior_pi"),
    (dict(prior_pi=-0.5), "prior_pi"),
])
def test_constructor_bad_prior(kwargs, name):
    with pytest.raises(ValueError, match=name):
        BayesianLinear(3, 2, **kwargs)


# Every layer builds its posterior through modules/_posterior.py's checks: a NaN initial mean made
# every output NaN, an integer dtype failed inside torch's normal_, a float size inside torch.empty.
_LAYERS = {
    "linear": lambda **kw: BayesianLinear(4, 3, **kw),
    "conv2d": lambda **kw: BayesianConv2d(3, 4, 3, **kw),
    "embedding": lambda **kw: BayesianEmbedding(10, 4, **kw),
    "lstm": lambda **kw: BayesianLSTM(4, 5, **kw),
    "gru": lambda **kw: BayesianGRU(4, 5, **kw),
}


@pytest.mark.parametrize("layer", sorted(_LAYERS))
@pytest.mark.parametrize("kwargs,error,message", [
    (dict(posterior_rho_init=math.nan), ValueError, "posterior_rho_init must be finite, got nan"),
    (dict(posterior_mu_init=math.inf), ValueError, "posterior_mu_init must be finite, got inf"),
    (dict(posterior_mu_init="0"), TypeError, "posterior_mu_init must be a real number"),
    (dict(dtype=torch.int32), TypeError, r"dtype must be a floating dtype \(float32, float64, float16 or bfloat16\), "
                                         "got torch.int32"),
    (dict(dtype=torch.complex64), TypeError, "dtype must be a floating dtype"),
    (dict(prior_sigma_1=math.nan), ValueError, "prior_sigma_1 and prior_sigma_2 must be positive and finite"),
    (dict(prior_sigma_2=math.inf), ValueError, "prior_sigma_1 and prior_sigma_2 must be positive and finite"),
    (dict(prior_sigma_1="0.1"), TypeError, "prior_sigma_1 must be a real number"),
    (dict(prior_pi=None), TypeError, "prior_pi must be a real number"),
])
def test_constructors_check_posterior_and_prior_arguments(layer, kwargs, error, message):
    with pytest.raises(error, match=message):
        _LAYERS[layer](**kwargs)


@pytest.mark.parametrize("cls,args,message", [
    (BayesianLinear, (4.0, 3), "in_features must be an int, got 4.0"),
    (BayesianLinear, (4, "3"), "out_features must be an int, got '3'"),
    (BayesianLSTM, (4, 5.5), "out_features must be an int"),
    (BayesianEmbedding, (10.0, 4), "num_embeddings must be an int"),
    (BayesianEmbedding, (10, True), "embedding_dim must be an int"),
])
def test_constructor_sizes_must_be_ints(cls, args, message):
    with pytest.raises(TypeError, match=message):
        cls(*args)


def test_constructor_takes_numpy_and_tensor_scalars():
    layer = BayesianLinear(np.int64(4), np.int32(3), prior_sigma_1=torch.tensor(0.2), prior_pi=np.float32(1.0),
                           posterior_rho_init=np.float64(-5.0))
    assert (layer.in_features, layer.out_features) == (4, 3)
    assert torch.isfinite(layer(torch.randn(2, 4))).all()


def test_constructor_bad_prior_dist():
    with pytest.raises(TypeError, match="prior_dist"):
        BayesianLinear(3, 2, prior_dist="normal")
    with pytest.raises(TypeError, match="dist"):
        PriorWeightDistribution(dist=3.0)


@pytest.mark.parametrize("mode", ["sampled", "frozen", "prior_dist"])
def test_layer_input_errors(backend, mode):
    layer = BayesianLinear(4, 3, prior_dist=torch.distributions.Normal(0, 1) if mode == "prior_dist" else None)
    layer.freeze = mode == "frozen"
    with pytest.raises(ValueError, match="input.*4 features"):
        layer(torch.randn(2, 5))
    with pytest.raises(ValueError, match="input"):
        layer(torch.tensor(1.0))
    with pytest.raises(TypeError, match="input.*dtype"):
        layer(torch.randn(2, 4, dtype=torch.float64))
    with pytest.raises(TypeError, match="input"):
        layer(torch.ones(2, 4, dtype=torch.int64))
    with pytest.raises(TypeError, match="input"):
        layer([[1.0, 2.0, 3.0, 4.0]])
    # and the layer still works afterwards
    assert layer(torch.randn(2, 4)).shape == (2, 3)


def test_float32_input_into_float64_layer(backend):
    layer = BayesianLinear(4, 3, dtype=torch.float64)
    with pytest.raises(TypeError, match="input.*dtype"):
        layer(torch.randn(2, 4))


@pytest.mark.parametrize("mode", ["sampled", "frozen", "prior_dist"])
def test_zero_size_batch(backend, mode):
    layer = BayesianLinear(4, 3, prior_dist=torch.distributions.Normal(0, 1) if mode == "prior_dist" else None)
    layer.freeze = mode == "frozen"
    y = layer(torch.randn(0, 4))
    assert y.shape == (0, 3)
    assert layer(torch.randn(2, 0, 4)).shape == (2, 0, 3)


def test_mfvi_forward_needs_a_tensor_output():
    @variational_estimator
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = BayesianLinear(2, 1)

        def forward(self, x):
            return self.l(x), self.l(x)

    with pytest.raises(TypeError, match="mfvi_forward needs a model that returns one tensor, got tuple"):
        TwoHeads().mfvi_forward(torch.randn(3, 2), sample_nbr=3, vectorized=False)


def test_estimator_argument_errors(backend):
    @variational_estimator
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = BayesianLinear(2, 1)

        def forward(self, x):
            return self.l(x)

    net = Net()
    x, y = torch.randn(3, 2), torch.randn(3, 1)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="sample_nbr"):
            net.sample_elbo(x, y, nn.MSELoss(), sample_nbr=bad)
    with pytest.raises(ValueError, match="sample_nbr"):
        net.mfvi_forward(x, sample_nbr=0)
    for vectorized in (False, True):  # one sample has no (unbiased) std: BLiTZ returned NaN
        with pytest.raises(ValueError, match="sample_nbr must be at least 2 for a standard deviation, got 1"):
            net.mfvi_forward(x, sample_nbr=1, vectorized=vectorized)
    with pytest.raises(ValueError, match="delta"):
        net.MOPED_(delta=0.0)
    # a NaN / infinite KL weight made the loss NaN silently; a tensor weight is taken as it is
    for vectorized in (False, True):
        for bad in (float("nan"), float("inf"), -math.inf):
            with pytest.raises(ValueError, match="complexity_cost_weight must be finite"):
                net.sample_elbo(x, y, nn.MSELoss(), 2, complexity_cost_weight=bad, vectorized=vectorized)
            with pytest.raises(ValueError, match="complexity_cost_weight must be finite"):
                net.sample_elbo_detailed_loss(x, y, nn.MSELoss(), 2, complexity_cost_weight=bad, vectorized=vectorized)
        assert torch.isfinite(net.sample_elbo(x, y, nn.MSELoss(), 2, complexity_cost_weight=torch.tensor(0.5),
                                              vectorized=vectorized))
