"""Wall-clock timing of workloads, interleaved round-robin across cases.

Interleaving (case A rep 1, case B rep 1, ..., case A rep 2, ...) makes slow drifts of the machine
(thermal, other tenants) hit every case alike, so ratios to nn.Linear from the same group are
steadier than the absolute times. Slow cases get fewer repeats: each case has a time budget.
"""
import math
import statistics
import time

import workload


class LocalRunner:
    """Times one workload in this process. mode: "train" or "infer"."""

    def __init__(self, spec, mode):
        self.w = workload.build(spec)
        self.step = self.w.train_step if mode == "train" else self.w.infer_step

    def run(self, n):
        times = []
        for _ in range(n):
            self.w.sync()
            t0 = time.perf_counter()
            self.step()
            self.w.sync()
            times.append(time.perf_counter() - t0)
        return times

    def close(self):
        self.w = self.step = None


class RemoteRunner:
    """Same interface, but the workload lives in a workers.Worker (e.g. BAYES_EXT_FORCE_PYTHON=1).
    The child times itself, so pipe latency is not in the numbers; this process waits idle meanwhile."""

    def __init__(self, worker, spec, mode):
        self.worker = worker
        worker.call("setup", spec, mode)

    def run(self, n):
        return self.worker.call("run", n)

    def close(self):
        pass  # the worker drops the workload at the next setup


# Steps shorter than this get one untimed step of the same case before each timed one: the first
# step after another case's runs on caches that case filled (code, Python objects, data), which a
# training loop never does. Measured on the vectorised ELBO (0.75 ms steps): 0.92 ms right after a
# loop step against 0.75 ms after its own, so a plain rotation timed a mix of cold and warm steps.
REWARM_BELOW_S = 0.05


def round_robin(runners, warmup, budget_s, min_reps, max_reps, cap_s=float("inf"), slow_s=2.0,
                tick=None, rewarm_below_s=REWARM_BELOW_S):
    """runners: {key: runner}. Returns ({key: [seconds, ...]}, {key: error}); warm-up excluded.

    Each case gets clamp(budget_s / warm-up time, min_reps, max_reps) repeats, but never more than
    cap_s worth (at least one), so a 20 s step cannot eat the run. A first warm-up step slower than
    slow_s counts as a repeat: its one-time overheads are noise next to the step. In round r only
    the cases that still want a repeat run, in an order rotated by r so no case always goes first;
    a case whose step is shorter than rewarm_below_s runs one untimed step before each timed one
    (both count against its budget)."""
    reps, times, failed, rewarm = {}, {k: [] for k in runners}, {}, {}
    for k, r in runners.items():
        if tick:
            tick(k, "warm-up")
        try:
            w = r.run(1)
            if w[0] > slow_s:
                times[k] = list(w)
            elif warmup > 1 and w[0] < 0.5:  # a second warm-up only where it is cheap
                w = r.run(warmup - 1)
            t = max(min(w), 1e-6)
            rewarm[k] = t < rewarm_below_s
            per_rep = 2 * t if rewarm[k] else t
            n = max(min_reps, min(max_reps, int(budget_s / per_rep)))
            reps[k] = max(1, min(n, int(cap_s / per_rep))) if math.isfinite(cap_s) else n
        except Exception as e:  # a case that crashes is reported, the others go on
            failed[k] = str(e).strip().splitlines()[-1][:200]
    keys = [k for k in runners if k not in failed]
    for rnd in range(max(reps.values(), default=0)):
        order = keys[rnd % len(keys):] + keys[:rnd % len(keys)] if keys else []
        for k in order:
            if k in failed or len(times[k]) >= reps[k]:
                continue
            if tick:
                tick(k, f"rep {len(times[k]) + 1}/{reps[k]}")
            try:
                if rewarm[k]:
                    runners[k].run(1)
                times[k] += runners[k].run(1)
            except Exception as e:
                failed[k] = str(e).strip().splitlines()[-1][:200]
    return times, failed


def summarize(ts):
    """Median, quartiles and extremes of a list of seconds (milliseconds out)."""
    if not ts:
        return None
    ms = sorted(t * 1e3 for t in ts)
    if len(ms) >= 2:
        q1, _, q3 = statistics.quantiles(ms, n=4, method="inclusive")
    else:
        q1 = q3 = ms[0]
    return {"median_ms": statistics.median(ms), "q1_ms": q1, "q3_ms": q3,
            "min_ms": ms[0], "max_ms": ms[-1], "n": len(ms)}
