"""BayesianGRU: BLiTZ's layer with three gate blocks, sampled once per forward and run on PyTorch's
fused GRU kernel."""
from typing import Optional

import torch
from torch import Tensor

from .rnn_bayesian_layer import BayesianRNN


class BayesianGRU(BayesianRNN):
    """Batch-first GRU whose weights ~ N(mu, softplus(rho)^2) are drawn once per forward call.

    Arguments and defaults are BLiTZ's; ``forward(x, hidden_states=None, sharpen_loss=None)`` takes
    x (B, T, in) and an optional h (B, H) and returns ``(seq (B, T, H), h)``. The equations are
    BLiTZ's, which are the standard GRU (Cho et al. 2014, as in ``nn.GRU``)::

        r = sigmoid(x_t W_ir + h W_hr + b_r),   z = sigmoid(x_t W_iz + h W_hz + b_z)
        n = tanh(x_t W_in + b_in + r * (h W_hn + b_hn)),   h_t = (1 - z) * n + z * h

    Parameters:

    - ``weight_ih_mu/rho`` (in, 3H) and ``weight_hh_mu/rho`` (H, 3H), blocks r, z, n. BLiTZ
      allocates four blocks and never uses the fourth of ``weight_ih`` nor the third of
      ``weight_hh``; those are gone (and out of the KL).
    - ``bias_mu/rho`` (4H): b_r, b_z, b_in, b_hn. These four blocks are all used, by BLiTZ and
      here: b_hn sits inside ``r * (...)`` and cannot be folded into b_in, so three blocks could not
      express BLiTZ's (and nn.GRU's) equations. It is also the smallest bias of ``nn.GRU``'s
      function space (its b_ir + b_hr and b_iz + b_hz are sums of two redundant biases).

    The recurrence runs on ``torch.gru`` (the kernel behind ``nn.GRU``; cuDNN on GPU) with
    W_ih^T, W_hh^T, b_ih = (b_r, b_z, b_in) and b_hh = (0, 0, b_hn). ``load_blitz_state_dict``
    keeps the three used blocks of BLiTZ's four-block weights.
    """

    _gate_blocks = 3
    _bias_blocks = 4

    def __init__(self, in_features: int, out_features: int, bias: bool = True, prior_sigma_1: float = 0.1,
                 prior_sigma_2: float = 0.002, prior_pi: float = 1, posterior_mu_init: float = 0,
                 posterior_rho_init: float = -6.0, freeze: bool = False, prior_dist=None, sharpen: bool = False,
                 *, sharpen_sigma_0: float = 0.02, device=None, dtype=None):
        super().__init__(sharpen=sharpen)
        self._init_rnn(in_features, out_features, bias, prior_sigma_1, prior_sigma_2, prior_pi, posterior_mu_init,
                       posterior_rho_init, freeze, prior_dist, sharpen_sigma_0, device, dtype)

    def _run(self, x: Tensor, weight_ih: Tensor, weight_hh: Tensor, bias: Optional[Tensor], hidden_states):
        H = self.out_features
        if hidden_states is None:
            h0 = x.new_zeros(1, x.shape[0], H)
        else:
            h0 = self._hidden(hidden_states, x.shape[0], "hidden_states", x.dtype)
        params = [weight_ih.t(), weight_hh.t()]
        if bias is not None:
            params += [bias[:3 * H], torch.cat([bias.new_zeros(2 * H), bias[3 * H:]])]
        seq, h = self._fused(torch._VF.gru, x, h0, params, bias is not None)
        return seq, h[0]

    def _from_blitz_layout(self, name: str, tensor: Tensor) -> Tensor:
        """BLiTZ's four-block weights (in, 4H) / (H, 4H) -> the three used blocks."""
        H = self.out_features
        if name == "bias" or tensor.dim() != 2 or tensor.shape[1] != 4 * H:
            return tensor
        if name == "weight_ih":  # BLiTZ uses blocks 0, 1, 2 (r, z, n)
            return tensor[:, :3 * H].clone()
        # weight_hh: BLiTZ uses blocks 0, 1 (r, z) and 3 (n)
        return torch.cat([tensor[:, :2 * H], tensor[:, 3 * H:]], dim=1)
