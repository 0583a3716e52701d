"""The README's main job must not rot: bench/bench_layers.py --quick runs end to end (without the
optional reference packages, matplotlib or tqdm if they are missing) and writes rows for every
bayes_ext case of every section, each with a positive train time."""
import importlib
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
    if _bench_module("onednn_linear").available("cpu")[0]:
        expected.add(("layer", "linear_onednn"))
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
    assert labels[-2:] == ["KL of 48 layers + backward: kl_divergence_from_nn",
                           "KL of 48 layers + backward: BLiTZ's layer-by-layer sum"], labels
    assert len(labels) == 10, labels
    assert all(float(line.split("|")[2]) > 0 for line in table), table


def test_overhead_script_lists_the_operators_of_each_step():
    """--ops: the operators the two training steps issue, side by side; the Bayesian step's sampling
    ops appear on its side only, and the totals row adds the calls up."""
    run = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "overhead.py"), "--steps", "20", "--ops"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = {}
    for line in run.stdout.split("| operator (per step)", 1)[1].splitlines()[2:]:
        if line.startswith("| "):
            cells = [c.strip() for c in line.split("|")[1:-1]]
            rows[cells[0]] = (float(cells[1]), float(cells[3]))
    assert rows["aten::mm"][0] > 0 and rows["aten::mm"][1] > 0
    sampling = [name for name in rows if name.startswith("bayes_ext::")]
    assert sampling and all(rows[n][0] == 0 and rows[n][1] > 0 for n in sampling), rows
    assert rows["all operators"][1] > rows["all operators"][0] > 0


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
    timing = _bench_module("timing")
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


def _bench_module(name):
    """A module of bench/ (the scripts import each other from there), imported without leaving
    bench/ on sys.path."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.pop(0)


def test_memory_snapshot_finds_the_blocks_alive_at_the_peak():
    """bench/memory_snapshot.py's replay of an allocator trace (the CUDA run itself needs a GPU):
    the peak counts from alloc to free_requested, frees of blocks allocated before recording are
    ignored, and the blocks alive at the peak come largest first with their allocating frame."""
    ms = _bench_module("memory_snapshot")
    own = {"filename": os.path.join(ROOT, "bayes_ext", "functional.py"), "line": 7, "name": "f"}
    torch_frame = {"filename": "/site-packages/torch/nn/functional.py", "line": 3, "name": "linear"}
    trace = [
        {"action": "free_requested", "addr": 99, "size": 500},  # allocated before recording
        {"action": "alloc", "addr": 1, "size": 100, "frames": [torch_frame, own]},
        {"action": "alloc", "addr": 2, "size": 300, "frames": [torch_frame]},
        {"action": "free_requested", "addr": 1, "size": 100},
        {"action": "free_completed", "addr": 1, "size": 100},
        {"action": "alloc", "addr": 3, "size": 250, "frames": []},  # peak: 2 and 3, 550 bytes
        {"action": "free_requested", "addr": 2, "size": 300},
        {"action": "alloc", "addr": 4, "size": 260, "frames": [own]},  # 510: below the peak
    ]
    peak, blocks = ms.peak_blocks(trace)
    assert peak == 550
    assert [size for size, _ in blocks] == [300, 250]
    assert ms.where(blocks[0][1]).endswith("functional.py:3:linear")  # only torch's frame: the innermost
    assert ms.where([torch_frame, own]).endswith(os.path.join("bayes_ext", "functional.py") + ":7:f")
    assert "no Python frame" in ms.where([])


def test_the_onednn_reference_linear_is_nn_linear():
    """The benchmark's "nn.Linear, oneDNN GEMMs" row: nn.Linear's values and gradients (to float32
    rounding), batch dimensions included."""
    import pytest
    import torch
    mod = _bench_module("onednn_linear")
    if not mod.available("cpu")[0]:
        pytest.skip("this torch build has no oneDNN linear")
    assert not mod.available("cuda")[0]
    ref = torch.nn.Linear(96, 80)
    layer = mod.OneDnnLinear(96, 80)
    layer.load_state_dict(ref.state_dict())
    x = torch.randn(3, 7, 96, requires_grad=True)
    g = torch.randn(3, 7, 80)
    outs = []
    for m in (layer, ref):
        y = m(x)
        outs.append((y, *torch.autograd.grad((y * g).sum(), [x, m.weight, m.bias])))
    for a, b in zip(*outs):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)

