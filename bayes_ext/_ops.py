"""Registers the pure-PyTorch ops and, for both backends, the fake (meta) kernels and autograd.

``torch.ops.bayes_ext.*`` come from the compiled library (csrc/ops.cpp); ``torch.ops.bayes_ext_py.*``
are defined here with the same schemas and the kernels of bayes_ext/_fallback.py. Fake kernels let
torch.compile trace through the ops; autograd is the hand-written backward that regenerates eps.
"""
import math
import warnings

import torch

from . import _backend, _checks, _fallback, _func_transforms
from ._saved_inputs import saved_tensors

SCHEMAS = {
    "sample_weight": "(Tensor mu, Tensor rho, Tensor seed, int offset, float prior_pi, float prior_sigma1, "
                     "float prior_sigma2, int start=0, bool noise_only=False) -> (Tensor, Tensor, Tensor)",
    "sample_weight_backward": "(Tensor? grad_w, Tensor grad_log_q, Tensor grad_log_p, Tensor mu, Tensor rho, "
                              "Tensor seed, int offset, float prior_pi, float prior_sigma1, float prior_sigma2, "
                              "bool return_weight, int start=0, bool noise_only=False) -> (Tensor, Tensor, Tensor)",
    "sample_weight_backward_into": "(Tensor(a!) grad_mu, Tensor(b!) grad_rho, Tensor? grad_w, Tensor grad_log_q, "
                                   "Tensor grad_log_p, Tensor mu, Tensor rho, Tensor seed, int offset, "
                                   "float prior_pi, float prior_sigma1, float prior_sigma2, bool return_weight, "
                                   "int start=0, bool noise_only=False) -> Tensor",
    "sample_kl": "(Tensor mu, Tensor rho, Tensor seed, int offset, float prior_pi, float prior_sigma1, "
                 "float prior_sigma2, int start=0) -> (Tensor, Tensor)",
    "sample_weight_samples": "(Tensor mu, Tensor rho, Tensor seeds, int offset, float prior_pi, float prior_sigma1, "
                             "float prior_sigma2) -> (Tensor, Tensor, Tensor)",
    "sample_weight_samples_backward": "(Tensor? grad_w, Tensor grad_log_q, Tensor grad_log_p, Tensor mu, Tensor rho, "
                                      "Tensor seeds, int offset, float prior_pi, float prior_sigma1, "
                                      "float prior_sigma2, bool return_weight) -> (Tensor, Tensor, Tensor)",
    "philox_normal": "(Tensor like, Tensor seed, int offset, int start=0) -> Tensor",
    "sample_rows": "(Tensor mu, Tensor rho, Tensor indices, Tensor seed, int offset) -> Tensor",
    "sample_rows_backward": "(Tensor grad_rows, Tensor mu, Tensor rho, Tensor indices, Tensor seed, "
                            "int offset) -> (Tensor, Tensor)",
    "sample_rows_backward_add_": "(Tensor(a!) grad_mu, Tensor(b!) grad_rho, Tensor grad_rows, Tensor mu, Tensor rho, "
                                 "Tensor indices, Tensor seed, int offset) -> ()",
    "gaussian_kl": "(Tensor mu, Tensor rho, float prior_sigma) -> Tensor",
    "gaussian_kl_backward": "(Tensor grad, Tensor mu, Tensor rho, float prior_sigma) -> (Tensor, Tensor)",
    "lrt_weight_forward": "(Tensor mu, Tensor rho, float prior_sigma) -> (Tensor, Tensor)",
    "lrt_weight_backward_": "(Tensor(a!) grad_mu, Tensor(b!) grad_rho, Tensor grad_kl, Tensor mu, Tensor rho, "
                            "float prior_sigma) -> Tensor",
    "lrt_output_": "(Tensor(a!) var, Tensor mean, Tensor seed, int offset) -> Tensor",
    "lrt_noise_grad": "(Tensor grad, Tensor std, Tensor seed, int offset) -> Tensor",
}


def _checked_sample_weight(mu, rho, seed, offset, prior_pi, prior_sigma1, prior_sigma2, start=0, noise_only=False):
    _checks.check_sample_args(mu, rho, seed, offset, prior_pi, prior_sigma1, prior_sigma2, start)
    return _fallback.sample_weight(mu, rho, seed, offset, prior_pi, prior_sigma1, prior_sigma2, start, noise_only)


