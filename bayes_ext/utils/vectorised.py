"""The vectorised multi-sample forward behind sample_elbo / sample_elbo_detailed_loss / mfvi_forward.

N sampled forwards of a model become one: the input batch is repeated N times along dim 0 (shape
N*B), and every Bayesian layer, told N through its ``_sample_batch`` attribute, views its input as
(N, B, .., I) and runs all N weight samples in one op (``bayes_ext::linear_reparam_samples``, or
``linear_flipout_samples`` for a Flipout layer; a local-reparameterisation layer runs its GEMMs once on the N*B rows and draws each sample's output
noise from that sample's seed). Its KL terms are then per-sample vectors (N,), so
``nn_kl_divergence()`` gives each sample's KL.

Same noise as the loop: the loop draws one seed per layer call in call order, so with L layer calls
per forward, sample s of call l gets draw s*L + l. The N*L seeds are drawn up front (one randint,
identical to N*L successive draws) assuming L = the number of Bayesian layers; if the forward
makes another number of calls (a shared layer, an unused one), the generator is rewound and the
forward rerun with the counted L. Hence the same loss and gradients as the loop for the same
``torch.manual_seed``.

Which models: every BayesianModule must support it (``_supports_sample_batch()``: BayesianLinear,
not frozen, no prior_dist, with the default estimator or estimator="flipout" and the MC KL, or
estimator="lrt" with a Gaussian prior (its closed-form KL)), and no module may mix the samples
(BatchNorm in training; layers that take the batch in dim 1). Dropout draws its own noise from the
generator, so automatic selection leaves models with active dropout to the loop (``vectorized=True``
runs them, with other dropout masks than the loop's). The model must keep the batch in dim 0 in front
of every Bayesian layer (checked: a layer whose input is not N*B long in dim 0 falls back) and treat
the examples of a batch independently, which cannot be checked: a forward that mixes examples by
hand (``x - x.mean(0)``) would mix the samples too and needs ``vectorized=False``.
"""
from typing import Optional

import torch
from torch import nn

from .. import functional as BF
from .. import functional_estimators as BFE
from .. import functional_flipout_samples as FFS
from .. import functional_samples as FS
from ..losses.kl_divergence import kl_divergence_of_layers
from ..functional_samples import draw_seeds
from ..modules.base_bayesian_module import BayesianModule


# run_samples' kl_fn for "kl_divergence_from_nn(model)", computed from the layers it found.
LAYERS_KL = object()


class NotVectorisable(ValueError):
    """Raised inside a vectorised forward when the model does something the batched path cannot
    reproduce; automatic selection then reruns the samples as the loop."""


# Modules whose output for one example depends on the other examples of the batch, or that read
# the batch in another dimension than 0: repeating the batch N times would change their result.
_BATCH_AWARE = (nn.modules.batchnorm._BatchNorm, nn.RNNBase, nn.MultiheadAttention, nn.TransformerEncoderLayer,
                nn.TransformerDecoderLayer, nn.Transformer)


def _mixes_samples(m: nn.Module) -> Optional[str]:
    if not isinstance(m, _BATCH_AWARE):  # most modules: one check
        return None
    if isinstance(m, nn.modules.batchnorm._BatchNorm) and (m.training or not m.track_running_stats):
        return "uses batch statistics"
    if isinstance(m, nn.RNNBase) and not m.batch_first:
        return "takes the batch in dim 1 (batch_first=False)"
    if isinstance(m, (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer,
                      nn.Transformer)) and not _batch_first(m):
        return "takes the batch in dim 1 (batch_first=False)"
    return None


def _batch_first(m) -> bool:
    if hasattr(m, "batch_first"):
        return bool(m.batch_first)
    attn = getattr(m, "self_attn", None)
    return bool(getattr(attn, "batch_first", False))


def _draws_noise(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.dropout._DropoutNd) and m.training and m.p > 0


def unsupported_reason(model: nn.Module, inputs, strict: bool) -> Optional[str]:
    """Why the vectorised path cannot run ``model(inputs)`` (None when it can). ``strict`` (the
    automatic choice) also refuses what would only change the noise (dropout)."""
    return _inspect(model, inputs, strict)[0]


def _inspect(model: nn.Module, inputs, strict: bool):
    """(unsupported_reason, the model's Bayesian layers) from one walk over its modules (names are
    only looked up to word an error: building them is most of a walk's cost)."""
    if not isinstance(inputs, torch.Tensor) or inputs.dim() < 1 or inputs.shape[0] < 1:
        return "the input is not a tensor with a non-empty batch in dim 0", []
    layers = []
    for m in model.modules():
        if isinstance(m, BayesianModule):
            supports = getattr(m, "_supports_sample_batch", None)
            if supports is None or not supports():
                return f"Bayesian layer {_label(model, m)} does not support vectorised samples", layers
            layers.append(m)
        reason = _mixes_samples(m)
        if reason:
            return f"{_label(model, m)} {reason}", layers
        if strict and _draws_noise(m):
            return f"{_label(model, m)} draws its own noise (the loop's masks would differ)", layers
    if not layers:
        return "the model has no Bayesian layer", layers
    return None, layers


