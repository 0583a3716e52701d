"""The README's main job must not rot: bench/bench_layers.py --quick runs end to end (without the
optional reference packages, matplotlib or tqdm if they are missing) and writes rows for every
bayes_ext case of every section, each with a positive train time."""
import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quick_benchmark_runs_and_reports_every_bayes_ext_case(tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("BAYES_EXT_FORCE_PYTHON", None)
    run = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "bench_layers.py"), "--quick", "--out",
                          str(tmp_path), "--tag", "smoke"], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    (js,) = tmp_path.glob("*smoke_quick.json")  # the device is prefixed to the tag
    report = json.loads(js.read_text())
    assert js.with_suffix(".md").exists()
    rows = report["rows"]
    present = {(r["section"], r["case"]) for r in rows if r.get("ok", True)}
    expected = {("layer", "linear"), ("layer", "bayes_ext"), ("layer", "bayes_ext_py"), ("layer", "bayes_ext_lrt"),
                ("layer", "bayes_ext_flipout"), ("transformer", "bayes_ext"), ("other", "nn"),
                ("other", "bayes_ext"), ("other", "bayes_ext_cf"), ("elbo", "loop"), ("elbo", "vectorised")}
    assert expected <= present, expected - present
    for r in rows:
        if (r["section"], r["case"]) in expected:
            assert r["train"]["median_ms"] > 0, r


def test_overhead_script_reports_every_call():
    run = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "overhead.py"), "--steps", "50"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    table = [line for line in run.stdout.splitlines() if line.startswith("| ") and not line.startswith("| call")]
    labels = [line.split("|")[1].strip() for line in table]
    assert labels[:4] == ["nn.Linear train step", "BayesianLinear train step", "nn.Linear no-grad forward",
                          "BayesianLinear no-grad forward"], labels
    assert len(labels) == 8, labels
    assert all(float(line.split("|")[2]) > 0 for line in table), table


class _CountingRunner:
    """A runner whose steps take `step_s` (as reported) and that records every call."""

    def __init__(self, name, step_s, log):
        self.name, self.step_s, self.log = name, step_s, log

    def run(self, n):
        self.log.extend([self.name] * n)
        return [self.step_s] * n


def test_round_robin_rewarms_short_steps_after_another_case():
    """A case whose step is shorter than the threshold runs an untimed step of its own before every
    timed one (the first step after another case runs on that case's caches); long steps do not."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        import timing
    finally:
        sys.path.pop(0)
    log = []
    runners = {"fast": _CountingRunner("fast", 0.001, log), "slow": _CountingRunner("slow", 1.0, log)}
    times, failed = timing.round_robin(runners, warmup=1, budget_s=0.004, min_reps=3, max_reps=3,
                                       rewarm_below_s=0.01)
    assert not failed and len(times["fast"]) == 3 and len(times["slow"]) == 3
    timed_part = log[2:]  # after one warm-up step each
    assert timed_part.count("fast") == 6 and timed_part.count("slow") == 3  # 3 untimed + 3 timed
    for i, name in enumerate(timed_part):  # every fast step that follows another case is untimed
        if name == "fast" and (i == 0 or timed_part[i - 1] != "fast"):
            assert timed_part[i + 1] == "fast"