def _checked_sample_kl(mu, rho, seed, offset, prior_pi, prior_sigma1, prior_sigma2, start=0):
    _checks.check_sample_args(mu, rho, seed, offset, prior_pi, prior_sigma1, prior_sigma2, start)
    _, log_q, log_p = _fallback.sample_weight(mu, rho, seed, offset, prior_pi, prior_sigma1, prior_sigma2, start)
    return log_q, log_p


def _checked_sample_weight_backward_into(grad_mu, grad_rho, grad_w, grad_log_q, grad_log_p, mu, rho, seed, offset,
                                         prior_pi, prior_sigma1, prior_sigma2, return_weight, start=0,
                                         noise_only=False):
    _check_accumulator(grad_mu, mu, "grad_mu")
    _check_accumulator(grad_rho, mu, "grad_rho")
    g_mu, g_rho, w = _checked_sample_weight_backward(grad_w, grad_log_q, grad_log_p, mu, rho, seed, offset, prior_pi,
                                                     prior_sigma1, prior_sigma2, return_weight, start, noise_only)
    grad_mu.copy_(g_mu)
    grad_rho.copy_(g_rho)
    return w


def _check_seeds(seeds, mu) -> None:
    """Mirrors check_seeds in csrc/include/bayes_ext/op_checks.h."""
    _checks.check_tensor(seeds, "seeds")
    if seeds.dtype != torch.int64:
        raise TypeError(f"seeds must be an int64 tensor, got {seeds.dtype}")
    if seeds.dim() != 1 or seeds.numel() < 1:
        raise ValueError(f"seeds must be a 1-D tensor of N >= 1 seeds, got shape {tuple(seeds.shape)}")
    if seeds.device.type != "cpu" and seeds.device != mu.device:
        raise ValueError(f"seeds must be on the CPU or on the device of mu ({mu.device}), got {seeds.device}")


def _check_samples_args(mu, rho, seeds, offset, prior_pi, prior_sigma1, prior_sigma2) -> None:
    _checks.check_posterior_params(mu, rho)
    _check_seeds(seeds, mu)
    _checks.check_offset(offset)
    _checks.check_prior(prior_pi, prior_sigma1, prior_sigma2)


def _checked_sample_weight_samples(mu, rho, seeds, offset, prior_pi, prior_sigma1, prior_sigma2):
    _check_samples_args(mu, rho, seeds, offset, prior_pi, prior_sigma1, prior_sigma2)
    outs = [_fallback.sample_weight(mu, rho, s, offset, prior_pi, prior_sigma1, prior_sigma2) for s in seeds.unbind(0)]
    return tuple(torch.stack(parts) for parts in zip(*outs))


def _checked_sample_weight_samples_backward(grad_w, grad_log_q, grad_log_p, mu, rho, seeds, offset, prior_pi,
                                            prior_sigma1, prior_sigma2, return_weight):
    _check_samples_args(mu, rho, seeds, offset, prior_pi, prior_sigma1, prior_sigma2)
    n = seeds.numel()
    if grad_w is not None and (grad_w.shape != (n,) + tuple(mu.shape) or grad_w.dtype != mu.dtype
                               or grad_w.device != mu.device):
        raise ValueError(f"grad_w must be a ({n}, *mu.shape) tensor of mu's dtype and device, got "
                         f"{tuple(grad_w.shape)} {grad_w.dtype} {grad_w.device}")
    for g, name in ((grad_log_q, "grad_log_q"), (grad_log_p, "grad_log_p")):
        _checks.check_tensor(g, name)
        if g.dim() != 1 or g.numel() != n:
            raise ValueError(f"{name} must have shape ({n},), got {tuple(g.shape)}")
    grad_mu = grad_rho = None
    ws = []
    for s in range(n):
        g_mu, g_rho, w = _fallback.sample_weight_backward(None if grad_w is None else grad_w[s], grad_log_q[s],
                                                          grad_log_p[s], mu, rho, seeds[s], offset, prior_pi,
                                                          prior_sigma1, prior_sigma2, return_weight)
        grad_mu = g_mu if grad_mu is None else grad_mu + g_mu  # in sample order, like the kernels
        grad_rho = g_rho if grad_rho is None else grad_rho + g_rho
        ws.append(w)
    return grad_mu, grad_rho, torch.stack(ws) if return_weight else mu.new_empty(0)


def _checked_sample_weight_backward(grad_w, grad_log_q, grad_log_p, mu, rho, seed, offset, prior_pi, prior_sigma1,
                                    prior_sigma2, return_weight, start=0, noise_only=False):
    _checks.check_sample_args(mu, rho, seed, offset, prior_pi, prior_sigma1, prior_sigma2, start)
    _checks.check_grad_w(grad_w, mu)
    _checks.check_scalar_grad(grad_log_q, mu, "grad_log_q")
    _checks.check_scalar_grad(grad_log_p, mu, "grad_log_p")
    return _fallback.sample_weight_backward(grad_w, grad_log_q, grad_log_p, mu, rho, seed, offset, prior_pi,
                                            prior_sigma1, prior_sigma2, return_weight, start, noise_only)


