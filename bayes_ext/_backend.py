"""Which implementation runs the ops: the compiled kernels (bayes_ext._C) or pure PyTorch.

The compiled library registers the ``bayes_ext::`` ops; the pure-PyTorch kernels are registered as
``bayes_ext_py::`` ops with the same schemas (bayes_ext/_ops.py). Layers call ``ops()``, which
returns the namespace of the active backend.

- ``BAYES_EXT_FORCE_PYTHON=1`` (read at import) never loads the compiled library.
- A library built for another torch is not loaded: import warns once and falls back.
- ``set_backend("python" | "compiled")`` and the ``use_backend(...)`` context manager switch at run
  time (tests and benchmarks use them to compare the two on the same seed).
"""
import contextlib
import os
import warnings

import torch

from . import _func_transforms, _functorch_state, _recorded

_FALSEY = ("", "0", "false", "no", "off")
FORCE_PYTHON = os.environ.get("BAYES_EXT_FORCE_PYTHON", "0").strip().lower() not in _FALSEY

_extension_loaded = False
_load_error = None
# The ops csrc/ops.cpp defines (bayes_ext/_ops.py gives each a pure-PyTorch twin).
OP_NAMES = ("sample_weight", "sample_weight_backward", "sample_weight_backward_into", "sample_kl", "sample_weight_samples",
            "sample_weight_samples_backward", "philox_normal", "sample_rows", "sample_rows_backward",
            "sample_rows_backward_add_", "gaussian_kl", "gaussian_kl_backward", "lrt_weight_forward",
            "lrt_weight_backward_", "lrt_output_", "lrt_noise_grad")
# Compiled-only ops (no pure-PyTorch twin: their callers run the same steps in Python otherwise).
COMPILED_ONLY_OP_NAMES = ("linear_samples_stacked", "linear_samples_stacked_backward", "linear_reparam_rows",
                          "linear_reparam_rows_backward", "linear_lrt_rows", "linear_lrt_rows_backward",
                          "linear_flipout_rows", "linear_flipout_rows_backward", "sample_weight_as",
                          "sample_weight_bias_as", "sample_weight_bias_backward_", "conv_reparam_layer",
                          "conv_reparam_layer_backward")


def _same_torch_build(built_for: str) -> bool:
    # "2.13.0+cpu" and "2.13.0" are the same ABI; compare the release and the local tag.
    return built_for.split("+")[0] == torch.__version__.split("+")[0]


def _load_extension() -> None:
    global _extension_loaded, _load_error
    if FORCE_PYTHON:
        _load_error = "BAYES_EXT_FORCE_PYTHON is set"
        return
    try:
        from . import _build_info
    except ImportError:
        _load_error = "bayes_ext was installed without compiled kernels"
        return
    if not _same_torch_build(_build_info.TORCH_VERSION):
        _load_error = (f"the compiled kernels were built for torch {_build_info.TORCH_VERSION} but torch "
                       f"{torch.__version__} is installed; rebuild with `pip install --no-build-isolation .`")
        warnings.warn(f"bayes_ext: {_load_error}. Using the pure-PyTorch backend.", RuntimeWarning, stacklevel=3)
        return
    try:
        from . import _C  # noqa: F401  (loading it registers the ops)
    except (ImportError, OSError) as exc:
        _load_error = f"could not load the compiled kernels: {exc}"
        warnings.warn(f"bayes_ext: {_load_error}. Using the pure-PyTorch backend.", RuntimeWarning, stacklevel=3)
        return
    missing = [name for name in OP_NAMES + COMPILED_ONLY_OP_NAMES if not hasattr(torch.ops.bayes_ext, name)]
    if missing:  # a stale build of an older checkout
        _load_error = (f"the compiled kernels lack the ops {missing} (built from an older version); rebuild with "
                       "`pip install --no-build-isolation .`")
        warnings.warn(f"bayes_ext: {_load_error}. Using the pure-PyTorch backend.", RuntimeWarning, stacklevel=3)
        return
    _extension_loaded = True


_load_extension()
_active = "compiled" if _extension_loaded else "python"


def extension_available() -> bool:
    """True when the compiled C++ (and, if built, CUDA) kernels are loaded."""
    return _extension_loaded


def extension_load_error():
    """Why the compiled kernels are not in use (None when they are loaded)."""
    return _load_error


def get_backend() -> str:
    """The active backend: "compiled" or "python"."""
    return _active


def set_backend(name: str) -> None:
    """Switch every bayes_ext layer to the "compiled" or the "python" kernels."""
    global _active
    if name not in ("compiled", "python"):
        raise ValueError(f"backend must be 'compiled' or 'python', got {name!r}")
    if name == "compiled" and not _extension_loaded:
        raise RuntimeError(f"the compiled backend is not available: {_load_error}")
    _active = name


@contextlib.contextmanager
def use_backend(name: str):
    """Context manager form of set_backend."""
    previous = _active
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def ops():
    """The op namespace of the active backend (torch.ops.bayes_ext or torch.ops.bayes_ext_py); inside a
    torch.func transform, its view that applies the ops' transform-ready autograd (_func_transforms);
    while a recorded backward rebuilds its forward, the differentiable compositions (_recorded).
    (Under torch.compile dynamo traces the transforms itself.)"""
    namespace = torch.ops.bayes_ext if _active == "compiled" else torch.ops.bayes_ext_py
    if _functorch_state.functorch_active():
        namespace = _func_transforms.transform_ops("bayes_ext" if _active == "compiled" else "bayes_ext_py")
    if _recorded.rebuilding():  # a recorded backward (create_graph=True) differentiates plain PyTorch
        return _recorded.differentiable_ops(namespace)
    return namespace
