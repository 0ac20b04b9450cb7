"""Shared fixtures: every backend the machine has, and float64 by default for the reference checks."""

import pytest

import minimoe
from minimoe.backend import BackendUnavailableError, _backend

BACKENDS = ["numpy", "fakegpu", "cupy"]


def _skip_reason(name):
    try:
        _backend(name)
    except BackendUnavailableError as error:
        return f"backend {name!r} unavailable here: {str(error).split('. ')[0]}"
    return None


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Run the test once per backend: NumPy, the fakegpu stand-in (CuPy's rules on the CPU), and CuPy itself
    where a GPU is usable (skipped with the reason otherwise)."""
    reason = _skip_reason(request.param)
    if reason:
        pytest.skip(reason)
    with minimoe.use_backend(request.param) as chosen:
        yield chosen


@pytest.fixture
def float64():
    """New tensors and parameters in float64 for the duration of the test."""
    previous = minimoe.set_default_dtype("float64")
    yield
    minimoe.set_default_dtype(previous)


@pytest.fixture(autouse=True)
def _seeded():
    minimoe.manual_seed(0)