def _checked_philox_normal(like, seed, offset, start=0):
    _checks.check_floating(like, "like")
    _checks.check_seed(seed, like)
    _checks.check_offset(offset)
    _checks.check_start(start, like.numel())
    return _fallback.philox_normal(like, seed, offset, start)


def _check_row_args(mu, rho, indices, seed, offset) -> None:
    """Mirrors check_row_args in csrc/cpu/sample_rows_cpu.cpp (value range checked on the CPU only:
    on a GPU it would cost a device sync)."""
    _checks.check_posterior_params(mu, rho)
    if mu.dim() != 2:
        raise ValueError(f"mu must be 2-D (num_embeddings, embedding_dim), got shape {tuple(mu.shape)}")
    _checks.check_tensor(indices, "indices")
    if indices.dtype != torch.int64:
        raise TypeError(f"indices must be an int64 tensor, got {indices.dtype}")
    if indices.device != mu.device:
        raise ValueError(f"indices must be on the device of mu ({mu.device}), got {indices.device}")
    _checks.check_seed(seed, mu)
    _checks.check_offset(offset)
    _checks.check_start(0, mu.numel())
    if indices.device.type == "cpu" and indices.numel() > 0:
        low, high = int(indices.min()), int(indices.max())
        if low < 0 or high >= mu.shape[0]:
            bad = low if low < 0 else high
            raise ValueError(f"indices must be in [0, {mu.shape[0]}), got {bad}")


def _checked_sample_rows(mu, rho, indices, seed, offset):
    _check_row_args(mu, rho, indices, seed, offset)
    return _fallback.sample_rows(mu, rho, indices, seed, offset)


def _checked_sample_rows_backward(grad_rows, mu, rho, indices, seed, offset):
    _check_row_args(mu, rho, indices, seed, offset)
    _check_grad_rows(grad_rows, mu, indices)
    return _fallback.sample_rows_backward(grad_rows, mu, rho, indices, seed, offset)


def _check_grad_rows(grad_rows, mu, indices) -> None:
    _checks.check_tensor(grad_rows, "grad_rows")
    if grad_rows.dtype != mu.dtype:
        raise TypeError(f"grad_rows must have the dtype of mu ({mu.dtype}), got {grad_rows.dtype}")
    if grad_rows.device != mu.device:
        raise ValueError(f"grad_rows must be on the device of mu ({mu.device}), got {grad_rows.device}")
    expected = tuple(indices.shape) + (mu.shape[1],)
    if tuple(grad_rows.shape) != expected:
        raise ValueError(f"grad_rows must have shape indices.shape + (embedding_dim,) = {expected}, "
                         f"got {tuple(grad_rows.shape)}")


def _check_accumulator(t, mu, name: str) -> None:
    """Mirrors check_accumulator in csrc/include/bayes_ext/op_checks.h."""
    _checks.check_matches(t, name, mu, "mu")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def _checked_sample_rows_backward_add_(grad_mu, grad_rho, grad_rows, mu, rho, indices, seed, offset):
    _check_row_args(mu, rho, indices, seed, offset)
    _check_grad_rows(grad_rows, mu, indices)
    _check_accumulator(grad_mu, mu, "grad_mu")
    _check_accumulator(grad_rho, mu, "grad_rho")
    _fallback.sample_rows_backward_add_(grad_mu, grad_rho, grad_rows, mu, rho, indices, seed, offset)


def _checked_gaussian_kl(mu, rho, prior_sigma):
    _checks.check_posterior_params(mu, rho)
    _checks.check_positive_prior_sigma(prior_sigma)
    return _fallback.gaussian_kl(mu, rho, prior_sigma)


def _checked_gaussian_kl_backward(grad, mu, rho, prior_sigma):
    _checks.check_posterior_params(mu, rho)
    _checks.check_positive_prior_sigma(prior_sigma)
    _checks.check_scalar_grad(grad, mu, "grad")
    return _fallback.gaussian_kl_backward(grad, mu, rho, prior_sigma)


def _check_optional_prior_sigma(prior_sigma) -> None:
    if not (prior_sigma >= 0 and math.isfinite(prior_sigma)):
        raise ValueError(f"prior_sigma must be finite and >= 0 (0: no KL), got {prior_sigma}")


