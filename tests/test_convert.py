"""bayes_ext.bayesianize: deterministic models -> Bayesian ones with mean = the trained weights."""
import warnings

import pytest
import torch
from torch import nn

import bayes_ext
from bayes_ext import bayesianize
from bayes_ext.modules import (BayesianConv1d, BayesianConv2d, BayesianConvTranspose1d, BayesianConvTranspose2d,
                               BayesianConvTranspose3d, BayesianConv3d, BayesianGRU, BayesianLinear, BayesianLSTM,
                               BayesianModule)
from bayes_ext.modules._posterior import inverse_softplus


class Block(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(h)))


class TinyResNet(nn.Module):
    """conv-bn-relu stem, two residual blocks, a strided conv, global pooling and a linear head."""

    def __init__(self, classes=5):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.blocks = nn.ModuleList([Block(8), Block(8)])
        self.down = nn.Conv2d(8, 12, 3, stride=2, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(12, classes)

    def forward(self, x):
        h = self.stem(x)
        for block in self.blocks:
            h = block(h)
        h = self.pool(torch.relu(self.down(h))).flatten(1)
        return self.head(h)


def trained_resnet():
    torch.manual_seed(0)
    model = TinyResNet()
    model.train()
    with torch.no_grad():  # give BatchNorm non-trivial running statistics
        for _ in range(3):
            model(torch.randn(8, 3, 8, 8))
    return model.eval()


def set_freeze(model, value):
    for m in model.modules():
        if isinstance(m, BayesianModule):
            m.freeze = value


def test_resnet_copy_frozen_equals_original(backend):
    model = trained_resnet()
    x = torch.randn(4, 3, 8, 8)
    expected = model(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    bayes = bayesianize(model, sigma=1e-4)
    assert bayes is not model
    # the original is untouched
    assert all(isinstance(m, (nn.Conv2d, nn.Linear)) for m in (model.stem[0], model.down, model.head))
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    # converted types, the rest untouched
    assert type(bayes.stem[0]) is BayesianConv2d and type(bayes.head) is BayesianLinear
    assert type(bayes.blocks[0].conv1) is BayesianConv2d and bayes.blocks[0].conv1.bias_mu is None
    assert type(bayes.stem[1]) is nn.BatchNorm2d and type(bayes.pool) is nn.AdaptiveAvgPool2d
    for name in ("stem.1", "blocks.0.bn1", "blocks.1.bn2"):
        bn, bn0 = bayes.get_submodule(name), model.get_submodule(name)
        assert type(bn) is nn.BatchNorm2d
        for key, value in bn0.state_dict().items():
            assert torch.equal(bn.state_dict()[key], value)
    assert not bayes.training and not bayes.head.training
    assert bayes.down.stride == (2, 2) and bayes.down.padding == (1, 1)
    # frozen: the means, i.e. the original predictions
    set_freeze(bayes, True)
    torch.testing.assert_close(bayes(x), expected, atol=1e-5, rtol=0)
    # sampled: close but not equal
    set_freeze(bayes, False)
    sampled = bayes(x)
    assert not torch.equal(sampled, expected)
    torch.testing.assert_close(sampled, expected, atol=1e-2, rtol=0)
    # KL terms are set for every Bayesian layer
    assert torch.isfinite(bayes_ext.losses.kl_divergence_from_nn(bayes))


def test_inplace_returns_same_object():
    model = trained_resnet()
    head = model.head
    out = bayesianize(model, inplace=True, sigma=1e-3)
    assert out is model
    assert type(model.head) is BayesianLinear and model.head is not head
    torch.testing.assert_close(model.head.weight_mu, head.weight)


def test_moped_and_constant_sigma():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2))
    bayes = bayesianize(model, delta=0.2)
    sigma = nn.functional.softplus(bayes[0].weight_rho)
    torch.testing.assert_close(sigma, 0.2 * model[0].weight.abs())
    torch.testing.assert_close(nn.functional.softplus(bayes[2].bias_rho), 0.2 * model[2].bias.abs())
    bayes = bayesianize(model, sigma=0.05, prior_sigma_1=0.3, prior_pi=0.5)
    torch.testing.assert_close(nn.functional.softplus(bayes[0].weight_rho), torch.full((3, 4), 0.05))
    assert bayes[0].prior_sigma_1 == 0.3 and bayes[2].prior_pi == 0.5
    torch.testing.assert_close(bayes[0].weight_rho, inverse_softplus(torch.full((3, 4), 0.05)))


def test_types_restricts_conversion():
    model = trained_resnet()
    bayes = bayesianize(model, types=[nn.Linear])
    assert type(bayes.head) is BayesianLinear
    assert type(bayes.stem[0]) is nn.Conv2d and type(bayes.down) is nn.Conv2d
    with pytest.raises(ValueError, match="cannot be converted"):
        bayesianize(model, types=[nn.BatchNorm2d])


def test_errors():
    with pytest.raises(TypeError):
        bayesianize("not a model")
    with pytest.raises(ValueError, match="delta"):
        bayesianize(nn.Linear(2, 2), delta=0)
    with pytest.raises(ValueError, match="sigma"):
        bayesianize(nn.Linear(2, 2), sigma=-1.0)
    with pytest.raises(TypeError, match="unexpected keyword"):
        bayesianize(nn.Linear(2, 2), prior_sigma=1.0)


def test_single_module_and_shared_modules():
    lin = nn.Linear(3, 3)
    assert type(bayesianize(lin)) is BayesianLinear
    model = nn.Sequential(lin, nn.ReLU(), lin)
    bayes = bayesianize(model)
    assert bayes[0] is bayes[2] and type(bayes[0]) is BayesianLinear


