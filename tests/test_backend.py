"""Backend selection: BAYES_EXT_FORCE_PYTHON, a library built for another torch, set_backend."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import bayes_ext

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_python(code: str, **env_updates) -> subprocess.CompletedProcess:
    env = dict(os.environ, **env_updates)
    env.setdefault("PYTHONPATH", REPO)
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True,
                          timeout=120, cwd=REPO)


def test_force_python_never_loads_the_compiled_library():
    result = run_python("""
        import sys, warnings, torch
        warnings.simplefilter("error")
        import bayes_ext
        from bayes_ext.modules import BayesianLinear
        assert not bayes_ext.extension_available() and bayes_ext.get_backend() == "python"
        assert "bayes_ext._C" not in sys.modules and not hasattr(torch.ops.bayes_ext, "sample_weight")
        torch.manual_seed(0)
        layer = BayesianLinear(3, 2)
        layer(torch.randn(4, 3)).sum().backward()
        assert layer.weight_rho.grad is not None
        print("ok")
    """, BAYES_EXT_FORCE_PYTHON="1")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_library_built_for_another_torch_warns_once_and_falls_back():
    # A stand-in build record claiming another torch, installed before bayes_ext is imported.
    result = run_python("""
        import sys, types, warnings
        fake = types.ModuleType("bayes_ext._build_info")
        fake.TORCH_VERSION, fake.CUDA_VERSION, fake.WITH_CUDA = "1.13.0", None, False
        sys.modules["bayes_ext._build_info"] = fake
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import bayes_ext
            import bayes_ext.modules
        messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
        assert len(messages) == 1 and "1.13.0" in messages[0] and "pure-PyTorch" in messages[0], messages
        assert not bayes_ext.extension_available() and "1.13.0" in bayes_ext.extension_load_error()
        assert "bayes_ext._C" not in sys.modules
        import torch
        layer = bayes_ext.modules.BayesianLinear(3, 2)
        assert layer(torch.randn(4, 3)).shape == (4, 2)
        print("ok")
    """, BAYES_EXT_FORCE_PYTHON="0")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_set_backend_rejects_unknown_names():
    with pytest.raises(ValueError, match="backend"):
        bayes_ext.set_backend("fortran")
    with pytest.raises(ValueError, match="backend"):
        with bayes_ext.use_backend("gpu"):
            pass


def test_use_backend_restores_the_previous_backend():
    before = bayes_ext.get_backend()
    with bayes_ext.use_backend("python"):
        assert bayes_ext.get_backend() == "python"
        assert bayes_ext._backend.ops() is torch.ops.bayes_ext_py
    assert bayes_ext.get_backend() == before


@pytest.mark.skipif(bayes_ext.extension_available(), reason="only meaningful without the compiled kernels")
def test_compiled_backend_unavailable_is_a_clear_error():
    with pytest.raises(RuntimeError, match="compiled backend is not available"):
        bayes_ext.set_backend("compiled")


def test_cuda_calls_have_a_kernel_even_when_the_library_was_built_without_cuda():
    """A library built without the CUDA toolkit, under a torch with CUDA, must not answer CUDA
    calls with "Could not run ... 'CUDA' backend": every op has a CUDA kernel, the compiled one or
    the pure-PyTorch one registered under the bayes_ext:: name. That one warns once (slower, same
    values) and returns the pure-PyTorch op's values (run here on CPU tensors: no GPU in CI)."""
    import warnings
    from bayes_ext import _backend, _ops
    if not bayes_ext.extension_available():
        pytest.skip("the compiled library is not loaded")
    for name in _backend.OP_NAMES:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"bayes_ext::{name}", "CUDA"), name
    # the CUDA layer op's calls: its own CUDA registration, and the composite kernels of
    # sample_weight_as (sample_weight, then a cast) and of the weight-and-bias calls (two calls)
    # where no CUDA kernel was built
    for name in ("linear_reparam_rows", "linear_reparam_rows_backward", "sample_weight_as", "sample_weight_bias_as",
                 "sample_weight_bias_backward_"):
        assert torch._C._dispatch_has_computed_kernel_for_dispatch_key(f"bayes_ext::{name}", "CUDA"), name
    if _ops._cuda_fallback_lib is None:
        pytest.skip("built with CUDA kernels")
    kernel = _ops.cuda_fallback_kernel(_ops._checked_sample_weight)
    mu, rho, seed = torch.randn(5, 3), torch.randn(5, 3) - 2, torch.tensor([4])
    _ops._cuda_fallback_warned[0] = False
    with pytest.warns(RuntimeWarning, match="built without CUDA"):
        got = kernel(mu, rho, seed, 0, 1.0, 0.1, 0.4, 0)
    for a, b in zip(got, torch.ops.bayes_ext_py.sample_weight(mu, rho, seed, 0, 1.0, 0.1, 0.4, 0)):
        assert torch.equal(a, b)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        kernel(mu, rho, seed, 0, 1.0, 0.1, 0.4, 0)