def _checked_lrt_weight_forward(mu, rho, prior_sigma):
    _checks.check_posterior_params(mu, rho)
    _check_optional_prior_sigma(prior_sigma)
    return _fallback.lrt_weight_forward(mu, rho, prior_sigma)


def _checked_lrt_weight_backward_(grad_mu, grad_rho, grad_kl, mu, rho, prior_sigma):
    _checks.check_posterior_params(mu, rho)
    _check_optional_prior_sigma(prior_sigma)
    _checks.check_scalar_grad(grad_kl, mu, "grad_kl")
    _check_accumulator(grad_mu, mu, "grad_mu")
    _check_accumulator(grad_rho, mu, "grad_rho")
    return _fallback.lrt_weight_backward_(grad_mu, grad_rho, grad_kl, mu, rho, prior_sigma)


def _check_lrt_noise_args(a, a_name, b, b_name) -> None:
    """Mirrors check_lrt_noise_args in csrc/include/bayes_ext/op_checks.h."""
    _checks.check_floating(a, a_name)
    _checks.check_matches(b, b_name, a, a_name)


def _checked_lrt_output_(var, mean, seed, offset):
    _check_lrt_noise_args(var, "var", mean, "mean")
    if not var.is_contiguous():
        raise ValueError("var must be contiguous (it is overwritten with std)")
    _checks.check_seed_groups(seed, var, "var")
    _checks.check_offset(offset)
    return _fallback.lrt_output_(var, mean, seed, offset)


def _checked_lrt_noise_grad(grad, std, seed, offset):
    _check_lrt_noise_args(std, "std", grad, "grad")
    _checks.check_seed_groups(seed, std, "std")
    _checks.check_offset(offset)
    return _fallback.lrt_noise_grad(grad, std, seed, offset)


def _kernel(impl):
    """A pure-PyTorch kernel as the op's implementation: run without autograd, like the compiled
    kernels (its in-place and out= steps would otherwise fail when a backward is itself recorded,
    create_graph=True; the ops' derivatives are registered separately)."""
    def kernel(*args):
        with torch.no_grad():
            return impl(*args)
    kernel.__name__ = impl.__name__
    return kernel


# (name, pure-PyTorch implementation) of every op in _backend.OP_NAMES
_PYTHON_KERNELS = (("sample_weight", _checked_sample_weight),
                   ("sample_weight_backward", _checked_sample_weight_backward),
                   ("sample_weight_backward_into", _checked_sample_weight_backward_into),
                   ("sample_kl", _checked_sample_kl),
                   ("sample_weight_samples", _checked_sample_weight_samples),
                   ("sample_weight_samples_backward", _checked_sample_weight_samples_backward),
                   ("philox_normal", _checked_philox_normal),
                   ("sample_rows", _checked_sample_rows),
                   ("sample_rows_backward", _checked_sample_rows_backward),
                   ("sample_rows_backward_add_", _checked_sample_rows_backward_add_),
                   ("gaussian_kl", _checked_gaussian_kl),
                   ("gaussian_kl_backward", _checked_gaussian_kl_backward),
                   ("lrt_weight_forward", _checked_lrt_weight_forward),
                   ("lrt_weight_backward_", _checked_lrt_weight_backward_),
                   ("lrt_output_", _checked_lrt_output_),
                   ("lrt_noise_grad", _checked_lrt_noise_grad))
_python_lib = torch.library.Library("bayes_ext_py", "DEF")
for _name, _impl in _PYTHON_KERNELS:
    _python_lib.define(_name + SCHEMAS[_name])
    _python_lib.impl(_name, _kernel(_impl), "CompositeExplicitAutograd")


def _fake_sample_weight(mu, rho, seed, offset, prior_pi, prior_sigma1, prior_sigma2, start=0, noise_only=False):
    return torch.empty_like(mu, memory_format=torch.contiguous_format), mu.new_empty(()), mu.new_empty(())


def _fake_sample_weight_backward(grad_w, grad_log_q, grad_log_p, mu, rho, seed, offset, prior_pi, prior_sigma1,
                                 prior_sigma2, return_weight, start=0, noise_only=False):
    like = lambda: torch.empty_like(mu, memory_format=torch.contiguous_format)
    return like(), like(), like() if return_weight else mu.new_empty(0)


def _fake_philox_normal(like, seed, offset, start=0):
    return torch.empty_like(like, memory_format=torch.contiguous_format)


