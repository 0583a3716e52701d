"""Argument checks for the Python entry points and the pure-PyTorch kernels.

They mirror csrc/include/bayes_ext/op_checks.h so both backends reject the same inputs with the
same kind of error: TypeError for wrong types / dtypes, ValueError for wrong shapes, devices or
values. Messages name the argument and say what was expected.
"""
import math
from typing import Tuple

import torch

FLOAT_DTYPES = (torch.float32, torch.float64)


def check_tensor(t, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")


def check_floating(t, name: str, dtypes=FLOAT_DTYPES) -> None:
    check_tensor(t, name)
    if t.dtype not in dtypes:
        allowed = " or ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must be a {allowed} tensor, got {t.dtype}")


def check_matches(t, name: str, like, like_name: str) -> None:
    """t is a tensor with like's dtype, device and shape (in that order of checks)."""
    check_tensor(t, name)
    if t.dtype != like.dtype:
        raise TypeError(f"{name} must have the dtype of {like_name} ({like.dtype}), got {t.dtype}")
    if t.device != like.device:
        raise ValueError(f"{name} must be on the device of {like_name} ({like.device}), got {t.device}")
    if t.shape != like.shape:
        raise ValueError(f"{name} must have the shape of {like_name} {tuple(like.shape)}, got {tuple(t.shape)}")


LOW_PRECISION_HINT = ("; the posterior parameters stay in float32 (or float64): for bf16 / fp16 compute, "
                      "use torch.autocast")


def check_posterior_params(mu, rho, mu_name: str = "mu", rho_name: str = "rho") -> None:
    check_tensor(mu, mu_name)
    if mu.dtype in (torch.bfloat16, torch.float16):  # e.g. after model.half(): say what to do instead
        raise TypeError(f"{mu_name} must be a float32 or float64 tensor, got {mu.dtype}{LOW_PRECISION_HINT}")
    check_floating(mu, mu_name)
    check_matches(rho, rho_name, mu, mu_name)


def check_seed(seed, like) -> None:
    check_tensor(seed, "seed")
    if seed.dtype != torch.int64:
        raise TypeError(f"seed must be an int64 tensor, got {seed.dtype}")
    if seed.numel() != 1:
        raise ValueError(f"seed must hold exactly one value, got {seed.numel()}")
    if seed.device.type != "cpu" and seed.device != like.device:
        raise ValueError(f"seed must be on the CPU or on the device of mu ({like.device}), got {seed.device}")


def check_seed_groups(seed, like, like_name: str) -> int:
    """Mirrors check_seed_groups in csrc/include/bayes_ext/op_checks.h: one seed, or N (1-D) splitting
    like's elements into N equal groups; returns N."""
    check_tensor(seed, "seed")
    if seed.dtype != torch.int64:
        raise TypeError(f"seed must be an int64 tensor, got {seed.dtype}")
    if not (seed.numel() == 1 or (seed.dim() == 1 and seed.numel() >= 1)):
        raise ValueError(f"seed must hold one value or be a 1-D tensor of N >= 1 seeds, got shape {tuple(seed.shape)}")
    if like.numel() % seed.numel() != 0:
        raise ValueError(f"the {seed.numel()} seeds must split {like_name}'s {like.numel()} elements into equal groups")
    if seed.device.type != "cpu" and seed.device != like.device:
        raise ValueError(f"seed must be on the CPU or on the device of {like_name} ({like.device}), got {seed.device}")
    return seed.numel()


def check_positive_prior_sigma(prior_sigma) -> None:
    """The sigma of a Gaussian prior N(0, sigma^2) for a closed-form KL: a positive, finite number."""
    if not (isinstance(prior_sigma, (int, float)) and prior_sigma > 0 and math.isfinite(prior_sigma)):
        raise ValueError(f"prior_sigma must be positive and finite, got {prior_sigma}")


def check_offset(offset) -> None:
    if not isinstance(offset, int) or isinstance(offset, bool):
        raise TypeError(f"offset must be an int, got {type(offset).__name__}")
    if offset < 0 or offset >= 2 ** 63:
        raise ValueError(f"offset must be in [0, 2**63), got {offset}")


def check_start(start, numel: int) -> None:
    """start: the stream index of a tensor's first element (a block of rows of a larger weight)."""
    if not isinstance(start, int) or isinstance(start, bool):
        raise TypeError(f"start must be an int, got {type(start).__name__}")
    if start < 0 or start > 2 ** 62 - numel:
        raise ValueError(f"start must be in [0, 2**62 - numel], got {start}")


def check_prior(pi: float, sigma1: float, sigma2: float) -> None:
    for name, value in (("prior_pi", pi), ("prior_sigma1", sigma1), ("prior_sigma2", sigma2)):
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not 0.0 <= pi <= 1.0:
        raise ValueError(f"prior_pi must be in [0, 1], got {pi}")
    if not (sigma1 > 0 and math.isfinite(sigma1)):
        raise ValueError(f"prior_sigma1 must be positive and finite, got {sigma1}")
    if not (sigma2 > 0 and math.isfinite(sigma2)):
        raise ValueError(f"prior_sigma2 must be positive and finite, got {sigma2}")


def prior_values(prior) -> Tuple[float, float, float]:
    """(pi, sigma1, sigma2) of a scale-mixture prior given as three numbers, checked (check_prior)."""
    if isinstance(prior, (str, bytes)) or not hasattr(prior, "__len__") or len(prior) != 3:
        raise ValueError(f"prior must be three numbers (pi, sigma1, sigma2), got {prior!r}")
    for name, value in zip(("prior_pi", "prior_sigma1", "prior_sigma2"), prior):
        if isinstance(value, (str, bytes, bool)) or value is None:
            raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    values = (float(prior[0]), float(prior[1]), float(prior[2]))
    check_prior(*values)
    return values


def check_scalar_grad(g, like, name: str) -> None:
    check_tensor(g, name)
    if g.numel() != 1:
        raise ValueError(f"{name} must hold exactly one value, got shape {tuple(g.shape)}")
    if g.device.type != "cpu" and g.device != like.device:
        raise ValueError(f"{name} must be on the CPU or on the device of mu ({like.device}), got {g.device}")


def check_grad_w(grad_w, mu) -> None:
    if grad_w is None:
        return
    check_tensor(grad_w, "grad_w")
    if grad_w.shape != mu.shape:
        raise ValueError(f"grad_w must have the shape of mu {tuple(mu.shape)}, got {tuple(grad_w.shape)}")
    if grad_w.dtype != mu.dtype:
        raise TypeError(f"grad_w must have the dtype of mu ({mu.dtype}), got {grad_w.dtype}")
    if grad_w.device != mu.device:
        raise ValueError(f"grad_w must be on the device of mu ({mu.device}), got {grad_w.device}")


def check_sample_args(mu, rho, seed, offset, pi, sigma1, sigma2, start=0) -> None:
    check_posterior_params(mu, rho)
    check_seed(seed, mu)
    check_offset(offset)
    check_start(start, mu.numel())
    check_prior(pi, sigma1, sigma2)
