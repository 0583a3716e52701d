"""Benchmark bayes_ext's BayesianLinear against nn.Linear and the reference Bayesian layers.

    python bench/bench_layers.py [--quick | --full] [--device cpu|cuda] [--out bench/results]

Times a training step and a no_grad forward per layer and shape, interleaved round-robin with
nn.Linear so each case is reported as a ratio to it; measures saved-for-backward and peak memory
of a training step in a fresh process per case; times the fused sampling op alone; and the same for
a small transformer built from each kind of linear layer. Writes <out>/<device>_<machine>.json,
.md and .png. See bench/README.md for what each column means.
"""
import argparse
import gc
import os
import sys
import time

# Must go before bayes_ext is first imported anywhere in this process: the compiled rows are timed
# here, the fallback rows in a worker that sets it (cases.CASES["bayes_ext_py"].env).
_FORCED = os.environ.pop("BAYES_EXT_FORCE_PYTHON", None)

import torch  # noqa: E402
try:
    from tqdm import tqdm
except ImportError:  # e.g. an offline GPU machine: plain lines instead of a bar
    from report import PlainBar as tqdm

import cases  # noqa: E402
import elbo_cases  # noqa: E402
import layer_cases  # noqa: E402
import memory  # noqa: E402
import opbench  # noqa: E402
import report  # noqa: E402
import timing  # noqa: E402
import workers  # noqa: E402

ALL = list(cases.CASES)
MULTI = ["linear", "bayes_ext", "bayes_ext_py", "blitz"]  # cases also run with sample_nbr=3
TF_CASES = ["linear", "bayes_ext", "blitz"]
TF_FULL = dict(n_blocks=4, d_model=512, n_heads=8, d_mlp=2048, batch=8, tokens=128)
TF_GPT2 = dict(n_blocks=12, d_model=768, n_heads=12, d_mlp=3072, batch=8, tokens=1024)  # issue 8: GPT-2 small

# Per mode: shapes, which cases run at sample_nbr 3, timing effort, where memory is measured.
# The default fits 5 minutes on 2 cores: BLiTZ at 16x4096x4096 takes 1.3-3 s a step (4-9 s at
# S=3) and a slow fallback can take 20 s, so each case gets budget_s of repeats (at least min_reps)
# but at most cap_s (at least one); fast cases get up to max_reps.
PLANS = {
    "quick": dict(shapes=[(8, 64, 64), (32, 256, 128)], s3_cases=MULTI, warmup=1, budget_s=0.02,
                  min_reps=2, max_reps=2, cap_s=60.0, mem_shapes=[(8, 64, 64)], mem_s3=False,
                  tf=dict(n_blocks=2, d_model=64, n_heads=4, d_mlp=128, batch=2, tokens=16),
                  tf_cases=TF_CASES, ops=[(256, 256)], op_reps=3,
                  other=dict(warmup=1, budget_s=0.02, min_reps=2, max_reps=2, cap_s=60.0)),
    "default": dict(shapes=[(64, 1024, 1024), (1024, 1024, 1024), (16, 4096, 4096)], s3_cases=MULTI,
                    warmup=2, budget_s=1.5, min_reps=3, max_reps=25, cap_s=12.0, mem_shapes="all",
                    mem_s3=True,
                    tf=TF_FULL, tf_cases=TF_CASES, ops=[(4096, 4096), (1024, 1024)], op_reps=10,
                    other=dict(warmup=2, budget_s=1.0, min_reps=3, max_reps=25, cap_s=3.0)),
    "full": dict(shapes=[(64, 1024, 1024), (1024, 1024, 1024), (256, 2048, 2048), (16, 4096, 4096)],
                 s3_cases=ALL, warmup=3, budget_s=8.0, min_reps=7, max_reps=100, cap_s=120.0,
                 mem_shapes="all",
                 mem_s3=True, tf=TF_FULL, tf_cases=TF_CASES + ["bayes_ext_py"],
                 ops=[(4096, 4096), (1024, 1024)], op_reps=30,
                 other=dict(warmup=3, budget_s=4.0, min_reps=7, max_reps=100, cap_s=30.0)),
    # --device cuda without --quick/--full (issue 8's shapes and model): steps take milliseconds, so
    # a short budget still gives dozens of repeats; the whole run fits bench/gpu_check.sh's 4 minutes.
    "gpu": dict(shapes=[(64, 4096, 4096), (4096, 4096, 4096)], s3_cases=MULTI, warmup=3, budget_s=0.4,
                min_reps=5, max_reps=40, cap_s=4.0, mem_shapes="all", mem_s3=True,
                tf=TF_GPT2, tf_cases=TF_CASES, ops=[(8192, 8192), (4096, 4096)], op_reps=20,
                other=dict(warmup=3, budget_s=0.3, min_reps=5, max_reps=40, cap_s=3.0)),
}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="smoke test: tiny shapes, 2 repeats (CI)")
    g.add_argument("--full", action="store_true", help="more shapes and repeats (~30+ min on 2 cores)")
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--out", default=None, help="output folder (default bench/results, "
                                               "bench/results/tmp for --quick)")
    p.add_argument("--tag", default=None, help="machine tag in the file names (default: CPU/GPU model)")
    p.add_argument("--cases", default=None, help="comma-separated subset of: " + ",".join(ALL))
    return p.parse_args()