def _sample_weight_setup_context(ctx, inputs, output):
    # sample_weight's inputs, or sample_kl's (the same without noise_only)
    mu, rho, seed, offset, prior_pi, prior_sigma1, prior_sigma2, start = inputs[:8]
    ctx.save_for_backward(mu, rho, seed)  # parameters and an 8-byte seed: nothing weight-sized is new
    ctx.stream_and_prior = (offset, prior_pi, prior_sigma1, prior_sigma2, start)
    ctx.noise_only = bool(inputs[8]) if len(inputs) > 8 else False


def _make_sample_weight_backward(namespace):
    def backward(ctx, grad_w, grad_log_q, grad_log_p):
        mu, rho, seed = saved_tensors(ctx)
        offset, prior_pi, prior_sigma1, prior_sigma2, start = ctx.stream_and_prior
        zero = mu.new_zeros(())
        grad_mu, grad_rho, _ = namespace.sample_weight_backward(
            grad_w, zero if grad_log_q is None else grad_log_q, zero if grad_log_p is None else grad_log_p,
            mu, rho, seed, offset, prior_pi, prior_sigma1, prior_sigma2, False, start, ctx.noise_only)
        return (grad_mu, grad_rho) + (None,) * (len(ctx.needs_input_grad) - 2)
    return backward


def _fake_sample_weight_backward_into(grad_mu, grad_rho, grad_w, grad_log_q, grad_log_p, mu, rho, seed, offset,
                                      prior_pi, prior_sigma1, prior_sigma2, return_weight, start=0, noise_only=False):
    return torch.empty_like(mu, memory_format=torch.contiguous_format) if return_weight else mu.new_empty(0)


def _fake_sample_kl(mu, rho, seed, offset, prior_pi, prior_sigma1, prior_sigma2, start=0):
    return mu.new_empty(()), mu.new_empty(())


def _make_sample_kl_backward(namespace):
    """sample_kl's (log_q, log_p) are sample_weight's without w: the same backward with no grad_w."""
    weight_backward = _make_sample_weight_backward(namespace)

    def backward(ctx, grad_log_q, grad_log_p):
        return weight_backward(ctx, None, grad_log_q, grad_log_p)
    return backward


def _fake_sample_weight_samples(mu, rho, seeds, offset, prior_pi, prior_sigma1, prior_sigma2):
    n = seeds.shape[0]
    return mu.new_empty((n,) + tuple(mu.shape)), mu.new_empty((n,)), mu.new_empty((n,))


def _fake_sample_weight_samples_backward(grad_w, grad_log_q, grad_log_p, mu, rho, seeds, offset, prior_pi,
                                         prior_sigma1, prior_sigma2, return_weight):
    like = lambda: torch.empty_like(mu, memory_format=torch.contiguous_format)
    w = mu.new_empty((seeds.shape[0],) + tuple(mu.shape)) if return_weight else mu.new_empty(0)
    return like(), like(), w


def _sample_weight_samples_setup_context(ctx, inputs, output):
    mu, rho, seeds, offset, prior_pi, prior_sigma1, prior_sigma2 = inputs
    ctx.save_for_backward(mu, rho, seeds)  # N seeds; the samples are regenerated in backward
    ctx.stream_and_prior = (offset, prior_pi, prior_sigma1, prior_sigma2)


def _make_sample_weight_samples_backward(namespace):
    def backward(ctx, grad_w, grad_log_q, grad_log_p):
        mu, rho, seeds = saved_tensors(ctx)
        zeros = mu.new_zeros((seeds.shape[0],))
        grad_mu, grad_rho, _ = namespace.sample_weight_samples_backward(
            grad_w, zeros if grad_log_q is None else grad_log_q, zeros if grad_log_p is None else grad_log_p,
            mu, rho, seeds, *ctx.stream_and_prior, False)
        return grad_mu, grad_rho, None, None, None, None, None
    return backward


def _philox_normal_setup_context(ctx, inputs, output):
    ctx.mark_non_differentiable(output)  # eps depends on (seed, offset) only, not on `like`'s values


def _philox_normal_backward(ctx, grad):
    return None, None, None, None