def _label(model: nn.Module, module: nn.Module) -> str:
    name = next((n for n, m in model.named_modules() if m is module), "")
    return f"{name or 'the model'} ({type(module).__name__})"


class SampleBatch:
    """One vectorised forward: N samples of a batch of B, L layer calls expected per forward.

    A supporting layer's forward calls ``linear(layer, x)`` while its ``_sample_batch`` is this object.
    """

    def __init__(self, sample_nbr: int, batch: int, calls_per_forward: int, seeds: Optional[torch.Tensor] = None):
        self.sample_nbr = sample_nbr
        self.batch = batch
        self.per_forward = calls_per_forward
        self.seeds = draw_seeds(sample_nbr * calls_per_forward).view(sample_nbr, calls_per_forward) \
            if seeds is None else seeds
        self._per_call = self.seeds.unbind(1)  # [l]: the N seeds of layer call l (a strided view)
        self.calls = 0
        self.called = []

    def _seeds_for_next_call(self, layer):
        l = self.calls
        self.calls += 1
        self.called.append(layer)
        # Past the expected count the result is thrown away and rerun with the counted L.
        return self._per_call[l % self.per_forward] if self.per_forward else self.seeds.new_zeros(self.sample_nbr)

    def linear(self, layer, x: torch.Tensor) -> torch.Tensor:
        """BayesianLinear's forward for N samples: x (N*B, .., I) -> (N*B, .., O), KL terms (N,)."""
        seeds = self._seeds_for_next_call(layer)
        n = self.sample_nbr
        if not isinstance(x, torch.Tensor) or x.dim() == 0 or x.shape[-1] != layer.in_features:
            BF.check_input(x, layer.weight_mu, layer.in_features)  # raises the layer's error
        if x.dim() < 2 or x.shape[0] != n * self.batch:
            raise NotVectorisable(
                f"a vectorised forward expects every Bayesian layer's input to hold the {n} samples x "
                f"{self.batch} examples in dim 0, got shape {tuple(x.shape)} (pass vectorized=False)")
        params = (layer.weight_mu, layer.weight_rho, layer.bias_mu, layer.bias_rho)
        if layer.estimator == "lrt":  # the closed-form KL: the same for every sample
            y, kl = BFE.linear_lrt_samples(x, *params, seeds, layer._fused_kl_prior_sigma())
            layer._set_kl_terms(kl.expand(n), kl.new_zeros(n))
            return y
        if layer.estimator == "flipout":
            if not FFS.supports(x, layer.weight_mu, n):
                raise NotVectorisable("Flipout layers run vectorised only in their weights' dtype, outside autocast "
                                      "and with N weight samples of at most "
                                      f"{FS.STACKED_ELEMENTS} elements (pass vectorized=False)")
            y, log_q, log_p = FFS.linear_flipout_samples(x, *params, seeds, layer.prior)
            layer._set_kl_terms(log_q, log_p)
            return y
        # the layer's parameters and prior were checked when it was built, the seeds are ours; x is
        # checked by linear_samples_grouped
        y, log_q, log_p = FS.linear_samples_grouped(x, *params, seeds, layer.prior)
        layer._set_kl_terms(log_q, log_p)
        return y

    def finish(self) -> None:
        """Leave each called layer reporting the KL terms of the last sample, as the loop does."""
        for layer in self.called:
            q = layer._kl_terms[0]  # per-sample terms, unless the call failed before setting them
            if isinstance(q, torch.Tensor) and q.dim() == 1 and q.shape[0] == self.sample_nbr:
                layer._report_last_sample_kl()


def _stack_copies(t: torch.Tensor, n: int) -> torch.Tensor:
    """n copies of t along dim 0 (t.repeat(n, 1, ...)): torch.cat, a quarter of repeat's cost on small
    tensors (repeat goes through unfold and a strided copy), which was 90 us of a 1.2 ms step."""
    return torch.cat([t] * n) if n > 1 else t


