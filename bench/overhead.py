"""Per-call overhead of a small Bayesian layer on the CPU: what Python and dispatch cost when the
kernels do almost nothing (a 16 -> 8 layer, batch 4, one thread).

    python bench/overhead.py [--steps 3000]

Prints microseconds per training step (forward, sum(out) + KL, backward) and per no-grad forward
for nn.Linear and bayes_ext's BayesianLinear, each the best of five timed blocks. This overhead is
what a model of many small layers pays per layer call, and what makes a GPU step CPU-bound.
"""
import argparse
import os
import sys
import time

import torch
from torch import nn

sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # an in-place build
from bayes_ext.modules import BayesianLinear  # noqa: E402


def per_call_us(fn, steps):
    for _ in range(steps // 10):
        fn()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(steps // 5):
            fn()
        best = min(best, (time.perf_counter() - t0) / (steps // 5) * 1e6)
    return best


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3000)
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x = torch.randn(4, 16, requires_grad=True)
    for name, layer, kl in (("nn.Linear", nn.Linear(16, 8), False), ("BayesianLinear", BayesianLinear(16, 8), True)):
        def train():
            loss = layer(x).sum() + (layer.kl_divergence() if kl else 0)
            loss.backward()

        def infer():
            with torch.no_grad():
                layer(x)
        print(f"{name:<15} train step {per_call_us(train, args.steps):7.1f} us   "
              f"no-grad forward {per_call_us(infer, args.steps):6.1f} us")


if __name__ == "__main__":
    main()