def _register(namespace_name: str) -> None:
    namespace = getattr(torch.ops, namespace_name)
    torch.library.register_fake(f"{namespace_name}::sample_weight")(_fake_sample_weight)
    torch.library.register_fake(f"{namespace_name}::sample_weight_backward")(_fake_sample_weight_backward)
    torch.library.register_fake(f"{namespace_name}::philox_normal")(_fake_philox_normal)
    _func_transforms.register_autograd(f"{namespace_name}::sample_weight", _make_sample_weight_backward(namespace),
                                       setup_context=_sample_weight_setup_context)
    _func_transforms.register_autograd(f"{namespace_name}::philox_normal", _philox_normal_backward,
                                       setup_context=_philox_normal_setup_context)
    torch.library.register_fake(f"{namespace_name}::sample_weight_samples")(_fake_sample_weight_samples)
    torch.library.register_fake(f"{namespace_name}::sample_weight_samples_backward")(
        _fake_sample_weight_samples_backward)
    _func_transforms.register_autograd(f"{namespace_name}::sample_weight_samples",
                                       _make_sample_weight_samples_backward(namespace),
                                       setup_context=_sample_weight_samples_setup_context)
    torch.library.register_fake(f"{namespace_name}::sample_weight_backward_into")(_fake_sample_weight_backward_into)
    torch.library.register_fake(f"{namespace_name}::sample_kl")(_fake_sample_kl)
    _func_transforms.register_autograd(f"{namespace_name}::sample_kl", _make_sample_kl_backward(namespace),
                                       setup_context=_sample_weight_setup_context)


def _fake_sample_rows(mu, rho, indices, seed, offset):
    return mu.new_empty(tuple(indices.shape) + (mu.shape[1],))


def _fake_sample_rows_backward(grad_rows, mu, rho, indices, seed, offset):
    like = lambda: torch.empty_like(mu, memory_format=torch.contiguous_format)
    return like(), like()


def _sample_rows_setup_context(ctx, inputs, output):
    mu, rho, indices, seed, offset = inputs
    ctx.save_for_backward(mu, rho, indices, seed)  # the rows are regenerated from the seed in backward
    ctx.offset = offset


def _make_sample_rows_backward(namespace):
    def backward(ctx, grad_rows):
        mu, rho, indices, seed = saved_tensors(ctx)
        grad_mu, grad_rho = namespace.sample_rows_backward(grad_rows.contiguous(), mu, rho, indices, seed, ctx.offset)
        return grad_mu, grad_rho, None, None, None
    return backward


def _register_rows(namespace_name: str) -> None:
    namespace = getattr(torch.ops, namespace_name)
    torch.library.register_fake(f"{namespace_name}::sample_rows")(_fake_sample_rows)
    torch.library.register_fake(f"{namespace_name}::sample_rows_backward")(_fake_sample_rows_backward)
    _func_transforms.register_autograd(f"{namespace_name}::sample_rows", _make_sample_rows_backward(namespace),
                                       setup_context=_sample_rows_setup_context)


def _fake_sample_rows_backward_add_(grad_mu, grad_rho, grad_rows, mu, rho, indices, seed, offset):
    return None


def _fake_gaussian_kl(mu, rho, prior_sigma):
    return mu.new_empty(())


def _fake_gaussian_kl_backward(grad, mu, rho, prior_sigma):
    like = lambda: torch.empty_like(mu, memory_format=torch.contiguous_format)
    return like(), like()


def _gaussian_kl_setup_context(ctx, inputs, output):
    mu, rho, prior_sigma = inputs
    ctx.save_for_backward(mu, rho)
    ctx.prior_sigma = prior_sigma


def _make_gaussian_kl_backward(namespace):
    def backward(ctx, grad):
        mu, rho = saved_tensors(ctx)
        grad_mu, grad_rho = namespace.gaussian_kl_backward(grad, mu, rho, ctx.prior_sigma)
        return grad_mu, grad_rho, None
    return backward


def _fake_lrt_weight_forward(mu, rho, prior_sigma):
    return torch.empty_like(mu, memory_format=torch.contiguous_format), mu.new_empty(())


def _fake_lrt_weight_backward_(grad_mu, grad_rho, grad_kl, mu, rho, prior_sigma):
    return torch.empty_like(mu, memory_format=torch.contiguous_format)


def _fake_lrt_output_(var, mean, seed, offset):
    return torch.empty_like(var, memory_format=torch.contiguous_format)


def _fake_lrt_noise_grad(grad, std, seed, offset):
    return torch.empty_like(std, memory_format=torch.contiguous_format)


