"""Where a bayes_ext training step spends its time on a GPU (issue 8's profiling aid).

    python bench/profile_gpu.py [--amp bf16|fp32]

torch.profiler over a few steps of (a) one 4096 x 4096 x 4096 layer and (b) the GPT-2-small-sized
transformer of the benchmark, each with nn.Linear and with bayes_ext layers; prints the top
operators by self CUDA time and by self CPU time, and each step's wall time. A step whose CPU time
exceeds its CUDA time is launch-bound: Python and dispatch overhead, not kernels, set its speed.
"""
import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

import bench_layers  # the benchmark's GPT-2-small-sized transformer config (TF_GPT2)
import workload


def run(spec, steps=3):
    w = workload.build(spec)
    for _ in range(3):
        w.train_step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        w.train_step()
    torch.cuda.synchronize()
    wall = (time.perf_counter() - t0) / steps * 1e3
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            w.train_step()
        torch.cuda.synchronize()
    ka = prof.key_averages()
    # kernels only: an aten op's row repeats the device time of the kernels it launched
    cuda_total = sum(e.self_device_time_total for e in prof.events()
                     if e.device_type == torch.autograd.DeviceType.CUDA) / steps / 1e3
    print(f"\n=== {spec['kind']} {spec['case']} {spec['amp']}: wall {wall:.2f} ms/step, "
          f"kernels {cuda_total:.2f} ms/step ===")
    print(ka.table(sort_by="self_cuda_time_total", row_limit=12, max_name_column_width=60))
    print(ka.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60))


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--amp", default="bf16", choices=["bf16", "fp32"])
    args = p.parse_args()
    tf = dict(bench_layers.TF_GPT2)
    for case in ("linear", "bayes_ext"):
        run(dict(kind="layer", case=case, shape=[4096, 4096, 4096], sample_nbr=1, device="cuda", amp=args.amp))
        run(dict(kind="transformer", case=case, shape=tf, sample_nbr=1, device="cuda", amp=args.amp))


if __name__ == "__main__":
    main()