def test_subclasses_are_not_converted():
    mha = nn.MultiheadAttention(4, 2, batch_first=True)
    model = nn.Sequential(nn.Linear(4, 4))
    model.attn = mha
    bayes = bayesianize(model)
    assert type(bayes[0]) is BayesianLinear
    assert type(bayes.attn.out_proj) is type(mha.out_proj)  # NonDynamicallyQuantizableLinear


@pytest.mark.parametrize("kind", ["conv1d", "conv3d", "convt1d", "convt2d", "convt3d"])
def test_conv_kinds(kind):
    torch.manual_seed(0)
    make = {
        "conv1d": (lambda: nn.Conv1d(4, 6, 3, stride=2, padding=1, dilation=1, groups=2), BayesianConv1d, (2, 4, 9)),
        "conv3d": (lambda: nn.Conv3d(2, 3, 2, padding=1, bias=False), BayesianConv3d, (1, 2, 4, 4, 4)),
        "convt1d": (lambda: nn.ConvTranspose1d(4, 2, 3, stride=2, output_padding=1, groups=2),
                    BayesianConvTranspose1d, (2, 4, 5)),
        "convt2d": (lambda: nn.ConvTranspose2d(3, 2, 3, stride=2, padding=1, dilation=2), BayesianConvTranspose2d,
                    (2, 3, 4, 4)),
        "convt3d": (lambda: nn.ConvTranspose3d(2, 2, 2, stride=2), BayesianConvTranspose3d, (1, 2, 3, 3, 3)),
    }[kind]
    layer = make[0]()
    x = torch.randn(*make[2])
    bayes = bayesianize(layer, sigma=1e-3)
    assert type(bayes) is make[1]
    bayes.freeze = True
    torch.testing.assert_close(bayes(x), layer(x), atol=1e-5, rtol=0)


def test_padding_mode_kept():
    layer = nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect")
    bayes = bayesianize(layer)
    bayes.freeze = True
    x = torch.randn(1, 2, 5, 5)
    torch.testing.assert_close(bayes(x), layer(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("bias", [True, False])
def test_lstm_frozen_equals_nn_lstm(backend, bias):
    torch.manual_seed(0)
    lstm = nn.LSTM(3, 5, batch_first=True, bias=bias)
    x = torch.randn(2, 7, 3)
    h0, c0 = torch.randn(1, 2, 5), torch.randn(1, 2, 5)
    seq, (h, c) = lstm(x, (h0, c0))
    bayes = bayesianize(lstm, sigma=1e-4)
    assert type(bayes) is BayesianLSTM and bayes.use_bias == bias
    bayes.freeze = True
    seq_b, (h_b, c_b) = bayes(x, (h0[0], c0[0]))
    torch.testing.assert_close(seq_b, seq, atol=1e-5, rtol=0)
    torch.testing.assert_close(h_b, h[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(c_b, c[0], atol=1e-5, rtol=0)
    bayes.freeze = False
    sampled = bayes(x, (h0[0], c0[0]))[0]
    assert not torch.equal(sampled, seq)
    torch.testing.assert_close(sampled, seq, atol=1e-2, rtol=0)


@pytest.mark.parametrize("bias", [True, False])
def test_gru_frozen_equals_nn_gru(backend, bias):
    torch.manual_seed(0)
    gru = nn.GRU(3, 4, batch_first=True, bias=bias)
    with torch.no_grad():  # make b_hn matter
        for p in gru.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x, h0 = torch.randn(2, 6, 3), torch.randn(1, 2, 4)
    seq, h = gru(x, h0)
    bayes = bayesianize(nn.Sequential(gru), sigma=1e-4)[0]
    assert type(bayes) is BayesianGRU
    bayes.freeze = True
    seq_b, h_b = bayes(x, h0[0])
    torch.testing.assert_close(seq_b, seq, atol=1e-5, rtol=0)
    torch.testing.assert_close(h_b, h[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("config", [dict(num_layers=2), dict(bidirectional=True), dict(batch_first=False),
                                    dict(proj_size=2)])
def test_unsupported_rnn(config):
    kwargs = dict(batch_first=True)
    kwargs.update(config)
    model = nn.Sequential(nn.LSTM(3, 4, **kwargs), nn.Linear(4, 2))  # (only the conversion is tested)
    with pytest.raises(ValueError, match="cannot convert LSTM"):
        bayesianize(model)
    with pytest.warns(UserWarning, match="left unconverted"):
        bayes = bayesianize(model, strict=False)
    assert type(bayes[0]) is nn.LSTM and type(bayes[1]) is BayesianLinear


def test_embedding():
    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 2))
    bayes = bayesianize(model)
    assert nn.Embedding in bayes_ext.convert.convertible_types()
    assert type(bayes[0]) is bayes_ext.modules.BayesianEmbedding
    bayes[0].freeze = True
    idx = torch.tensor([[1, 2, 9]])
    torch.testing.assert_close(bayes[0](idx), model[0](idx))


def test_dtype_and_training_mode_preserved():
    model = nn.Sequential(nn.Linear(3, 2)).double().train()
    bayes = bayesianize(model)
    assert bayes[0].weight_mu.dtype == torch.float64 and bayes[0].training
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bayes[0].freeze = True
        x = torch.randn(2, 3, dtype=torch.float64)
        torch.testing.assert_close(bayes(x), model(x))