def _register_kl(namespace_name: str) -> None:
    namespace = getattr(torch.ops, namespace_name)
    torch.library.register_fake(f"{namespace_name}::lrt_weight_forward")(_fake_lrt_weight_forward)
    torch.library.register_fake(f"{namespace_name}::lrt_weight_backward_")(_fake_lrt_weight_backward_)
    torch.library.register_fake(f"{namespace_name}::lrt_output_")(_fake_lrt_output_)
    torch.library.register_fake(f"{namespace_name}::lrt_noise_grad")(_fake_lrt_noise_grad)
    torch.library.register_fake(f"{namespace_name}::sample_rows_backward_add_")(_fake_sample_rows_backward_add_)
    torch.library.register_fake(f"{namespace_name}::gaussian_kl")(_fake_gaussian_kl)
    torch.library.register_fake(f"{namespace_name}::gaussian_kl_backward")(_fake_gaussian_kl_backward)
    _func_transforms.register_autograd(f"{namespace_name}::gaussian_kl", _make_gaussian_kl_backward(namespace),
                                       setup_context=_gaussian_kl_setup_context)


def _fake_linear_samples_stacked(x, weight_mu, weight_rho, bias_mu, bias_rho, seeds, prior_pi, prior_sigma1,
                                 prior_sigma2):
    n = seeds.shape[0]
    return x.new_empty(x.shape[:-1] + (weight_mu.shape[0],)), weight_mu.new_empty((n,)), weight_mu.new_empty((n,))


def _fake_linear_samples_stacked_backward(grad_out, grad_log_q, grad_log_p, x, weight_mu, weight_rho, bias_mu,
                                          bias_rho, seeds, prior_pi, prior_sigma1, prior_sigma2, need_x):
    def like(t):
        return torch.empty_like(t, memory_format=torch.contiguous_format)
    grad_x = like(x) if need_x else x.new_empty(0)
    if bias_mu is None:
        return grad_x, like(weight_mu), like(weight_rho), weight_mu.new_empty(0), weight_mu.new_empty(0)
    return grad_x, like(weight_mu), like(weight_rho), like(bias_mu), like(bias_rho)


def _fake_linear_reparam_rows(x, weight_mu, weight_rho, bias_mu, bias_rho, seed, prior_pi, prior_sigma1,
                              prior_sigma2, block_rows):
    return x.new_empty(x.shape[:-1] + (weight_mu.shape[0],)), weight_mu.new_empty(()), weight_mu.new_empty(())


def _fake_linear_reparam_rows_backward(grad_out, grad_log_q, grad_log_p, x, weight_mu, weight_rho, bias_mu,
                                       bias_rho, seed, prior_pi, prior_sigma1, prior_sigma2, block_rows, need_x):
    # the same outputs as the stacked layer's backward
    return _fake_linear_samples_stacked_backward(grad_out, grad_log_q, grad_log_p, x, weight_mu, weight_rho, bias_mu,
                                                 bias_rho, seed, prior_pi, prior_sigma1, prior_sigma2, need_x)


def _fake_linear_lrt_rows(x, weight_mu, weight_rho, bias_mu, bias_rho, seed, prior_sigma, block_rows):
    shape = x.shape[:-1] + (weight_mu.shape[0],)
    return x.new_empty(shape), x.new_empty(shape), weight_mu.new_empty(())


def _fake_layer_grads(x, weight_mu, weight_rho, bias_mu, bias_rho, need_x, need_w, need_b):
    """(grad_x, grad_weight_mu, grad_weight_rho, grad_bias_mu, grad_bias_rho) of the one-sample layer
    ops' backwards, each empty where not asked for."""
    def like(t, needed):
        return torch.empty_like(t, memory_format=torch.contiguous_format) if needed else weight_mu.new_empty(0)
    need_b = need_b and bias_mu is not None
    return (like(x, need_x), like(weight_mu, need_w), like(weight_rho, need_w),
            like(bias_mu, need_b) if need_b else weight_mu.new_empty(0),
            like(bias_rho, need_b) if need_b else weight_mu.new_empty(0))


def _fake_linear_lrt_rows_backward(grad_y, grad_kl, x, weight_mu, weight_rho, bias_mu, bias_rho, seed, std,
                                   prior_sigma, block_rows, need_x, need_w, need_b):
    return _fake_layer_grads(x, weight_mu, weight_rho, bias_mu, bias_rho, need_x, need_w, need_b)


def _fake_linear_flipout_rows(x, weight_mu, weight_rho, bias_mu, bias_rho, seed, prior_pi, prior_sigma1,
                              prior_sigma2, block_rows):
    return _fake_linear_reparam_rows(x, weight_mu, weight_rho, bias_mu, bias_rho, seed, prior_pi, prior_sigma1,
                                     prior_sigma2, block_rows)


def _fake_linear_flipout_rows_backward(grad_y, grad_log_q, grad_log_p, x, weight_mu, weight_rho, bias_mu, bias_rho,
                                       seed, prior_pi, prior_sigma1, prior_sigma2, block_rows, need_x, need_w, need_b):
    return _fake_layer_grads(x, weight_mu, weight_rho, bias_mu, bias_rho, need_x, need_w, need_b)


