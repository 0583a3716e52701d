"""Per-call host overhead of a small Bayesian layer: what Python, dispatch and (on CUDA) kernel
launches cost when the kernels do almost nothing (a 16 -> 8 layer, batch 4; one thread on the CPU).

    python bench/overhead.py [--steps 3000] [--device cpu|cuda] [--amp fp32|bf16]

Prints a Markdown table of microseconds per call, each the best of five timed blocks: the training
step (forward, sum(out) + KL, backward) and the no-grad forward of nn.Linear and BayesianLinear,
then the pieces of the Bayesian forward: the functional call, the registered C++ op alone (the
Python in front of it is the difference), the seed draw, the KL terms a loss reads; last a 48-layer
model's KL with its backward, bayes_ext's stacked sum beside BLiTZ's layer-by-layer one. On CUDA the
calls queue back to back and the GPU catches up once per block, so a figure is the host's cost
(issue 8: the eager bf16 steps on an H200 are host-bound). This overhead is what a model of many
small layers pays per layer call.

--ops also prints what the two training steps issue, from torch.profiler: each operator (and, on
CUDA, runtime call such as cudaLaunchKernel) with its calls and self CPU microseconds per step,
nn.Linear's beside BayesianLinear's: where the Bayesian step's extra host time goes.
"""
import argparse
import contextlib
import os
import sys
import time

import torch
from torch import nn

sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # an in-place build
from bayes_ext import functional as BF  # noqa: E402
from bayes_ext.losses import kl_divergence_from_nn  # noqa: E402
from bayes_ext.modules import BayesianLinear  # noqa: E402
from cases import model_kl  # noqa: E402  (bench/ is on sys.path when run as a script)

BATCH, IN, OUT = 4, 16, 8
KL_LAYERS = 48  # the Bayesian linear layers of a GPT-2-small-sized model (12 blocks x 4)
PRIOR = (1.0, 0.1, 0.4)  # BayesianLinear's default (pi, sigma1, sigma2)


def per_call_us(fn, steps, sync):
    for _ in range(max(steps // 10, 1)):
        fn()
    sync()
    n, best = max(steps // 5, 1), float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            fn()
        sync()
        best = min(best, (time.perf_counter() - t0) / n * 1e6)
    return best


def rows(device, amp):
    """[(label, fn)] in the order printed."""
    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if amp == "bf16" else contextlib.nullcontext()
    x = torch.randn(BATCH, IN, device=device, requires_grad=True)
    linear, layer = nn.Linear(IN, OUT).to(device), BayesianLinear(IN, OUT).to(device)
    params = (layer.weight_mu, layer.weight_rho, layer.bias_mu, layer.bias_rho)
    seed = BF.draw_seed()
    x_op = x.detach().to(torch.bfloat16) if amp == "bf16" else x.detach()  # x as autocast hands it to the op
    layer(x)  # KL terms for the "KL terms" row

    def train(module, kl):
        def step():
            with autocast:
                loss = module(x).float().sum() + (module.kl_divergence() if kl else 0)
            loss.backward()
        return step

    def no_grad(fn):
        def call():
            with torch.no_grad(), autocast:
                fn()
        return call

    return [
        ("nn.Linear train step", train(linear, False)),
        ("BayesianLinear train step", train(layer, True)),
        ("nn.Linear no-grad forward", no_grad(lambda: linear(x))),
        ("BayesianLinear no-grad forward", no_grad(lambda: layer(x))),
        ("functional.bayesian_linear, no grad", no_grad(lambda: BF.bayesian_linear(x, *params, seed=seed))),
        ("bayes_ext::linear_reparam_rows alone, no grad", no_grad(
            lambda: torch.ops.bayes_ext.linear_reparam_rows(x_op, *params, seed, *PRIOR, 1 << 40))),
        ("functional.draw_seed", BF.draw_seed),
        ("KL terms: log q - log p", lambda: layer.log_variational_posterior - layer.log_prior),
    ] + model_kl_rows(device)


def model_kl_rows(device):
    """A many-layer model's KL and its backward (the gradients its layers' nodes receive), bayes_ext's
    stacked sum beside BLiTZ's layer-by-layer one (the benchmark's model_kl): on CUDA 6 kernel launches
    against 3 a layer."""
    model = nn.Sequential(*[BayesianLinear(1, 1) for _ in range(KL_LAYERS)])  # only their KL terms are read
    terms = [torch.randn((), device=device, requires_grad=True) for _ in range(2 * KL_LAYERS)]
    for layer, log_q, log_p in zip(model, terms[::2], terms[1::2]):
        layer._set_kl_terms(log_q, log_p)

    def kl_and_backward(kl_fn):
        return lambda: torch.autograd.grad(kl_fn(model), terms)
    return [(f"KL of {KL_LAYERS} layers + backward: kl_divergence_from_nn", kl_and_backward(kl_divergence_from_nn)),
            (f"KL of {KL_LAYERS} layers + backward: BLiTZ's layer-by-layer sum", kl_and_backward(model_kl))]


def op_inventory(fn, sync, steps=50):
    """{name: (calls per step, self CPU us per step)} of `steps` calls of fn under torch.profiler."""
    for _ in range(5):
        fn()
    sync()
    with torch.profiler.profile() as prof:
        for _ in range(steps):
            fn()
        sync()
    return {e.key: (e.count / steps, e.self_cpu_time_total / steps) for e in prof.key_averages()}


def print_op_inventory(steps_by_label, sync, limit=40):
    """The operators of the training steps side by side, most-called in the Bayesian step first."""
    (label_a, fn_a), (label_b, fn_b) = steps_by_label
    a, b = op_inventory(fn_a, sync), op_inventory(fn_b, sync)
    print(f"\n| operator (per step) | {label_a}: calls | us | {label_b}: calls | us |\n|---|---|---|---|---|")
    names = sorted(set(a) | set(b), key=lambda k: (-b.get(k, (0, 0))[0], -a.get(k, (0, 0))[0], k))
    for name in names[:limit]:
        ca, ta = a.get(name, (0, 0))
        cb, tb = b.get(name, (0, 0))
        print(f"| {name[:70]} | {ca:g} | {ta:.1f} | {cb:g} | {tb:.1f} |")
    print(f"| all operators | {sum(c for c, _ in a.values()):g} | {sum(t for _, t in a.values()):.1f} "
          f"| {sum(c for c, _ in b.values()):g} | {sum(t for _, t in b.values()):.1f} |")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=3000, help="calls per measurement (5 blocks)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--amp", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--ops", action="store_true", help="also the operators each training step issues")
    args = p.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(1)
    torch.manual_seed(0)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    where = torch.cuda.get_device_name() if device.type == "cuda" else "CPU, one thread"
    print(f"## Host overhead per call: {where}, {args.amp}, a {IN} -> {OUT} layer at batch {BATCH}, "
          f"torch {torch.__version__}\n\n| call | us |\n|---|---|")
    measured = rows(device, args.amp)
    for label, fn in measured:
        print(f"| {label} | {per_call_us(fn, args.steps, sync):.1f} |")
    if args.ops:
        print_op_inventory(measured[:2], sync)


if __name__ == "__main__":
    main()
