"""BayesianRNN: what BayesianLSTM and BayesianGRU share (BLiTZ's base class, at the same import
path ``bayes_ext.modules.base_bayesian_module.BayesianRNN``).

- The posteriors ``weight_ih``, ``weight_hh`` and ``bias`` (``<name>_mu`` / ``<name>_rho``), in
  BLiTZ's layouts: ``weight_ih`` (in_features, G * H), ``weight_hh`` (H, G * H).
- One sample per forward call: one seed, Philox offsets 0 / 1 / 2 for ih / hh / bias, drawn with
  the fused op; the recurrence then runs on those weights for every time step.
- Posterior sharpening (Fortunato et al. 2017), applied for real (BLiTZ computes it wrongly and
  its ``forward_with_sharpening`` never uses it).
- Converting BLiTZ checkpoints (``convert_blitz_state_dict``; ``bayes_ext.utils.load_blitz_state_dict`` loads a whole model).
"""
import math
import warnings
from collections import OrderedDict
from typing import Optional, Tuple

import torch
from torch import Tensor, nn

from .. import _backend
from .. import functional as BF
from ._low_precision import upcasts_low_precision
from ._posterior import GaussianPosteriorMixin, check_posterior_init, positive_int, posterior_parameter
from .base_bayesian_module import BayesianModule

_BLITZ_SAMPLER_SUFFIXES = ("mu", "rho", "eps_w")