def _fake_conv_reparam_layer(x, weight_mu, weight_rho, bias_mu, bias_rho, seed, stride, padding, dilation, transposed,
                             output_padding, groups, prior_pi, prior_sigma1, prior_sigma2):
    y = torch.ops.aten.convolution(x, weight_mu.to(x.dtype), None if bias_mu is None else bias_mu.to(x.dtype), stride,
                                   padding, dilation, transposed, output_padding, groups)
    return y, weight_mu.new_empty(()), weight_mu.new_empty(())


def _fake_conv_reparam_layer_backward(grad_out, grad_log_q, grad_log_p, x, weight_mu, weight_rho, bias_mu, bias_rho,
                                      seed, stride, padding, dilation, transposed, output_padding, groups, prior_pi,
                                      prior_sigma1, prior_sigma2, need_x):
    return _fake_layer_grads(x, weight_mu, weight_rho, bias_mu, bias_rho, need_x, True, True)


def _register_compiled_only() -> None:
    """Fake kernels of the ops with no pure-PyTorch twin (_backend.COMPILED_ONLY_OP_NAMES): called
    inside other ops' implementations and backwards, which torch.compile and opcheck trace."""
    torch.library.register_fake("bayes_ext::linear_samples_stacked")(_fake_linear_samples_stacked)
    torch.library.register_fake("bayes_ext::linear_samples_stacked_backward")(_fake_linear_samples_stacked_backward)
    torch.library.register_fake("bayes_ext::linear_reparam_rows")(_fake_linear_reparam_rows)
    torch.library.register_fake("bayes_ext::linear_reparam_rows_backward")(_fake_linear_reparam_rows_backward)
    torch.library.register_fake("bayes_ext::linear_lrt_rows")(_fake_linear_lrt_rows)
    torch.library.register_fake("bayes_ext::linear_lrt_rows_backward")(_fake_linear_lrt_rows_backward)
    torch.library.register_fake("bayes_ext::linear_flipout_rows")(_fake_linear_flipout_rows)
    torch.library.register_fake("bayes_ext::linear_flipout_rows_backward")(_fake_linear_flipout_rows_backward)
    torch.library.register_fake("bayes_ext::conv_reparam_layer")(_fake_conv_reparam_layer)
    torch.library.register_fake("bayes_ext::conv_reparam_layer_backward")(_fake_conv_reparam_layer_backward)


_register("bayes_ext_py")
_register_rows("bayes_ext_py")
_register_kl("bayes_ext_py")
if _backend.extension_available():
    _register("bayes_ext")
    _register_rows("bayes_ext")
    _register_kl("bayes_ext")
    _register_compiled_only()


CUDA_FALLBACK_WARNING = ("bayes_ext: the compiled kernels were built without CUDA (no CUDA toolkit when they were "
                         "built), so CUDA tensors run the pure-PyTorch kernels: the same values, slower. Rebuild "
                         "with the toolkit: FORCE_CUDA=1 pip install --no-build-isolation .")
_cuda_fallback_warned = [False]


def cuda_fallback_kernel(impl):
    """A pure-PyTorch kernel registered for CUDA under a bayes_ext:: name; warns once."""
    kernel = _kernel(impl)

    def cuda_kernel(*args):
        if not _cuda_fallback_warned[0]:
            _cuda_fallback_warned[0] = True
            warnings.warn(CUDA_FALLBACK_WARNING, RuntimeWarning, stacklevel=2)
        return kernel(*args)
    cuda_kernel.__name__ = impl.__name__
    return cuda_kernel


# A library built without CUDA kernels (a build machine without the toolkit, under a torch with
# CUDA) would answer every CUDA call with "Could not run 'bayes_ext::...' with arguments from the
# 'CUDA' backend". The pure-PyTorch kernels take those calls instead (same Philox streams, so the
# same values), and the whole-layer ops registered for CUDA (csrc/cpu/linear_reparam_cpu.cpp) reach
# them through the dispatcher like any kernel.
_cuda_fallback_lib = None
if _backend.extension_available() and not torch._C._dispatch_has_kernel_for_dispatch_key(
        "bayes_ext::sample_weight", "CUDA"):
    _cuda_fallback_lib = torch.library.Library("bayes_ext", "IMPL")
    for _name, _impl in _PYTHON_KERNELS:
        _cuda_fallback_lib.impl(_name, cuda_fallback_kernel(_impl), "CUDA")
