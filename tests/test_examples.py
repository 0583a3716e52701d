"""Smoke tests of the examples: a few training steps each, outputs and finite metrics."""
import importlib.util
import math
import os
import subprocess
import sys

import pytest

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")
pytest.importorskip("tqdm")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_example(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", os.path.join(ROOT, "examples", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def finite(results):
    for key, value in results.items():
        if isinstance(value, float):
            assert math.isfinite(value), (key, value)


def test_bayesian_regression_example(tmp_path):
    example = load_example("bayesian_regression")
    regressor, (coverage, upper, lower) = example.main(epochs=1, verbose=False, out=str(tmp_path))
    for value in (coverage, upper, lower):
        assert 0 <= float(value) <= 1
    assert (tmp_path / "bayesian_regression.png").stat().st_size > 0


def test_digits_example(tmp_path):
    example = load_example("digits_classification")
    results = example.main(epochs=1, steps=5, samples=3, out=str(tmp_path), verbose=False)
    assert results["steps"] == 5
    assert os.path.getsize(results["figure"]) > 0 and results["figure"].startswith(str(tmp_path))
    finite(results)
    assert 0 <= results["accuracy"] <= 1 and 0 <= results["ece"] <= 1
    assert results["nll"] >= 0 and 0 <= results["brier"] <= 2
    for name in ("clean", "noise", "shuffle"):
        assert 0 <= results[f"entropy_{name}"] <= math.log(10) + 1e-5


def test_digits_example_uncertainty_on_corrupted(tmp_path):
    example = load_example("digits_classification")
    results = example.main(epochs=10, samples=10, out=str(tmp_path), verbose=False)
    assert results["accuracy"] > 0.85
    assert results["entropy_noise"] > results["entropy_clean"]
    assert results["entropy_shuffle"] > results["entropy_clean"]
    assert results["mutual_information_shuffle"] > results["mutual_information_clean"]


def test_lstm_example(tmp_path):
    example = load_example("lstm_timeseries")
    results = example.main(epochs=1, steps=3, samples=3, n=200, out=str(tmp_path), verbose=False)
    assert results["steps"] == 3
    assert os.path.getsize(results["figure"]) > 0
    finite(results)
    assert 0 <= results["coverage_epistemic"] <= results["coverage_predictive"] <= 1


def test_examples_run_as_scripts_with_help():
    for name in ("digits_classification", "lstm_timeseries"):
        out = subprocess.run([sys.executable, os.path.join(ROOT, "examples", f"{name}.py"), "--help"],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert "--epochs" in out.stdout and "--out" in out.stdout
