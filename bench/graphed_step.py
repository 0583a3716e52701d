"""The GPT-2-small-sized transformer's training step, eager and captured in a CUDA graph, for
nn.Linear, bayes_ext and BLiTZ layers side by side (issue 8). In eager mode the Bayesian model's
bf16 step on an H100 is host-bound (the GPU waits on Python and kernel launches); a graph replays
the whole step's kernels with no host work, so the graphed ratio is what the kernels cost.

    python bench/graphed_step.py [--amp bf16|fp32] [--out DIR] [--tiny]

CUDA only. Prints a table and writes <out>/graphed_step_<amp>.json. Each graph is captured the
way PyTorch documents whole-network capture: three eager steps on a side stream, gradients set to
None, then one step (forward, loss, backward) captured; a replay recomputes the gradients into the
same tensors. bayes_ext draws its seed from torch's CUDA generator inside a capture (fresh noise on
every replay); the note checks it: the loss of two replays must differ for the Bayesian models
(their outputs are sampled) and not for nn.Linear (the loss, not a gradient: attention's backward
may add in a different order from one replay to the next).
"""
import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_layers  # noqa: E402  (the benchmark's transformer configs and cases; first: see its env handling)
import cases  # noqa: E402
import timing  # noqa: E402
import workload  # noqa: E402


class GraphedStep:
    """One workload's training step captured in a CUDA graph; run(n) replays it n times (the
    timing.LocalRunner interface)."""

    def __init__(self, spec):
        self.w = w = workload.Workload(spec)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                w.train_step()
        torch.cuda.current_stream().wait_stream(side)
        w.model.zero_grad(set_to_none=True)  # the captured backward allocates them in the graph's pool
        w.x.grad = None
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            loss = w.loss(cache_enabled=False)
            loss.backward()
        self.loss = loss  # the graph's static output: rewritten by every replay

    def noise_per_replay(self):
        """Whether the loss changes from one replay to the next (fresh noise)."""
        self.graph.replay()
        first = self.loss.clone()
        self.graph.replay()
        torch.cuda.synchronize()
        return not torch.equal(first, self.loss)

    def run(self, n):
        times = []
        for _ in range(n):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            self.graph.replay()
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        return times

    def close(self):
        self.graph = self.loss = self.w = None


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--amp", choices=["bf16", "fp32"], default="bf16")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "tmp"))
    p.add_argument("--tiny", action="store_true", help="a 2-block d64 model (a quick check of the script)")
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("graphed_step.py needs a CUDA device")
    cfg = bench_layers.PLANS["quick"]["tf"] if args.tiny else bench_layers.TF_GPT2
    # BLiTZ's prior is a torch.distributions.Normal, whose argument validation reads a CUDA bool on
    # the host (a sync, which a capture forbids); off for every row here, eager ones included
    torch.distributions.Distribution.set_default_validate_args(False)
    names = [n for n in bench_layers.TF_CASES if cases.availability(n)[0]]
    runners, notes = {}, {}
    for n in names:
        spec = dict(kind="transformer", case=n, shape=cfg, sample_nbr=1, device="cuda", amp=args.amp)
        runners[(n, "eager")] = timing.LocalRunner(spec, "train")
        try:
            runners[(n, "graphed")] = GraphedStep(spec)
        except Exception as e:  # reported; the other rows go on
            notes[(n, "graphed")] = "capture failed: " + str(e).strip().splitlines()[-1][:200]
    for key, r in runners.items():
        if key[1] == "graphed":
            notes[key] = "fresh noise per replay" if r.noise_per_replay() else "the same loss every replay"
        else:
            r.run(2)  # warm-up (the graphed ones were warmed up before capture)
    times, failed = timing.round_robin(runners, 1, 1.5, 5, 40, 6.0)
    rows = []
    for n in names:
        for mode in ("eager", "graphed"):
            s = timing.summarize(times.get((n, mode), []))
            rows.append(dict(case=n, label=cases.CASES[n].label, mode=mode, note=notes.get((n, mode), ""),
                             error=failed.get((n, mode)), **(s or {})))
    for r in runners.values():
        r.close()
    floor = {r["mode"]: r["median_ms"] for r in rows if r["case"] == "linear" and "median_ms" in r}
    print(f"\n{cfg['n_blocks']} blocks, d_model {cfg['d_model']}, batch {cfg['batch']} x {cfg['tokens']} tokens, "
          f"{args.amp}, {torch.cuda.get_device_name()}")
    print("| layers | step | train ms | x nn.Linear (same step) | note |\n|---|---|---|---|---|")
    for r in rows:
        ms = r.get("median_ms")
        ratio = f"{ms / floor[r['mode']]:.2f}x" if ms and floor.get(r["mode"]) else ""
        print(f"| {r['label']} | {r['mode']} | {'' if ms is None else f'{ms:.1f}'} | {ratio} | "
              f"{r['note']}{' ' + r['error'] if r['error'] else ''} |")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"graphed_step_{args.amp}.json")
    with open(path, "w") as f:
        json.dump(dict(config=cfg, amp=args.amp, device=torch.cuda.get_device_name(), torch=torch.__version__,
                       rows=rows), f, indent=1)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
