"""BLiTZ's ``Flipout`` and ``Radial`` layer wrappers, made to do what their names promise.

Both take a Bayesian layer class (``BayesianLinear``, the convolutions, ``BayesianLSTM``,
``BayesianGRU``) and return a subclass with the same constructor, parameters and KL bookkeeping:

- ``Flipout(cls)`` (Wen et al. 2018): ``y = f(x; mu) + (f(x * S; W) - f(x * S; mu)) * R`` with
  Rademacher signs S (input shape) and R (output shape) per example. Each example's output has the
  same distribution as with plain sampling, but the perturbations of different examples of a
  batch are decorrelated (BLiTZ's version added the mean output twice).
- ``Radial(cls)`` (Farquhar et al. 2020): ``w = mu + sigma * (eps / ||eps||) * r`` with eps from
  the layer's Philox stream and one radius r ~ N(0, 1) per weight tensor. ``log_variational_posterior``
  is the radial posterior's log density up to a constant that does not depend on the parameters,
  ``-sum(log sigma)`` (its entropy term is analytic); ``log_prior`` is the prior's log density of w.
  (BLiTZ's version patched a method its layers never call.)

For ``BayesianLSTM`` (plain and peephole) and ``BayesianGRU``: ``Radial`` samples the three
posteriors radially and runs the layer's usual recurrence; ``Flipout`` gives every sequence of the
batch its own sign-flipped perturbation ``W_n = mu + dW * (s_n r_n^T)`` of one shared sample dW,
fixed over the sequence's time steps (a weight sample per sequence, as the layer draws one per
call), computed as ``h mu + ((h * s_n) dW) * r_n`` in a loop over time: a per-example weight
cannot run on the fused LSTM / GRU kernels. Posterior sharpening is not combined with Flipout.
"""
import torch
import torch.nn.functional as F

from .. import _backend, _fallback
from .. import functional as BF
from ..modules._low_precision import upcasts_low_precision
from ..modules.base_bayesian_module import BayesianModule
from ..modules.conv_bayesian_layer import _BayesianConvPlainNd
from ..modules.gru_bayesian_layer import BayesianGRU
from ..modules.linear_bayesian_layer import BayesianLinear
from ..modules.lstm_bayesian_layer import BayesianLSTM
from ..modules.rnn_bayesian_layer import BayesianRNN


def _wrappable(nn_module) -> None:
    if not (isinstance(nn_module, type) and issubclass(nn_module, BayesianModule)):
        raise TypeError(f"Flipout and Radial wrap a bayes_ext Bayesian layer class, got {nn_module!r}")
    if not issubclass(nn_module, (BayesianLinear, _BayesianConvPlainNd, BayesianLSTM, BayesianGRU)):
        raise TypeError(f"{nn_module.__name__} cannot be wrapped; Flipout and Radial wrap BayesianLinear, "
                        "BayesianConv1d/2d/3d, BayesianLSTM and BayesianGRU")


def _apply_weights(layer, x, weight, bias):
    """The layer's operation with given weights."""
    if isinstance(layer, BayesianLinear):
        return F.linear(x, weight, bias)
    from ..functional_conv import conv_with_weight
    return conv_with_weight(x, weight, bias, layer._spec())


def _rademacher_like(t: torch.Tensor) -> torch.Tensor:
    return torch.randint(0, 2, t.shape, dtype=t.dtype, device=t.device) * 2 - 1


# ---- Flipout for recurrent layers ---------------------------------------------------------------------

def _flipout_product(state, mu, delta, s, r):
    """state W_n for every example n, W_n = mu + delta * (s_n r_n^T), without forming W_n."""
    return state.matmul(mu) + (state * s).matmul(delta) * r


