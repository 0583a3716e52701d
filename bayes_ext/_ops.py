"""Registers the pure-PyTorch ops and, for both backends, the fake (meta) kernels and autograd.

``torch.ops.bayes_ext.*`` come from the compiled library (csrc/ops.cpp); ``torch.ops.bayes_ext_py.*``
are defined here with the same schemas and the kernels of bayes_ext/_fallback.py. Fake kernels let
torch.compile trace through the ops; autograd is the hand-written backward that regenerates eps.
"""
import torch

from . import _backend, _checks, _fallback

SCHEMAS = {
    "sample_weight": "(Tensor mu, Tensor rho, Tensor seed, int offset, float prior_pi, float prior_sigma1, "
                     "float prior_sigma2, int start=0) -> (Tensor, Tensor, Tensor)",
    "sample_weight_backward": "(Tensor? grad_w, Tensor grad_log_q, Tensor grad_log_p, Tensor mu, Tensor rho, "
                              "Tensor seed, int offset, float prior_pi, float prior_sigma1, float prior_sigma2, "
                              "bool return_weight, int start=0) -> (Tensor, Tensor, Tensor)",
    "philox_normal": "(Tensor like, Tensor seed, int offset, int start=0) -> Tensor",
}


def _checked_sample_weight(mu, rho, seed, offset, prior_pi, prior_sigma1, prior_sigma2, start=0):
    _checks.check_sample_args(mu, rho, seed, offset, prior_pi, prior_sigma1, prior_sigma2, start)
    return _fallback.sample_weight(mu, rho, seed, offset, prior_pi, prior_sigma1, prior_sigma2, start)


def _checked_sample_weight_backward(grad_w, grad_log_q, grad_log_p, mu, rho, seed, offset, prior_pi, prior_sigma1,
                                    prior_sigma2, return_weight, start=0):
    _checks.check_sample_args(mu, rho, seed, offset, prior_pi, prior_sigma1, prior_sigma2, start)
    _checks.check_grad_w(grad_w, mu)
    _checks.check_scalar_grad(grad_log_q, mu, "grad_log_q")
    _checks.check_scalar_grad(grad_log_p, mu, "grad_log_p")
    return _fallback.sample_weight_backward(grad_w, grad_log_q, grad_log_p, mu, rho, seed, offset, prior_pi,
                                            prior_sigma1, prior_sigma2, return_weight, start)


def _checked_philox_normal(like, seed, offset, start=0):
    _checks.check_floating(like, "like")
    _checks.check_seed(seed, like)
    _checks.check_offset(offset)
    _checks.check_start(start, like.numel())
    return _fallback.philox_normal(like, seed, offset, start)


_python_lib = torch.library.Library("bayes_ext_py", "DEF")
for _name, _impl in (("sample_weight", _checked_sample_weight),
                     ("sample_weight_backward", _checked_sample_weight_backward),
                     ("philox_normal", _checked_philox_normal)):
    _python_lib.define(_name + SCHEMAS[_name])
    _python_lib.impl(_name, _impl, "CompositeExplicitAutograd")


def _fake_sample_weight(mu, rho, seed, offset, prior_pi, prior_sigma1, prior_sigma2, start=0):
    return torch.empty_like(mu, memory_format=torch.contiguous_format), mu.new_empty(()), mu.new_empty(())


def _fake_sample_weight_backward(grad_w, grad_log_q, grad_log_p, mu, rho, seed, offset, prior_pi, prior_sigma1,
                                 prior_sigma2, return_weight, start=0):
    like = lambda: torch.empty_like(mu, memory_format=torch.contiguous_format)
    return like(), like(), like() if return_weight else mu.new_empty(0)


def _fake_philox_normal(like, seed, offset, start=0):
    return torch.empty_like(like, memory_format=torch.contiguous_format)


def _sample_weight_setup_context(ctx, inputs, output):
    mu, rho, seed, offset, prior_pi, prior_sigma1, prior_sigma2, start = inputs
    ctx.save_for_backward(mu, rho, seed)  # parameters and an 8-byte seed: nothing weight-sized is new
    ctx.stream_and_prior = (offset, prior_pi, prior_sigma1, prior_sigma2, start)


def _make_sample_weight_backward(namespace):
    def backward(ctx, grad_w, grad_log_q, grad_log_p):
        mu, rho, seed = ctx.saved_tensors
        offset, prior_pi, prior_sigma1, prior_sigma2, start = ctx.stream_and_prior
        zero = mu.new_zeros(())
        grad_mu, grad_rho, _ = namespace.sample_weight_backward(
            grad_w, zero if grad_log_q is None else grad_log_q, zero if grad_log_p is None else grad_log_p,
            mu, rho, seed, offset, prior_pi, prior_sigma1, prior_sigma2, False, start)
        return grad_mu, grad_rho, None, None, None, None, None, None
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
    torch.library.register_autograd(f"{namespace_name}::sample_weight", _make_sample_weight_backward(namespace),
                                    setup_context=_sample_weight_setup_context)
    torch.library.register_autograd(f"{namespace_name}::philox_normal", _philox_normal_backward,
                                    setup_context=_philox_normal_setup_context)


_register("bayes_ext_py")
if _backend.extension_available():
    _register("bayes_ext")