class Bench:
    def __init__(self, args, plan, avail, mode):
        self.args, self.plan, self.avail, self.mode = args, plan, avail, mode
        self.other_avail = {n: layer_cases.availability(n) for n in layer_cases.VARIANTS}
        self.rows, self.notes = [], []
        self._worker = None
        self.bar = None
        self._where, self._last = "", 0.0

    # -- processes -------------------------------------------------------------------------
    def worker(self):
        """The persistent BAYES_EXT_FORCE_PYTHON=1 worker, started on first use."""
        if self._worker is None:
            self._worker = workers.Worker(cases.CASES["bayes_ext_py"].env)
            info = self._worker.call("info")
            if info["extension_available"]:
                self.notes.append("BAYES_EXT_FORCE_PYTHON=1 did not switch bayes_ext to its fallback: "
                                  "the 'python fallback' rows ran the compiled kernels")
        return self._worker

    def memory(self, name, spec):
        """CPU: peak RSS needs a fresh address space, so a forked child per case. CUDA: the caching
        allocator's max_memory_allocated is exact in-process (one CUDA init instead of dozens)."""
        if self.args.device == "cpu":
            return workers.call_in_child("memory:measure", spec, env=cases.CASES[name].env, timeout=900)
        if cases.CASES[name].own_process:
            return self.worker().call("memory", spec)
        return memory.measure(spec)

    def runner(self, name, spec, mode):
        if cases.CASES[name].own_process:
            return timing.RemoteRunner(self.worker(), spec, mode)
        return timing.LocalRunner(spec, mode)

    # -- one group: same shape / sample_nbr / precision, all its cases ----------------------
    def group(self, section, shape, shape_str, s, amp, names, modes, mem):
        rows = {}
        for n in names:
            c = cases.CASES[n]
            ok, note = self.avail[n]
            rows[n] = dict(section=section, shape=shape_str, sample_nbr=s, amp=amp, case=n,
                           label=c.label, kl=c.kl, note=note, ok=ok)
        live = [n for n in names if rows[n]["ok"]]
        base = dict(kind=section, shape=shape, sample_nbr=s, device=self.args.device, amp=amp)
        for mode in modes:
            runners = {}
            for n in live:
                try:
                    runners[n] = self.runner(n, dict(base, case=n), mode)
                except Exception as e:
                    rows[n]["note"] = "failed to build: " + str(e).strip().splitlines()[-1][:150]
            self._where = f"{shape_str} S={s} {amp} {mode}"
            if self.args.device == "cuda":
                # One untimed step first: a case's first CUDA step carries seconds of one-time costs
                # (a worker's CUDA context, cuBLAS handles, module loading) that round_robin would
                # otherwise keep as the case's only repeat (a warm-up over 2 s counts as one).
                for n in list(runners):
                    try:
                        runners[n].run(1)
                    except Exception:  # round_robin's warm-up reports the error
                        pass
            p = self.plan
            times, failed = timing.round_robin(runners, p["warmup"], p["budget_s"], p["min_reps"],
                                               p["max_reps"], p["cap_s"], tick=self._tick)
            for n, r in runners.items():
                r.close()
                rows[n][mode] = timing.summarize(times[n])
                if n in failed:
                    rows[n]["note"] = f"{mode} failed: {failed[n]}"
            runners = None
            gc.collect()
            self.bar.update(1)
        if mem:
            for n in live:
                self._status(f"{shape_str} S={s} {amp} memory: {cases.CASES[n].label}")
                try:
                    rows[n]["memory"] = self.memory(n, dict(base, case=n))
                except Exception as e:
                    rows[n]["note"] = "memory failed: " + str(e).strip().splitlines()[-1][:150]
                self.bar.update(1)
        out = list(rows.values())
        report.add_ratios(out)
        for r in out:
            if "train" in r.get("ratio", {}) and r["case"] != "linear":
                tqdm.write(f"  {shape_str:>16} S={s} {amp} {r['label']:<34} train "
                           f"{r['train']['median_ms']:9.1f} ms  {r['ratio']['train']['median']:6.2f}x Linear")
        self.rows += out

    # -- "Other layers": conv / LSTM / GRU / embedding against their torch.nn layer -----------
    def other_variants(self, names):
        """nn always (the floor); the bayes_ext rows unless --cases leaves bayes_ext out; BLiTZ likewise."""
        keep = {"nn": True, "bayes_ext": "bayes_ext" in self.args.only,
                "bayes_ext_cf": "bayes_ext" in self.args.only, "blitz": "blitz" in self.args.only}
        return [n for n in names if keep[n]]

    def other_plan(self):
        plan = layer_cases.layer_plan(self.mode)
        return [(t, cfg, self.other_variants(names)) for t, cfg, names in plan
                if len(self.other_variants(names)) > 1]

    def other_group(self, title, cfg, names, amp):
        shape_str = layer_cases.shape_str(cfg)
        target_case, target = layer_cases.TARGETS[cfg["layer"]]
        rows = {}
        for n in names:
            ok, note = self.other_avail[n]
            rows[n] = dict(section="other", layer=title, shape=shape_str, sample_nbr=1, amp=amp,
                           case=n, label=layer_cases.label(n, cfg), kl=layer_cases.VARIANTS[n].kl,
                           note=note, ok=ok, target=target if n == target_case else None)
        base = dict(kind="other", shape=cfg, sample_nbr=1, device=self.args.device, amp=amp)
        runners = {}
        for n in names:
            if not rows[n]["ok"]:
                continue
            try:
                runners[n] = timing.LocalRunner(dict(base, case=n), "train")
            except Exception as e:
                rows[n]["note"] = "failed to build: " + str(e).strip().splitlines()[-1][:150]
        self._where = f"{title} {amp} train"
        # One untimed first step per case before round_robin's warm-up: these layers' first step
        # carries one-time costs (first-touch page faults of a 100k-row table's gradients, RNN
        # weight setup) of up to 10x a steady step, which round_robin would otherwise keep as the
        # only repeat (a warm-up over 2 s counts) or use to size the repeats.
        for n in list(runners):
            try:
                self._tick_other(n, "first step")
                runners[n].run(1)
            except Exception:  # round_robin's warm-up reports the error
                pass
        o = self.plan["other"]
        times, failed = timing.round_robin(runners, o["warmup"], o["budget_s"], o["min_reps"],
                                           o["max_reps"], o["cap_s"], tick=self._tick_other)
        for n, r in runners.items():
            r.close()
            rows[n]["train"] = timing.summarize(times[n])
            if n in failed:
                rows[n]["note"] = f"train failed: {failed[n]}"
        runners = None
        gc.collect()
        self.bar.update(1)
        out = list(rows.values())
        report.add_ratios(out)
        for r in out:
            if "train" in r.get("ratio", {}) and r["case"] != "nn":
                tqdm.write(f"  {title:>16} {amp} {r['label']:<34} train "
                           f"{r['train']['median_ms']:9.1f} ms  {r['ratio']['train']['median']:6.2f}x nn")
        self.rows += out

    # -- "Multi-sample ELBO": sample_elbo vectorised vs its loop (issue 5) ---------------------
    def elbo_plan(self):
        return elbo_cases.plan(self.mode) if self.avail["bayes_ext"][0] and "bayes_ext" in self.args.only else []

    def elbo_group(self, cfg, sample_nbr, amp):
        """Both rows timed round-robin with the "other layers" effort; speedup = loop / vectorised."""
        shape_str = elbo_cases.shape_str(cfg)
        base = dict(kind="elbo", shape=cfg, sample_nbr=sample_nbr, device=self.args.device, amp=amp)
        rows, runners = {}, {}
        for n, label in elbo_cases.LABELS.items():
            rows[n] = dict(section="elbo", shape=shape_str, sample_nbr=sample_nbr, amp=amp, case=n, label=label,
                           threads=torch.get_num_threads(), note="", target=elbo_cases.target(cfg, n, sample_nbr))
            try:
                runners[n] = timing.LocalRunner(dict(base, case=n), "train")
            except Exception as e:
                rows[n]["note"] = "failed to build: " + str(e).strip().splitlines()[-1][:150]
        self._where = f"ELBO S={sample_nbr} {amp} train"
        o = self.plan["other"]
        times, failed = timing.round_robin(runners, o["warmup"], o["budget_s"], o["min_reps"], o["max_reps"],
                                           o["cap_s"], tick=lambda k, what: self._status(
                                               f"{self._where}: {elbo_cases.LABELS[k]} {what}", force=False))
        for n, r in runners.items():
            r.close()
            rows[n]["train"] = timing.summarize(times[n])
            if n in failed:
                rows[n]["note"] = f"train failed: {failed[n]}"
        gc.collect()
        self.bar.update(1)
        out = elbo_cases.add_speedup(list(rows.values()))
        for r in out:
            if r.get("speedup") and r["case"] != "loop":
                tqdm.write(f"  ELBO S={sample_nbr} {amp} {r['label']:<34} train {r['train']['median_ms']:9.2f} ms  "
                           f"{r['speedup']:6.2f}x faster than the loop")
        self.rows += out

    def _tick_other(self, key, what):
        self._status(f"{self._where}: {layer_cases.VARIANTS[key].label} {what}", force=False)

    def _status(self, text, force=True):
        # Throttled: slow cases show their repeat count, fast ones do not flood a log file.
        now = time.time()
        if force or now - self._last > 0.5:
            self._last = now
            self.bar.set_postfix_str(text[:80])

    def _tick(self, key, what):
        self._status(f"{self._where}: {cases.CASES[key].label} {what}", force=False)

    # -- the plan ---------------------------------------------------------------------------
    def units(self, amps):
        p, n = self.plan, 0
        for _ in amps:
            for shape in p["shapes"]:
                for s in (1, 3):
                    names = self.layer_cases(s)
                    n += 2 if s == 1 else 1
                    if self.mem_here(shape, s):
                        n += sum(self.avail[c][0] for c in names)
            n += 2 + sum(self.avail[c][0] for c in self.tf_cases())
            n += len(self.other_plan()) + (len(self.elbo_plan()) if _ == "fp32" else 0)
        return n + 1

    def layer_cases(self, s):
        names = ALL if s == 1 else [c for c in ALL if c in self.plan["s3_cases"]]
        return [c for c in names if c in self.args.only]

    def tf_cases(self):
        return [c for c in self.plan["tf_cases"] if c in self.args.only]

    def mem_here(self, shape, s):
        p = self.plan
        return (p["mem_shapes"] == "all" or tuple(shape) in p["mem_shapes"]) and (s == 1 or p["mem_s3"])

    def run(self, amps):
        p = self.plan
        self.bar = tqdm(total=self.units(amps), unit="step", dynamic_ncols=True, file=sys.stderr)
        try:
            for amp in amps:
                for shape in p["shapes"]:
                    for s in (1, 3):
                        modes = ["train", "infer"] if s == 1 else ["train"]
                        self.group("layer", list(shape), "x".join(map(str, shape)), s, amp,
                                   self.layer_cases(s), modes, self.mem_here(shape, s))
                tf = p["tf"]
                tf_str = f"{tf['batch']}x{tf['tokens']} d{tf['d_model']} L{tf['n_blocks']}"
                self.group("transformer", tf, tf_str, 1, amp, self.tf_cases(), ["train", "infer"], True)
                t_other = time.time()
                for title, cfg, names in self.other_plan():
                    self.other_group(title, cfg, names, amp)
                if self.other_plan():
                    self.notes.append(f"other layers ({amp}): {time.time() - t_other:.1f} s")
                if amp == "fp32":
                    for cfg, sample_nbr in self.elbo_plan():
                        self.elbo_group(cfg, sample_nbr, amp)
            self._status("sampling op")
            have_ext = self.avail["bayes_ext"][0]
            try:
                ops = opbench.run(p["ops"], self.args.device, p["warmup"], p["op_reps"], have_ext)
            except Exception as e:  # e.g. an op whose schema changed: keep the layer results
                ops = {}
                self.notes.append("sampling op benchmark failed: " + str(e).strip().splitlines()[-1][:200])
            if not have_ext:
                self.notes.append("sampling op rows skipped: bayes_ext extension not available")
            self.bar.update(1)
            return ops
        finally:
            self.bar.close()
            if self._worker:
                self._worker.close()


