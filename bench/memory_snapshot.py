"""What is alive at the peak of one CUDA training step (issue 8: peak memory at sample_nbr > 1).

    python bench/memory_snapshot.py [--shape 4096 4096 4096] [--sample-nbr 3] [--amp bf16]
                                    [--cases linear,bayes_ext]

For each case (bench/cases.py names) the step of bench/workload.py (zero_grad, sample_nbr forwards
with summed losses, one backward) runs once to warm up, then once under
torch.cuda.memory._record_memory_history. The allocator's trace is replayed (an allocation counts
from its "alloc" until its "free_requested", as torch.cuda.max_memory_allocated counts it) to find
the moment of the most allocated bytes; the blocks alive then are printed largest first with the
frame that allocated them (the innermost one in bayes_ext/ or bench/, else the innermost), and the
peak above model + input as bench/memory.py reports it. The default is the case the H200 run of
2026-11-27 morning left 32 MB over its target (4096^3, bf16, sample_nbr 3: 576 MB against
nn.Linear's 480; 512 MB after the weight-and-bias calls of that afternoon).
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.append(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # an in-place build

FREES = ("free_requested", "free")  # "free": the action's name before free_requested / free_completed
OWN_CODE = (os.sep + "bayes_ext" + os.sep, os.sep + "bench" + os.sep)


def where(frames) -> str:
    """file:line:function of the innermost frame in bayes_ext/ or bench/, else of the innermost."""
    if not frames:
        return "(no Python frame: allocated in C++ outside any recorded call)"
    own = [f for f in frames if any(part in f["filename"] for part in OWN_CODE)]
    f = (own or frames)[0]
    return f"{os.path.relpath(f['filename']) if os.sep in f['filename'] else f['filename']}:{f['line']}:{f['name']}"


def peak_blocks(trace):
    """(peak bytes, [(size, frames)] alive at the peak, largest first) of one device's trace entries.
    Blocks allocated before recording started and freed during it are not in the trace's "alloc"s:
    their frees are ignored, so the figure counts what the recorded stretch allocated."""
    live, total, peak, at_peak = {}, 0, 0, {}
    for entry in trace:
        action, addr = entry["action"], entry.get("addr")
        if action == "alloc":
            live[addr] = (entry["size"], entry.get("frames", []))
            total += entry["size"]
            if total > peak:
                peak, at_peak = total, dict(live)
        elif action in FREES and addr in live:
            total -= live.pop(addr)[0]
    return peak, sorted(at_peak.values(), key=lambda block: -block[0])


def report(case, spec, limit_mb: float = 1.0) -> str:
    import workload
    w = workload.build(dict(spec, case=case))
    w.train_step()  # warm-up: cuBLAS workspaces, autocast's first casts, lazy state
    w.sync()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    torch.cuda.memory._record_memory_history(max_entries=200_000, context="all", stacks="python")
    try:
        w.train_step()
        w.sync()
        snapshot = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    peak_allocated = torch.cuda.max_memory_allocated() - base
    device = torch.cuda.current_device()
    peak, blocks = peak_blocks(snapshot["device_traces"][device])
    mb = 2.0 ** 20
    lines = [f"### {case}: peak {peak_allocated / mb:.1f} MB above model + input (max_memory_allocated); "
             f"the trace's peak {peak / mb:.1f} MB in {len(blocks)} blocks",
             "", "| MB | allocated at |", "|---|---|"]
    small = 0
    for size, frames in blocks:
        if size / mb < limit_mb:
            small += size
            continue
        lines.append(f"| {size / mb:.1f} | {where(frames)} |")
    lines.append(f"| {small / mb:.1f} | (blocks under {limit_mb:g} MB together) |")
    del w
    torch.cuda.empty_cache()
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", type=int, nargs=3, default=[4096, 4096, 4096], metavar=("B", "I", "O"))
    ap.add_argument("--sample-nbr", type=int, default=3)
    ap.add_argument("--amp", choices=("fp32", "bf16"), default="bf16")
    ap.add_argument("--cases", default="linear,bayes_ext")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("memory_snapshot.py needs a CUDA device")
    spec = {"kind": "layer", "shape": args.shape, "sample_nbr": args.sample_nbr, "device": "cuda", "amp": args.amp}
    print(f"## Alive at the peak of one training step: {'x'.join(map(str, args.shape))}, {args.amp}, "
          f"sample_nbr {args.sample_nbr}, {torch.cuda.get_device_name()}, torch {torch.__version__}\n")
    for case in args.cases.split(","):
        print(report(case, spec))


if __name__ == "__main__":
    main()
