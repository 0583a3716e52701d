import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # tests/helpers.py, any import mode

import bayes_ext  # noqa: E402
from bayes_ext import _backend  # noqa: E402

BACKENDS = ["compiled", "python"]


def _skip_without_extension():
    if not bayes_ext.extension_available():
        pytest.skip(f"compiled extension not available: {bayes_ext.extension_load_error()}")


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Runs the test once per backend, with that backend active for every bayes_ext op and layer."""
    if request.param == "compiled":
        _skip_without_extension()
    with bayes_ext.use_backend(request.param):
        yield request.param


@pytest.fixture
def ops(backend):
    """The op namespace of the active backend (torch.ops.bayes_ext or torch.ops.bayes_ext_py)."""
    return _backend.ops()


@pytest.fixture
def compiled():
    """Tests that need the compiled extension (compiled-only ops, compiled vs fallback parity)."""
    _skip_without_extension()
    return torch.ops.bayes_ext


@pytest.fixture(autouse=True)
def _deterministic():
    """Every test starts from the same RNG state, on one intra-op thread, and leaves the thread
    count as it found it.

    One thread: results do not depend on it (test_philox.py::test_stream_independent_of_thread_count
    checks 1, 2 and 3 threads explicitly), and on a loaded CI machine every tiny parallel region of
    the pure-PyTorch backend can otherwise cost a scheduler quantum (measured: 60x slower).
    """
    threads = torch.get_num_threads()
    torch.manual_seed(0)
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def two_threads():
    """Two intra-op threads for one test (where the ops run pieces side by side: side_by_side.h);
    _deterministic restores the count."""
    torch.set_num_threads(2)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="CUDA is not available")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)
