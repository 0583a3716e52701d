"""The fused sampling kernels once each on a 4096 x 4096 weight, for Nsight Compute:

    ncu --clock-control none --section SpeedOfLight -k regex:"forward_kernel|backward_kernel" \
        python bench/ncu_sample_op.py

(bench/gpu_check.sh runs this). Warm-up calls first so that ncu profiles steady-state launches.
"""
import torch

import bayes_ext  # noqa: F401  (loads the extension)

mu = torch.randn(4096, 4096, device="cuda") * 0.1
rho = torch.full_like(mu, -5.0) + 0.1 * torch.randn_like(mu)
seed = torch.tensor(7, dtype=torch.int64)
ops = torch.ops.bayes_ext
for _ in range(2):
    w, log_q, log_p = ops.sample_weight(mu, rho, seed, 0, 1.0, 0.1, 0.4)
    grad = torch.randn_like(mu)
    ops.sample_weight_backward(grad, log_q.new_ones(()), log_p.new_ones(()), mu, rho, seed, 0, 1.0, 0.1, 0.4, True)
torch.cuda.synchronize()