def run_samples(model: nn.Module, inputs, sample_nbr: int, vectorized: Optional[bool], kl_fn=None):
    """The N sampled outputs of ``model(inputs)`` as one tensor (N*B, ...), sample s on rows
    [s*B, (s+1)*B) (``unflatten(0, (N, B))`` gives (N, B, ...)), and, if ``kl_fn`` is
    given, ``kl_fn()`` evaluated while the layers hold per-sample KL terms (shape (N,)); LAYERS_KL
    stands for kl_divergence_from_nn(model).

    Returns None when the loop must run instead (vectorized=None and the model is unsupported);
    raises ValueError when vectorized=True and the model is unsupported.
    """
    if vectorized is not None and not isinstance(vectorized, bool):
        raise TypeError(f"vectorized must be None, True or False, got {vectorized!r}")
    if vectorized is False:
        return None
    strict = vectorized is None
    reason, layers = _inspect(model, inputs, strict)
    if reason is not None:
        if strict:
            return None
        raise ValueError(f"vectorized=True, but {reason}; use vectorized=None (auto) or False (the loop)")
    batch = inputs.shape[0]
    repeated = _stack_copies(inputs, sample_nbr)
    rng_state = torch.get_rng_state()
    per_forward = len(layers)
    for _ in range(2):  # the second try only when the forward made another number of layer calls
        sb = SampleBatch(sample_nbr, batch, per_forward)
        for layer in layers:
            layer.__dict__["_sample_batch"] = sb  # a plain attribute (skips nn.Module.__setattr__)
        try:
            try:
                out = model(repeated)
                if not isinstance(out, torch.Tensor) or out.dim() < 1 or out.shape[0] != sample_nbr * batch:
                    shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                    raise NotVectorisable(f"the model's output must hold the {sample_nbr} samples x {batch} "
                                          f"examples in dim 0, got {shape}")
            except Exception:
                # Automatic selection never turns a model that works in the loop into an error: a
                # forward that fails on the N*B batch (a hard-coded batch size in a view, say) runs
                # as the loop, which raises again if the model is broken either way.
                torch.set_rng_state(rng_state)
                if strict:
                    return None
                raise
            if sb.calls == per_forward:
                kl = None if kl_fn is None else kl_divergence_of_layers(layers) if kl_fn is LAYERS_KL else kl_fn()
                return out, kl
        finally:
            for layer in layers:
                layer.__dict__.pop("_sample_batch", None)
            sb.finish()
        torch.set_rng_state(rng_state)
        per_forward = sb.calls
    if strict:
        return None
    raise NotVectorisable("the model's number of Bayesian layer calls changed between two forwards")


# Built-in losses whose value on the N stacked samples (labels repeated) is exactly the sum
# ("sum") or the mean ("mean") of their values on each sample: every sample has the same labels,
# so per-sample means share one denominator (also with class weights or ignore_index).
_ELEMENTWISE_LOSSES = (nn.MSELoss, nn.L1Loss, nn.SmoothL1Loss, nn.HuberLoss, nn.BCELoss, nn.BCEWithLogitsLoss)
_CLASS_LOSSES = (nn.CrossEntropyLoss, nn.NLLLoss)


def _stackable_loss(criterion, sample_shape: torch.Size, labels) -> bool:
    """Whether criterion on the stacked samples is the sum / mean of it on each (one sample's
    outputs have sample_shape)."""
    kind = type(criterion)
    if not isinstance(labels, torch.Tensor) or getattr(criterion, "reduction", None) not in ("mean", "sum"):
        return False
    if kind in _ELEMENTWISE_LOSSES:  # no broadcasting (it would pair other elements once stacked), no weights
        return (labels.shape == sample_shape and getattr(criterion, "weight", None) is None
                and getattr(criterion, "pos_weight", None) is None)
    if kind in _CLASS_LOSSES:  # (B, C, ...) scores against (B, ...) classes or (B, C, ...) probabilities
        return len(sample_shape) >= 2 and labels.dim() >= 1 and labels.shape[0] == sample_shape[0]
    return False


def criterion_over_samples(criterion, outputs: torch.Tensor, labels, sample_nbr: int, reduce: str = "sum"):
    """sum (reduce="sum") or mean ("mean") over s of criterion(outputs[s], labels), the loop's
    likelihood, for outputs (N*B, ...) as run_samples gives them (N = sample_nbr).

    Each sample separately in general (any criterion gives the loop's value); one call on the
    stacked samples for the built-in losses where that is the same number (fewer autograd nodes):
    a "mean" loss on the stack is already the mean over the samples.
    """
    n = sample_nbr
    if _stackable_loss(criterion, (outputs.shape[0] // n,) + outputs.shape[1:], labels):
        value = criterion(outputs, _stack_copies(labels, n))
        if criterion.reduction == "mean":
            return value if reduce == "mean" else value * n
        return value / n if reduce == "mean" else value
    total = 0
    for out in outputs.unflatten(0, (n, -1)).unbind(0):
        total = total + criterion(out, labels)
    return total / n if reduce == "mean" else total


def kl_over_samples(kl, sample_nbr: int, weight=1, reduce: str = "sum"):
    """weight times the sum (reduce="sum") or mean ("mean") over the samples of the per-sample KL
    (N,) (or of a KL that is the same for all); a plain weight of 1 adds no multiplication."""
    per_sample = isinstance(kl, torch.Tensor) and kl.dim() == 1 and kl.shape[0] == sample_nbr
    if reduce == "mean":
        total = kl.mean() if per_sample else kl
    else:
        total = kl.sum() if per_sample else kl * sample_nbr
    if isinstance(weight, (int, float)) and not isinstance(weight, bool) and weight == 1:
        return total
    return total * weight
