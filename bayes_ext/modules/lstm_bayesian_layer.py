"""BayesianLSTM: BLiTZ's layer, sampled once per forward and run on PyTorch's fused LSTM kernel."""
from typing import Optional

import torch
from torch import Tensor

from .rnn_bayesian_layer import BayesianRNN


class BayesianLSTM(BayesianRNN):
    """Batch-first LSTM whose weights ~ N(mu, softplus(rho)^2) are drawn once per forward call.

    Arguments, defaults and parameters are BLiTZ's (``weight_ih_mu/rho`` (in, 4H), ``weight_hh_mu/rho``
    (H, 4H), ``bias_mu/rho`` (4H), gate blocks i, f, g, o), so BLiTZ checkpoints load
    (``load_blitz_state_dict``). ``forward(x, hidden_states=None, sharpen_loss=None)`` takes
    x (B, T, in) and optional ``(h, c)``, each (B, H), and returns ``(seq (B, T, H), (h, c))``.

    Without peephole the equations are the standard LSTM (and BLiTZ's)::

        i, f, g, o = sigmoid, sigmoid, tanh, sigmoid of (x_t W_ih + h_{t-1} W_hh + b)
        c_t = f * c_{t-1} + i * g;   h_t = o * tanh(c_t)

    and run on ``torch.lstm`` (the kernel behind ``nn.LSTM``; cuDNN on GPU) with the sampled
    weights, not a Python loop over time. ``bias=False`` drops the bias (BLiTZ crashes there).

    ``peephole=True`` keeps BLiTZ's peephole equations, where the gates look at the cell instead
    of the hidden state (the g block of ``weight_hh`` is unused there)::

        i, f, o = sigmoid of (x_t W_ih + c_{t-1} W_hh + b) (blocks 0, 1, 3)
        c_t = f * c_{t-1} + i * sigmoid((x_t W_ih + b)[block 2]);   h_t = tanh(o * c_t)

    BLiTZ uses tanh for the output nonlinearity when sampling and sigmoid when frozen; the
    peephole LSTM (Gers & Schmidhuber 2000) squashes the cell output with tanh, so tanh is used in
    both modes here (the sampled math, the one BLiTZ models were trained with, is unchanged).
    The peephole recurrence is a Python loop (no fused kernel has it); the input projection of all
    time steps is still one matrix product.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, prior_sigma_1: float = 0.1,
                 prior_sigma_2: float = 0.002, prior_pi: float = 1, posterior_mu_init: float = 0,
                 posterior_rho_init: float = -6.0, freeze: bool = False, prior_dist=None, peephole: bool = False,
                 sharpen: bool = False, *, sharpen_sigma_0: float = 0.02, device=None, dtype=None):
        super().__init__(sharpen=sharpen)
        self.peephole = bool(peephole)
        self._init_rnn(in_features, out_features, bias, prior_sigma_1, prior_sigma_2, prior_pi, posterior_mu_init,
                       posterior_rho_init, freeze, prior_dist, sharpen_sigma_0, device, dtype)

    def _states(self, x: Tensor, hidden_states):
        batch = x.shape[0]
        if hidden_states is None:
            zeros = x.new_zeros(1, batch, self.out_features)
            return zeros, zeros
        if not isinstance(hidden_states, (tuple, list)) or len(hidden_states) != 2:
            raise TypeError("hidden_states of an LSTM must be a pair (h, c)")
        h, c = hidden_states
        return self._hidden(h, batch, "h", x.dtype), self._hidden(c, batch, "c", x.dtype)

    def _run(self, x: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias: Optional[Tensor], hidden_states):
        h0, c0 = self._states(x, hidden_states)
        if self.peephole:
            return self._run_peephole(x, weight_ih, weight_hh, bias, c0[0])
        if torch.compiler.is_compiling() and torch.is_grad_enabled() and x.device.type == "cpu":
            # inductor's CPU lowering of the fused LSTM (mkldnn_rnn_layer) fails in training
            # (torch 2.13: "expected Tensor() for op ... mkldnn_rnn_layer"); the same equations as
            # a loop over time compile (unrolled) and give the same values
            return self._run_unfused(x, weight_ih, weight_hh, bias, h0[0], c0[0])
        # nn.LSTM's layouts are the transposes of BLiTZ's: (4H, in) and (4H, H); same gate order.
        params = [weight_ih.t(), weight_hh.t()]
        if bias is not None:
            params += [bias, torch.zeros_like(bias)]
        seq, h, c = self._fused(torch._VF.lstm, x, (h0, c0), params, bias is not None)
        return seq, (h[0], c[0])

    def _run_unfused(self, x: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias: Optional[Tensor], h: Tensor,
                     c: Tensor):
        """The plain LSTM as a loop over time (the input projection of all steps in one matmul)."""
        H = self.out_features
        xw = torch.matmul(x, weight_ih)
        if bias is not None:
            xw = xw + bias
        outputs = []
        for t in range(x.shape[1]):
            gates = xw[:, t] + h.matmul(weight_hh)
            i, f, g, o = gates.split(H, dim=1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            outputs.append(h)
        return torch.stack(outputs, dim=1), (h, c)

    def _run_peephole(self, x: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias: Optional[Tensor], c: Tensor):
        H = self.out_features
        xw = torch.matmul(x, weight_ih)  # every time step's input projection at once: (B, T, 4H)
        if bias is not None:
            xw = xw + bias
        outputs = []
        h = None
        for t in range(x.shape[1]):
            xw_t = xw[:, t]
            gates = xw_t + c.matmul(weight_hh)
            i = torch.sigmoid(gates[:, :H])
            f = torch.sigmoid(gates[:, H:2 * H])
            o = torch.sigmoid(gates[:, 3 * H:])
            c = f * c + i * torch.sigmoid(xw_t[:, 2 * H:3 * H])
            h = torch.tanh(o * c)
            outputs.append(h)
        return torch.stack(outputs, dim=1), (h, c)