def main():
    args = parse_args()
    mode = "quick" if args.quick else "full" if args.full else "default"
    plan = PLANS["gpu" if mode == "default" and args.device == "cuda" else mode]
    # nn.Linear always runs: every ratio divides by it.
    args.only = (set(args.cases.split(",")) | {"linear"}) if args.cases else set(ALL)
    unknown = args.only - set(ALL)
    if unknown:
        sys.exit(f"--cases: unknown {sorted(unknown)}; choose from {ALL}")
    if args.device == "cuda" and not torch.cuda.is_available():
        sys.exit("--device cuda: torch.cuda.is_available() is False")
    torch.manual_seed(0)
    t0 = time.time()

    load0 = os.getloadavg()[0]
    avail = {n: cases.availability(n, args.device) for n in ALL}
    info = report.machine_info(args.device)
    amps = ["fp32", "bf16"] if args.device == "cuda" else ["fp32"]
    bench = Bench(args, plan, avail, mode)
    if load0 > 0.5:
        # On 2 cores any other busy process stalls torch's OpenMP barriers: 2-threaded steps can
        # take 10x longer. Ratios are interleaved, but the absolute numbers are then suspect.
        bench.notes.append(f"machine not idle at start (1-min load average {load0:.2f}): timings are noisy")
    if _FORCED:
        bench.notes.append(f"BAYES_EXT_FORCE_PYTHON={_FORCED} was set and ignored for the compiled rows")
    ops = bench.run(amps)

    config = dict(mode=mode, device=args.device, amps=amps, warmup=plan["warmup"],
                  budget_s=plan["budget_s"], min_reps=plan["min_reps"], max_reps=plan["max_reps"],
                  cap_s=plan["cap_s"], other_timing=plan["other"],
                  wall_s=round(time.time() - t0, 1), load_avg_start=load0,
                  load_avg_end=os.getloadavg()[0])
    bench.notes.append(f"total wall time {config['wall_s']} s")
    tf = plan["tf"]
    result = dict(machine=info, config=config, rows=bench.rows, ops=ops, notes=bench.notes,
                  transformer_desc=(f"{tf['n_blocks']} pre-norm blocks, d_model {tf['d_model']}, "
                                    f"{tf['n_heads']} heads, MLP {tf['d_mlp']}, batch {tf['batch']} x "
                                    f"{tf['tokens']} tokens; every linear layer from the case."))
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   "tmp" if mode == "quick" else "")
    stem = f"{args.device}_{args.tag or report.machine_tag(info)}"
    stem += "" if mode == "default" else f"_{mode}"
    js, md_path, png, md = report.write(result, out, stem)
    print(md)
    print(f"wrote {js}\n      {md_path}\n      {png or '(no chart: matplotlib not installed)'}")


if __name__ == "__main__":
    main()