class BayesianRNN(GaussianPosteriorMixin, BayesianModule):
    """Base of the Bayesian recurrent layers, with optional posterior sharpening.

    Posterior sharpening (Fortunato, Blundell & Vinyals 2017, "Bayesian Recurrent Neural Networks",
    section 4). With ``sharpen=True`` a training step runs two forwards on the same batch:

    1. ``theta ~ q(theta) = N(mu, softplus(rho)^2)`` (an ordinary sampled forward); its loss
       ``L(theta) = -log p(y | theta, x)`` is computed by the caller.
    2. ``forward(x, sharpen_loss=L)`` (or ``sharpen_posterior(L, x.shape)`` by hand) draws the
       sharpened weights from ``q(phi | theta, (x, y)) = N(theta - eta * g, sigma_0^2)`` with
       ``g = dL/dtheta`` and learnable per-weight ``eta`` (``weight_ih_eta``, ``weight_hh_eta``,
       ``bias_eta``, BLiTZ's names and initialisation): ``phi = theta - eta * g + sigma_0 * eps'``.
       The recurrence then runs on ``phi``.

    The paper's objective is ``E[-log p(y | phi, x)] + KL[q(phi | theta, (x, y)) || p(phi | theta)]
    + KL[q(theta) || p(theta)]`` with the hierarchical prior ``p(phi | theta) = N(theta, sigma_0^2)``.
    Both Gaussians share sigma_0, so the sharpening KL is exact in closed form,
    ``sum((eta * g)^2) / (2 sigma_0^2)`` (``self.sharpening_kl``). After the sharpened forward,
    ``log_variational_posterior`` is ``log q(theta) + sharpening_kl`` and ``log_prior`` is
    ``log p(theta)`` (theta from step 1), so ``kl_divergence()`` and ``sample_elbo``-style losses
    hold the whole complexity cost of the step. (The paper weights KL[q(theta) || p(theta)] by 1/C
    and the sharpening KL by 1; ``sharpening_kl`` is exposed for anyone who wants that split.)

    Gradients reach mu and rho through theta, and eta through phi and the KL. ``g`` is treated as a
    constant by default (``sharpen_second_order = False``): that skips a Hessian-vector product and
    keeps the cuDNN kernels usable (they have no double backward). Set ``sharpen_second_order =
    True`` for the exact gradient through ``g`` (BLiTZ's ``create_graph=True``).

    ``input_shape`` is accepted for BLiTZ compatibility and only checked: BLiTZ divided its
    (wrong) sharpening terms by the sequence length, the paper's objective does not.
    """

    _posterior_names = ("weight_ih", "weight_hh", "bias")
    _dtype_probe = "weight_ih_mu"
    _gate_blocks = 4  # blocks of H columns in weight_ih / weight_hh
    _bias_blocks = 4  # blocks of H entries in bias

    def __init__(self, sharpen: bool = False):
        super().__init__()
        self.sharpen = bool(sharpen)
        self.loss_to_sharpen = None
        self.ff_parameters = None  # (theta_ih, theta_hh, theta_b) of the last sampled forward, when sharpening
        self.sharpening_kl = 0
        self.sharpen_sigma_0 = 0.02
        self.sharpen_second_order = False
        self._theta_kl_terms = None

    # ---- construction ----------------------------------------------------------------------------

    def _init_rnn(self, in_features, out_features, bias, prior_sigma_1, prior_sigma_2, prior_pi, posterior_mu_init,
                  posterior_rho_init, freeze, prior_dist, sharpen_sigma_0, device, dtype) -> None:
        in_features, out_features = positive_int(in_features, "in_features"), positive_int(out_features, "out_features")
        check_posterior_init(posterior_mu_init, posterior_rho_init, dtype)
        if not sharpen_sigma_0 > 0:
            raise ValueError(f"sharpen_sigma_0 must be positive, got {sharpen_sigma_0}")
        factory = {"device": device, "dtype": dtype}
        self.in_features = int(in_features)
        self.out_features = int(out_features)
        self.use_bias = bool(bias)  # BLiTZ's name for the flag
        self.bias = bool(bias)
        self.posterior_mu_init = posterior_mu_init
        self.posterior_rho_init = posterior_rho_init
        self.sharpen_sigma_0 = float(sharpen_sigma_0)
        for name, shape in self._posterior_shapes().items():
            if shape is None:
                self.register_parameter(f"{name}_mu", None)
                self.register_parameter(f"{name}_rho", None)
            else:
                setattr(self, f"{name}_mu", posterior_parameter(shape, posterior_mu_init, factory))
                setattr(self, f"{name}_rho", posterior_parameter(shape, posterior_rho_init, factory))
        self._init_prior(prior_sigma_1, prior_sigma_2, prior_pi, prior_dist, freeze)
        # BLiTZ's per-posterior prior attributes (no state: PriorWeightDistribution holds no tensors)
        self.weight_ih_prior_dist = self.weight_prior_dist
        self.weight_hh_prior_dist = self.weight_prior_dist
        self.init_sharpen_parameters()

    def _posterior_shapes(self):
        H = self.out_features
        return {"weight_ih": (self.in_features, self._gate_blocks * H),
                "weight_hh": (H, self._gate_blocks * H),
                "bias": (self._bias_blocks * H,) if self.use_bias else None}

    def init_sharpen_parameters(self) -> None:
        """The learnable sharpening rates eta (only with ``sharpen=True``), shaped like each mu."""
        for name in self._posterior_names:
            mu = getattr(self, f"{name}_mu", None)
            if self.sharpen and mu is not None:
                setattr(self, f"{name}_eta", nn.Parameter(torch.empty_like(mu)))
            else:
                self.register_parameter(f"{name}_eta", None)
        if self.sharpen:
            self.init_eta()

    def reset_parameters(self) -> None:
        """The constructor's initialisation: the posteriors, then the sharpening rates (see
        GaussianPosteriorMixin)."""
        super().reset_parameters()
        if self.sharpen:
            self.init_eta()

    def init_eta(self) -> None:
        """BLiTZ's initialisation: U(-1/sqrt(H), 1/sqrt(H))."""
        stdv = 1.0 / math.sqrt(self.out_features)
        with torch.no_grad():
            for name in self._posterior_names:
                eta = getattr(self, f"{name}_eta", None)
                if eta is not None:
                    eta.uniform_(-stdv, stdv)

    # ---- sampling -----------------------------------------------------------------------------------

    def _weights_tuple(self, values: dict) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        return values["weight_ih"], values["weight_hh"], values.get("bias")

    def _draw_samples(self):
        """({name: sample}, log q, log p) of one draw of every posterior (one seed, offsets 0, 1, 2);
        the Radial wrapper overrides it."""
        seed = BF.draw_seed()
        if self.prior_dist is not None:
            return self._sample_with_prior_dist(seed)
        samples, log_q, log_p = {}, 0, 0
        for offset, (name, mu, rho) in enumerate(self._posterior_pairs()):
            w, q, p = BF.sample_weight(mu, rho, seed, offset, self.prior)
            samples[name] = w
            log_q, log_p = log_q + q, log_p + p
        return samples, log_q, log_p

    def sample_weights(self) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        """(weight_ih, weight_hh, bias) drawn once per call; sets the KL terms (and keeps the sample
        for posterior sharpening)."""
        samples, log_q, log_p = self._draw_samples()
        self._set_kl_terms(log_q, log_p)
        weights = self._weights_tuple(samples)
        if self.sharpen:
            self.ff_parameters = weights
            self._theta_kl_terms = (log_q, log_p)
        self.sharpening_kl = 0
        return weights

    def get_frozen_weights(self) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        """The mean weights (weight_ih_mu, weight_hh_mu, bias_mu or None)."""
        return self.weight_ih_mu, self.weight_hh_mu, self.bias_mu

    def set_loss_to_sharpen(self, loss) -> None:
        self.loss_to_sharpen = loss

    def sharpen_posterior(self, loss: Tensor, input_shape=None) -> Tuple[Tensor, Tensor, Optional[Tensor]]:
        """Sharpened weights phi = theta - eta * dloss/dtheta + sigma_0 * eps' (see the class doc).

        ``theta`` is the sample of this layer's last sampled forward, which ``loss`` must depend on.
        Sets ``log_variational_posterior = log q(theta) + sharpening_kl`` and ``log_prior = log p(theta)``.
        """
        if not self.sharpen:
            raise RuntimeError("sharpen_posterior needs a layer built with sharpen=True")
        if input_shape is not None and len(tuple(input_shape)) != 3:
            raise ValueError(f"input_shape must be (batch, sequence, features), got {tuple(input_shape)}")
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            raise ValueError("the loss to sharpen with must be a tensor with one element")
        theta = self.ff_parameters
        if theta is None or not all(t is None or t.requires_grad for t in theta):
            raise RuntimeError("posterior sharpening needs the loss of a sampled forward of this layer run with "
                               "autograd enabled (call the layer, compute the loss, then sharpen with it)")
        names = [name for name, _, _ in self._posterior_pairs()]
        thetas = [t for t in theta if t is not None]
        grads = torch.autograd.grad(loss.reshape(()), thetas, retain_graph=True,
                                    create_graph=self.sharpen_second_order, allow_unused=True)
        if all(g is None for g in grads):
            raise RuntimeError("the loss to sharpen with does not depend on this layer's last sampled weights")
        seed = BF.draw_seed()
        ops = _backend.ops()
        sigma_0 = self.sharpen_sigma_0
        phis, kl = {}, 0
        for offset, (name, th, g) in enumerate(zip(names, thetas, grads)):
            eta = getattr(self, f"{name}_eta")
            eps = ops.philox_normal(th.detach(), seed, offset)
            if g is None:  # the loss does not depend on this posterior
                phis[name] = th + sigma_0 * eps
                continue
            shift = eta * g
            phis[name] = th - shift + sigma_0 * eps
            kl = kl + shift.pow(2).sum() / (2 * sigma_0 ** 2)
        log_q, log_p = self._theta_kl_terms
        self.sharpening_kl = kl
        self._set_kl_terms(log_q + kl, log_p)
        return self._weights_tuple(phis)

    # ---- forward ------------------------------------------------------------------------------------

    def _check_x(self, x: Tensor) -> None:
        BF.check_input(x, self.weight_ih_mu, self.in_features)
        if x.dim() != 3:
            raise ValueError(f"input must be batch-first (batch, sequence, {self.in_features}), got shape "
                             f"{tuple(x.shape)}")
        if x.shape[1] == 0:
            raise ValueError("input must hold at least one time step")

    def _hidden(self, h: Tensor, batch: int, name: str, dtype: torch.dtype) -> Tensor:
        """A (B, H) or (1, B, H) state as the (1, B, H) tensor the fused kernels take; ``dtype`` is
        the one the recurrence runs in (the input's)."""
        if not isinstance(h, Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(h).__name__}")
        shape = (batch, self.out_features)
        if tuple(h.shape) == shape:
            h = h.unsqueeze(0)
        elif tuple(h.shape) != (1,) + shape:
            raise ValueError(f"{name} must have shape {shape} (or (1, {batch}, {self.out_features})), "
                             f"got {tuple(h.shape)}")
        if h.device != self.weight_ih_mu.device:
            raise ValueError(f"{name} must be on the device of the layer's parameters ({self.weight_ih_mu.device}), "
                             f"got {h.device}")
        if h.dtype != dtype:
            if self._autocast_dtype(h) is None or not h.is_floating_point():
                raise TypeError(f"{name} must have the dtype of the layer's parameters ({self.weight_ih_mu.dtype}), "
                                f"got {h.dtype}")
            h = h.to(dtype)  # a state from another autocast region: cast like the input
        return h

    def _autocast_dtype(self, x: Tensor) -> Optional[torch.dtype]:
        """The dtype the recurrence runs in under an active autocast (float32 parameters only, as
        autocast leaves float64 alone), or None."""
        dtype = BF.autocast_dtype(x)
        return dtype if dtype is not None and self.weight_ih_mu.dtype == torch.float32 else None

    def _in_compute_dtype(self, x: Tensor, weights):
        """Under autocast, x and the weights in the autocast dtype, like nn.LSTM / nn.GRU's fused
        kernels run there: the weights are sampled, and the KL summed, in float32 first."""
        dtype = self._autocast_dtype(x)
        if dtype is None:
            return x, weights
        return x.to(dtype), tuple(None if w is None else w.to(dtype) for w in weights)

    def _run(self, x, weight_ih, weight_hh, bias, hidden_states):
        raise NotImplementedError

    @staticmethod
    def _fused(kernel, x: Tensor, hx, params, has_biases: bool):
        """torch's fused LSTM / GRU op, batch-first, one layer, with the given weights.

        The sampled weights are fresh tensors, so cuDNN cannot find them in one flat buffer and
        copies them (the copy is part of the price of sampling); its "weights are not part of single
        contiguous chunk of memory" warning, meant for nn.LSTM modules, is silenced here.
        """
        # The transposed (BLiTZ-layout) weights are made contiguous: cuDNN packs them with view(),
        # and the CPU kernels, which take strided views too, ran the GRU's per-step GEMMs slower with
        # them (2 cores, B32 T64 in 64 hidden 256: train step / nn.GRU 1.16-1.35x strided, 1.05-1.08x
        # contiguous; LSTM 1.11-1.13x either way), for a copy of 250k weights per forward.
        args = (x, hx, [p.contiguous() for p in params], has_biases, 1, 0.0, torch.is_grad_enabled(), False, True)
        if not x.is_cuda:
            return kernel(*args)
        # x and the weights are already in the compute dtype (_in_compute_dtype). Autocast stays off
        # for the kernel: its cuDNN RNN wrapper casts to float16 whatever the autocast dtype, so a
        # bf16 region (or a bf16 layer) got a float16 recurrence and output (torch 2.11, H200). A bf16
        # recurrence runs on cuDNN where torch lets it (cuDNN >= 9.13, pytorch#164411), else on
        # torch's fused CUDA cells (bf16 since torch 2.3, pytorch#116927).
        with warnings.catch_warnings(), BF.autocast_off("cuda"):
            warnings.filterwarnings("ignore", message=".*not part of single contiguous chunk of memory.*")
            return kernel(*args)

    @upcasts_low_precision
    def forward(self, x: Tensor, hidden_states=None, sharpen_loss: Optional[Tensor] = None):
        """Sampled forward; with ``sharpen_loss`` (or ``loss_to_sharpen`` set) the sharpened one."""
        if self.freeze:
            return self.forward_frozen(x, hidden_states)
        if sharpen_loss is not None and not self.sharpen:
            raise ValueError("sharpen_loss was given but the layer was built with sharpen=False")
        self._check_x(x)
        loss = sharpen_loss if sharpen_loss is not None else (self.loss_to_sharpen if self.sharpen else None)
        if loss is not None:
            weights = self.sharpen_posterior(loss, x.shape)
        else:
            weights = self.sample_weights()
        x, weights = self._in_compute_dtype(x, weights)
        return self._run(x, *weights, hidden_states)

    def forward_frozen(self, x: Tensor, hidden_states=None):
        """The mean-weight forward (w = mu); the KL terms then describe w = mu."""
        self._check_x(x)
        self._set_kl_at_mean()
        self.sharpening_kl = 0
        x, weights = self._in_compute_dtype(x, self.get_frozen_weights())
        return self._run(x, *weights, hidden_states)

    # ---- BLiTZ checkpoints ---------------------------------------------------------------------------

    def _from_blitz_layout(self, name: str, tensor: Tensor) -> Tensor:
        """A BLiTZ tensor of posterior ``name`` in this layer's layout (identity; GRU overrides)."""
        return tensor

    def convert_blitz_state_dict(self, state_dict, prefix: str = "") -> "OrderedDict[str, Tensor]":
        """A copy of ``state_dict`` with this layer's BLiTZ entries (keys under ``prefix``) in bayes_ext form.

        BLiTZ stores each posterior twice (``weight_ih_mu`` and ``weight_ih_sampler.mu``, sharing
        storage until ``.to()`` breaks the sharing; sampling, hence training, uses the sampler's) plus
        an ``eps_w`` buffer. The sampler's copy is kept (with a warning when the two differ), the
        buffers are dropped, the bias is dropped for ``bias=False`` layers, and a missing ``*_eta``
        keeps this layer's value. Keys outside ``prefix`` pass through unchanged.
        """
        local, out = {}, OrderedDict()
        for key, value in state_dict.items():
            if prefix and not key.startswith(prefix):
                out[key] = value
                continue
            rest = key[len(prefix):]
            if "." in rest:
                head, _, tail = rest.partition(".")
                if head.endswith("_sampler") and tail in _BLITZ_SAMPLER_SUFFIXES:
                    if tail != "eps_w":
                        local[(head[:-len("_sampler")], tail, "sampler")] = value
                    continue
                out[key] = value  # not ours: let load_state_dict report it
                continue
            matched = False
            for name in self._posterior_names:
                for suffix in ("mu", "rho", "eta"):
                    if rest == f"{name}_{suffix}":
                        local[(name, suffix, "top")] = value
                        matched = True
            if not matched:
                out[key] = value
        for name in self._posterior_names:
            for suffix in ("mu", "rho", "eta"):
                target = getattr(self, f"{name}_{suffix}", None)
                sampled, top = local.get((name, suffix, "sampler")), local.get((name, suffix, "top"))
                value = sampled if sampled is not None else top
                if sampled is not None and top is not None and not torch.equal(sampled, top):
                    warnings.warn(f"BLiTZ checkpoint: {prefix}{name}_{suffix} differs from "
                                  f"{prefix}{name}_sampler.{suffix}; loading the sampler's copy, which is the "
                                  f"one BLiTZ trained", RuntimeWarning, stacklevel=2)
                if target is None:
                    continue  # bias=False, or no sharpening: BLiTZ's tensors are not used here
                if value is None:
                    if suffix == "eta":
                        value = target.detach().clone()
                    else:
                        continue  # a missing key: load_state_dict reports it
                out[f"{prefix}{name}_{suffix}"] = self._from_blitz_layout(name, value)
        return out

    def load_blitz_state_dict(self, state_dict, strict: bool = True):
        """Load a BLiTZ ``BayesianLSTM`` / ``BayesianGRU`` state_dict (see ``convert_blitz_state_dict``)."""
        return self.load_state_dict(self.convert_blitz_state_dict(state_dict), strict=strict)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.use_bias}, "
                f"prior=(pi={self.prior_pi}, sigma_1={self.prior_sigma_1}, sigma_2={self.prior_sigma_2})"
                + (f", prior_dist={self.prior_dist}" if self.prior_dist is not None else "")
                + (f", sharpen=True, sigma_0={self.sharpen_sigma_0}" if self.sharpen else "")
                + (", frozen" if self.freeze else ""))
