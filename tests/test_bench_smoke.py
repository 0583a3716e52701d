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


def test_overhead_script_reports_both_layers():
    run = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "overhead.py"), "--steps", "50"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    lines = run.stdout.strip().splitlines()
    assert [line.split()[0] for line in lines] == ["nn.Linear", "BayesianLinear"]
    for line in lines:
        train_us, infer_us = float(line.split()[3]), float(line.split()[7])
        assert train_us > 0 and infer_us > 0