def _lstm_flipout(layer, x, w_ih, w_hh, b, h, c):
    """BayesianLSTM's equations (plain or peephole) with per-sequence Flipout weights."""
    H = layer.out_features
    (mu_ih, d_ih, s_ih, r_ih), (mu_hh, d_hh, s_hh, r_hh) = w_ih, w_hh
    xw = _flipout_product(x, mu_ih, d_ih, s_ih.unsqueeze(1), r_ih.unsqueeze(1))  # every step's input at once
    if b is not None:
        xw = xw + b
    outputs = []
    for t in range(x.shape[1]):
        xw_t = xw[:, t]
        if layer.peephole:  # BLiTZ's peephole: the recurrent product reads the cell state
            gates = xw_t + _flipout_product(c, mu_hh, d_hh, s_hh, r_hh)
            i, f, o = torch.sigmoid(gates[:, :H]), torch.sigmoid(gates[:, H:2 * H]), torch.sigmoid(gates[:, 3 * H:])
            c = f * c + i * torch.sigmoid(xw_t[:, 2 * H:3 * H])
            h = torch.tanh(o * c)
        else:
            gates = xw_t + _flipout_product(h, mu_hh, d_hh, s_hh, r_hh)
            i, f, g, o = gates.split(H, dim=1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
        outputs.append(h)
    return torch.stack(outputs, dim=1), (h, c)


def _gru_flipout(layer, x, w_ih, w_hh, b, h):
    """BayesianGRU's equations (blocks r, z, n; bias r, z, in, hn) with per-sequence Flipout weights."""
    H = layer.out_features
    (mu_ih, d_ih, s_ih, r_ih), (mu_hh, d_hh, s_hh, r_hh) = w_ih, w_hh
    b = x.new_zeros(4 * H) if b is None else b
    xw = _flipout_product(x, mu_ih, d_ih, s_ih.unsqueeze(1), r_ih.unsqueeze(1)) + b[:3 * H]
    outputs = []
    for t in range(x.shape[1]):
        hw = _flipout_product(h, mu_hh, d_hh, s_hh, r_hh)
        a = xw[:, t, :2 * H] + hw[:, :2 * H]
        r, z = torch.sigmoid(a[:, :H]), torch.sigmoid(a[:, H:])
        n = torch.tanh(xw[:, t, 2 * H:] + r * (hw[:, 2 * H:] + b[3 * H:]))
        h = (1 - z) * n + z * h
        outputs.append(h)
    return torch.stack(outputs, dim=1), h


def _flipout_rnn_forward(layer, x, hidden_states):
    layer._check_x(x)
    w_ih, w_hh, b = layer.sample_weights()  # one sample dW per call; sets the KL terms of W = mu + dW
    x, (w_ih, w_hh, b) = layer._in_compute_dtype(x, (w_ih, w_hh, b))
    mu_ih, mu_hh = layer.weight_ih_mu.to(x.dtype), layer.weight_hh_mu.to(x.dtype)
    B, H = x.shape[0], layer.out_features
    signs = [_rademacher_like(x.new_empty(B, n)) for n in (layer.in_features, w_ih.shape[1], H, w_hh.shape[1])]
    pair_ih = (mu_ih, w_ih - mu_ih, signs[0], signs[1])
    pair_hh = (mu_hh, w_hh - mu_hh, signs[2], signs[3])
    if isinstance(layer, BayesianGRU):
        h0 = x.new_zeros(1, B, H) if hidden_states is None else layer._hidden(hidden_states, B, "hidden_states",
                                                                            x.dtype)
        return _gru_flipout(layer, x, pair_ih, pair_hh, b, h0[0])
    h0, c0 = layer._states(x, hidden_states)
    return _lstm_flipout(layer, x, pair_ih, pair_hh, b, h0[0], c0[0])


def Flipout(nn_module):
    """A subclass of ``nn_module`` whose sampled forward uses Flipout perturbations."""
    _wrappable(nn_module)

    if issubclass(nn_module, BayesianRNN):
        class FlipoutRNN(nn_module):
            @upcasts_low_precision
            def forward(self, x, hidden_states=None, sharpen_loss=None):
                if self.freeze:
                    return self.forward_frozen(x, hidden_states)
                if sharpen_loss is not None or (self.sharpen and self.loss_to_sharpen is not None):
                    raise ValueError(f"{type(self).__name__} does not combine Flipout with posterior sharpening")
                return _flipout_rnn_forward(self, x, hidden_states)

        FlipoutRNN.__name__ = FlipoutRNN.__qualname__ = f"Flipout{nn_module.__name__}"
        return FlipoutRNN

    class FlipoutLayer(nn_module):
        @upcasts_low_precision
        def forward(self, x):
            if self.freeze:
                return self.forward_frozen(x)
            x_signed = x * _rademacher_like(x)
            sampled = super().forward(x_signed)  # validates x, sets the KL terms of the sampled weights
            perturbation = sampled - _apply_weights(self, x_signed, self.weight_mu, self.bias_mu)
            mean = _apply_weights(self, x, self.weight_mu, self.bias_mu)
            return mean + perturbation * _rademacher_like(perturbation)

    FlipoutLayer.__name__ = FlipoutLayer.__qualname__ = f"Flipout{nn_module.__name__}"
    return FlipoutLayer


def _radial_samples(layer):
    """({name: w}, log q, log p) of a radial posterior sample of every posterior of ``layer``."""
    seed = BF.draw_seed()
    samples, log_q, log_p = {}, 0, 0
    for offset, (name, mu, rho) in enumerate(layer._posterior_pairs()):
        eps = _backend.ops().philox_normal(mu, seed, offset)
        radius = torch.randn((), dtype=mu.dtype).to(mu.device)  # CPU generator, like the seed
        sigma, log_sigma, _, _ = _fallback.softplus_terms(rho)
        direction = eps / eps.norm().clamp_min(torch.finfo(eps.dtype).tiny)
        w = mu + sigma * direction * radius
        dist = layer.weight_prior_dist if name.startswith("weight") else layer.bias_prior_dist
        samples[name] = w
        log_q = log_q - log_sigma.sum()
        log_p = log_p + dist.log_prior(w)
    return samples, log_q, log_p


def Radial(nn_module):
    """A subclass of ``nn_module`` with a radial posterior (direction uniform, radius N(0, 1))."""
    _wrappable(nn_module)

    if issubclass(nn_module, BayesianRNN):
        class RadialRNN(nn_module):
            def _draw_samples(self):
                """Radial samples of (weight_ih, weight_hh, bias) and their KL terms."""
                return _radial_samples(self)

        RadialRNN.__name__ = RadialRNN.__qualname__ = f"Radial{nn_module.__name__}"
        return RadialRNN

    class RadialLayer(nn_module):
        @upcasts_low_precision
        def forward(self, x):
            if self.freeze:
                return self.forward_frozen(x)
            if isinstance(self, BayesianLinear):
                BF.check_input(x, self.weight_mu, self.in_features)
            samples, log_q, log_p = _radial_samples(self)
            self._set_kl_terms(log_q, log_p)
            return _apply_weights(self, x, samples["weight"], samples.get("bias"))

    RadialLayer.__name__ = RadialLayer.__qualname__ = f"Radial{nn_module.__name__}"
    return RadialLayer
