"""The fused sampling op alone, next to the streaming floor on the same tensors.

torch.add(mu, rho, out=w) reads two and writes one weight-sized tensor: the least any sampler must
move. torch.randn(out=w) is PyTorch's own cost of just drawing the noise. sample_weight does noise,
softplus, w, log q and log p in one pass; its backward regenerates the noise from (seed, offset).
On CUDA a device-to-device copy_ of the same number of bytes (12 per weight) is the bandwidth floor
issue 8 measures the op against.
"""
import time

import torch

import timing

PRIOR = (1.0, 0.1, 0.4)  # prior_pi, sigma_1, sigma_2 (BLiTZ BayesianLinear defaults)


def _time(fn, device, warmup, reps):
    if device.type == "cuda":
        return _time_cuda(fn, warmup, reps)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(warmup):
        fn()
    ts = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t0)
    return timing.summarize(ts)


def _time_cuda(fn, warmup, reps, inner=10):
    """CUDA events around `inner` back-to-back calls: a 100 us kernel is not lost in host syncs."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        ts.append(start.elapsed_time(end) / 1e3 / inner)
    return timing.summarize(ts)


def run(shapes, device, warmup, reps, have_ext):
    """{"OxI": {op: summary}} for each (out, in) shape; bayes_ext ops only when compiled."""
    device = torch.device(device)
    res = {}
    for o, i in shapes:
        mu = torch.randn(o, i, device=device) * 0.1
        rho = torch.full((o, i), -7.0, device=device) + 0.1 * torch.randn(o, i, device=device)
        w = torch.empty_like(mu)
        row = {
            "torch.add(out=)": _time(lambda: torch.add(mu, rho, out=w), device, warmup, reps),
            "torch.randn(out=)": _time(lambda: torch.randn(o, i, out=w), device, warmup, reps),
        }
        if device.type == "cuda":
            # read 6 + write 6 bytes per weight: the 12 bytes sample_weight moves (mu, rho in; w out)
            src = torch.randn(o * i * 3 // 2, device=device)
            dst = torch.empty_like(src)
            row["copy_ (same bytes)"] = _time(lambda: dst.copy_(src), device, warmup, reps)
            del src, dst
        if have_ext:
            ops = torch.ops.bayes_ext
            seed = torch.tensor(1234, dtype=torch.int64)
            try:
                ops.sample_weight(mu, rho, seed, 0, *PRIOR)
            except RuntimeError:
                seed = seed.to(device)  # in case the CUDA op wants the seed on the device
            row["sample_weight"] = _time(lambda: ops.sample_weight(mu, rho, seed, 0, *PRIOR),
                                         device, warmup, reps)
            g = torch.randn_like(mu)
            glq = torch.tensor(1.0, device=device)
            glp = torch.tensor(-1.0, device=device)
            row["sample_weight_backward"] = _time(
                lambda: ops.sample_weight_backward(g, glq, glp, mu, rho, seed, 0, *PRIOR, False),
                device, warmup, reps)
        res[f"{o}x{i}"] = row
        del mu, rho, w
    return res
