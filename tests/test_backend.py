"""Backends: choosing one, moving tensors between them explicitly, and fakegpu refusing exactly what CuPy
refuses, so that a host array hidden in an op fails here on the CPU instead of on a student's GPU."""

import os
import subprocess
import sys
import types

import numpy
import pytest

import minimoe
import minimoe.functional as F
import minimoe.backend as backend_module
from minimoe import BackendUnavailableError, Function
from minimoe.backend import FakeGpuArray, backend_named, get_array_module
from minimoe.testing import to_numpy

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAKE = backend_named("fakegpu")


def fake_array(values):
    return FAKE.asarray(numpy.asarray(values, dtype=numpy.float64))


@pytest.fixture(autouse=True)
def _start_on_numpy():
    """These tests move between backends themselves: each starts on NumPy, whatever MINIMOE_BACKEND says
    (the `backend` fixture, where a test asks for it, then switches)."""
    with minimoe.use_backend("numpy"):
        yield


# --------------------------------------------------------------------------------------------------------------
# choosing a backend
# --------------------------------------------------------------------------------------------------------------

def test_set_get_and_use_backend():
    assert minimoe.get_backend().name == "numpy"
    previous = minimoe.set_backend("fakegpu")
    try:
        assert previous.name == "numpy" and minimoe.get_backend().name == "fakegpu"
        assert type(minimoe.tensor([1.0]).data) is FakeGpuArray
    finally:
        minimoe.set_backend(previous.name)
    with pytest.raises(KeyError):
        with minimoe.use_backend("fakegpu") as chosen:
            assert chosen is minimoe.get_backend() and chosen.name == "fakegpu"
            assert minimoe.zeros(2).backend is chosen and minimoe.randn(2).device == "gpu"
            raise KeyError("the previous backend comes back even after an error")
    assert minimoe.get_backend().name == "numpy"
    assert type(minimoe.tensor([1.0]).data) is numpy.ndarray


def test_device_names_are_accepted_as_backend_names():
    with minimoe.use_backend("cpu") as chosen:
        assert chosen.name == "numpy"
    assert backend_named("cpu").name == "numpy"


def test_unknown_backend_name():
    with pytest.raises(ValueError, match=r"unknown backend 'tpu': choose one of \['cupy', 'fakegpu', 'numpy'\]"):
        minimoe.set_backend("tpu")
    assert minimoe.get_backend().name == "numpy"


def _cupy_usable():
    try:
        import cupy
        return bool(cupy.is_available())
    except Exception:  # not installed, or CuPy 13 raising where there is no driver
        return False


@pytest.mark.skipif(_cupy_usable(), reason="CuPy has a GPU here, so set_backend('cupy') succeeds")
def test_cupy_without_a_gpu_says_why_and_what_to_do():
    if "cupy" in minimoe.available_backends():
        pytest.skip("a GPU is usable here: CuPy works, so there is no refusal to check")
    with pytest.raises(BackendUnavailableError) as raised:
        minimoe.set_backend("cupy")
    message = str(raised.value)
    try:
        import cupy  # noqa: F401
        assert "found no usable NVIDIA GPU" in message and "'numpy' backend" in message and "'fakegpu'" in message
    except ImportError:
        assert "not installed" in message and "pip install cupy-cuda12x" in message
    assert minimoe.get_backend().name == "numpy"
    assert "cupy" not in minimoe.available_backends()


def test_cupy_not_installed_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "cupy", None)  # `import cupy` now raises ImportError
    monkeypatch.delitem(backend_module._backends, "cupy", raising=False)
    with pytest.raises(BackendUnavailableError, match=r"needs CuPy, which is not installed.*pip install cupy-cuda12x"):
        minimoe.set_backend("cupy")
    with pytest.raises(BackendUnavailableError, match="not installed"):
        minimoe.tensor([1.0]).to("gpu")
    assert minimoe.get_backend().name == "numpy"


def _backend_in_a_fresh_python(value):
    environment = {key: v for key, v in os.environ.items() if key != "MINIMOE_BACKEND"}
    if value is not None:
        environment["MINIMOE_BACKEND"] = value
    return subprocess.run([sys.executable, "-c", "import minimoe; print(minimoe.get_backend().name)"],
                          cwd=REPOSITORY, env=environment, capture_output=True, text=True, timeout=120)


def test_environment_variable_chooses_the_backend():
    for value, expected in [(None, "numpy"), ("fakegpu", "fakegpu"), ("numpy", "numpy")]:
        result = _backend_in_a_fresh_python(value)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == expected
    result = _backend_in_a_fresh_python("tpu")
    assert result.returncode != 0
    assert "MINIMOE_BACKEND='tpu': unknown backend 'tpu'" in result.stderr


def _run_in_a_fresh_python(code, backend_variable):
    environment = {key: v for key, v in os.environ.items() if key != "MINIMOE_BACKEND"}
    environment["MINIMOE_BACKEND"] = backend_variable
    return subprocess.run([sys.executable, "-c", code], cwd=REPOSITORY, env=environment, capture_output=True,
                          text=True, timeout=120)


@pytest.mark.skipif(_cupy_usable(), reason="CuPy has a GPU here")
def test_an_unusable_environment_backend_fails_at_use_not_at_import():
    result = _run_in_a_fresh_python("import minimoe, minimoe.functional; print('imported')", "cupy")
    assert result.returncode == 0 and result.stdout.strip() == "imported", result.stderr
    result = _run_in_a_fresh_python("import minimoe; minimoe.tensor([1.0])", "cupy")
    assert result.returncode != 0 and "environment variable MINIMOE_BACKEND='cupy'" in result.stderr
    assert "overrides it" in result.stderr
    overridden = _run_in_a_fresh_python("import minimoe; minimoe.set_backend('numpy'); "
                                        "print(minimoe.tensor([1.0]).backend.name)", "cupy")
    assert overridden.returncode == 0 and overridden.stdout.strip() == "numpy", overridden.stderr


class _FakeCupy(types.ModuleType):
    """A stand-in `cupy` module: is_available() and the smoke ops behave as told."""

    def __init__(self, available=True, failing=None):
        super().__init__("cupy")
        self._available, self._failing = available, failing
        self.float32, self.ndarray = numpy.float32, _FakeCupyArray

    def is_available(self):
        if isinstance(self._available, Exception):
            raise self._available
        return self._available

    def arange(self, n, dtype=None):
        return _FakeCupyArray(numpy.arange(n, dtype=dtype), self._failing)


class _FakeCupyArray:
    def __init__(self, array, failing):
        self.array, self.failing = array, failing

    def _fail(self, what, result):
        if self.failing == what:
            raise RuntimeError(f"simulated failure: {what}")
        return _FakeCupyArray(result, self.failing)

    def reshape(self, *shape):
        return _FakeCupyArray(self.array.reshape(*shape), self.failing)

    def __mul__(self, other):
        return self._fail("elementwise", self.array * other)

    def __add__(self, other):
        return self._fail("elementwise", self.array + other)

    def __matmul__(self, other):
        return self._fail("matmul", self.array @ other.array)

    def sum(self, axis=None):
        return self._fail("sum", self.array.sum(axis=axis))

    def __getitem__(self, index):
        return _FakeCupyArray(self.array[index], self.failing)

    def item(self):
        return self._fail("item", self.array).array.item()


def _with_fake_cupy(monkeypatch, module):
    """Import `module` as cupy, with registries of backends that the test may change and that are put back."""
    monkeypatch.setitem(sys.modules, "cupy", module)
    monkeypatch.setattr(backend_module, "_backends",
                        {name: b for name, b in backend_module._backends.items() if name != "cupy"})
    monkeypatch.setattr(backend_module, "_backend_by_array_type", dict(backend_module._backend_by_array_type))


def test_cupy_13_raising_is_available_is_a_clear_refusal(monkeypatch):
    """CuPy 13 raises from is_available() where there is no driver (CuPy 14 returns False)."""
    _with_fake_cupy(monkeypatch, _FakeCupy(available=RuntimeError("cudaErrorInsufficientDriver: CUDA driver "
                                                                    "version is insufficient")))
    with pytest.raises(BackendUnavailableError, match=r"is_available\(\) raised RuntimeError: "
                                                      r"cudaErrorInsufficientDriver.*'numpy' backend"):
        minimoe.set_backend("cupy")
    assert "cupy" not in minimoe.available_backends()
    assert minimoe.get_backend().name == "numpy"


@pytest.mark.parametrize("failing, named", [("elementwise", "NVRTC"), ("matmul", "cuBLAS"), ("sum", "reduction"),
                                            ("item", r"\.item\(\)")])
def test_cupy_smoke_test_names_the_missing_piece(monkeypatch, failing, named):
    _with_fake_cupy(monkeypatch, _FakeCupy(failing=failing))
    with pytest.raises(BackendUnavailableError, match=f"CuPy sees a GPU, but .*{named}.*simulated failure"):
        minimoe.set_backend("cupy")


def test_cupy_that_works_passes_the_smoke_test(monkeypatch):
    _with_fake_cupy(monkeypatch, _FakeCupy())
    chosen = backend_module.backend_named("cupy")
    assert chosen.name == "cupy" and chosen.xp is sys.modules["cupy"]


def test_get_array_module():
    assert get_array_module(numpy.ones(2)) is numpy
    assert get_array_module(numpy.float64(1.0)) is numpy  # NumPy reductions return scalars
    assert get_array_module(fake_array([1.0])) is FAKE.xp
    with pytest.raises(TypeError, match=r"Tensor is not an array of any minimoe backend.*tensor\.data"):
        get_array_module(minimoe.tensor([1.0]))
    with pytest.raises(TypeError, match="list is not an array"):
        get_array_module([1.0])


# --------------------------------------------------------------------------------------------------------------
# explicit transfers
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("values, dtype", [([[1.5, -2.25], [3.0, 0.1]], "float64"), ([1.5, -2.0], "float32"),
                                           ([[1, -2, 3]], "int64"), ([True, False], "bool")])
def test_transfers_round_trip_values_and_dtypes(backend, values, dtype):
    x = minimoe.tensor(values, dtype=dtype)
    on_fakegpu = x.to("fakegpu")
    on_cpu = on_fakegpu.to("cpu")
    for moved, where in [(on_fakegpu, "fakegpu"), (on_cpu, "numpy"), (on_fakegpu.to_cpu(), "numpy")]:
        assert moved.backend.name == where
        assert moved.dtype == numpy.dtype(dtype) and moved.shape == x.shape
        numpy.testing.assert_array_equal(moved.numpy(), numpy.asarray(values, dtype=dtype))
    assert x.to(x.backend.name) is x


def test_transfers_copy_and_make_a_new_leaf():
    x = minimoe.tensor([1.0, 2.0], dtype="float64", requires_grad=True)
    y = (x * 2.0).to("fakegpu")
    assert y.is_leaf and y.requires_grad and y.backend.name == "fakegpu"
    moved = x.to("fakegpu")
    moved.data += 1.0  # an in-place update (an optimizer step) on one side leaves the other alone
    assert x.data.tolist() == [1.0, 2.0]
    back = moved.to("cpu")
    back.data += 1.0
    assert moved.numpy().tolist() == [2.0, 3.0]


def test_tensor_copies_host_data():
    host = numpy.array([1.0, 2.0])
    x = minimoe.tensor(host, requires_grad=True)
    x.data -= 0.5  # as an optimizer would
    assert host.tolist() == [1.0, 2.0]
    host[0] = 10.0
    assert x.data.tolist() == [0.5, 1.5]


def test_numpy_asarray_of_a_tensor():
    x = minimoe.tensor([[1.0, 2.0]], dtype="float64")
    numpy.testing.assert_array_equal(numpy.asarray(x), [[1.0, 2.0]])
    assert numpy.asarray(minimoe.tensor(0.5)).shape == ()
    rows = [minimoe.tensor([0.5]), minimoe.tensor([0.25])]
    assert numpy.asarray(rows, dtype=numpy.float64).tolist() == [[0.5], [0.25]]
    with pytest.raises(TypeError, match="implicit conversion of a device array"):
        numpy.asarray(x.to("fakegpu"))


# --------------------------------------------------------------------------------------------------------------
# fakegpu refuses what CuPy refuses
# --------------------------------------------------------------------------------------------------------------

def test_fakegpu_refuses_implicit_host_conversion():
    device = fake_array([1.0, 2.0])
    with pytest.raises(TypeError, match=r"implicit conversion of a device array.*tensor\.numpy\(\)"):
        numpy.asarray(device)
    with pytest.raises(TypeError, match="implicit conversion"):
        numpy.array(device)
    assert device.get().tolist() == [1.0, 2.0]  # the explicit way
    assert type(device.get()) is numpy.ndarray


def test_fakegpu_refuses_to_mix_host_and_device_arrays():
    device, host = fake_array([1.0, 2.0]), numpy.array([3.0, 4.0])
    for mix in (lambda: device + host, lambda: host * device, lambda: FAKE.xp.exp(host),
                lambda: FAKE.xp.concatenate([device, host]), lambda: FAKE.xp.maximum(device, host)):
        with pytest.raises(TypeError, match="mixes a host NumPy array with device arrays"):
            mix()
    assert type(device + 1.0) is FakeGpuArray and type(FAKE.xp.exp(device)) is FakeGpuArray
    assert type(numpy.exp(device)) is FakeGpuArray  # NumPy's own functions dispatch to the device, as with CuPy
    assert type(device.sum()) is FakeGpuArray  # reductions give 0-d device arrays, not host scalars


def test_fakegpu_transfers_are_copies():
    host = numpy.array([1.0, 2.0])
    for transfer in (FAKE.xp.asarray, FAKE.xp.array, FAKE.asarray):
        device = transfer(host)
        device += 1.0
        assert host.tolist() == [1.0, 2.0]


class _HostOnes(Function):
    """A deliberately wrong op: it makes a host array with `numpy` next to its (maybe device) input."""

    def forward(self, x):
        return numpy.ones(x.shape) * x

    def backward(self, g):
        return g


class _HostGradient(Function):
    """A deliberately wrong op: its backward returns a host array."""

    def forward(self, x):
        self.save(x.shape)
        return x * 1.0

    def backward(self, g):
        (shape,) = self.saved
        return numpy.ones(shape)


def test_a_host_array_inside_an_op_fails_on_fakegpu_only():
    values = [1.0, -2.0]
    with minimoe.use_backend("numpy"):
        x = minimoe.tensor(values, dtype="float64", requires_grad=True)
        assert _HostOnes()(x).tolist() == values  # NumPy does not notice the bug
        _HostGradient()(x).sum().backward()
        assert x.grad.tolist() == [1.0, 1.0]
    with minimoe.use_backend("fakegpu"):
        x = minimoe.tensor(values, dtype="float64", requires_grad=True)
        with pytest.raises(TypeError, match=r"^_hostones: fakegpu: numpy.multiply mixes a host NumPy array"):
            _HostOnes()(x)
        with pytest.raises(TypeError, match=r"_hostgradient.backward: produced a ndarray from FakeGpuArray inputs"):
            _HostGradient()(x).sum().backward()


def test_library_ops_run_on_fakegpu(backend):
    """A smoke test across the functional API: nothing in it creates a host array."""
    x = minimoe.randn(2, 3, 4, dtype="float64", requires_grad=True)
    w = minimoe.randn(5, 4, dtype="float64", requires_grad=True)
    logits = F.linear(F.rms_norm(x, minimoe.ones(4, dtype="float64")), w)
    loss = F.cross_entropy(logits, [[1, 2, 3], [0, 4, -100]]) + F.softmax(logits).max()
    loss.backward()
    assert type(x.grad) is backend.array_type and type(w.grad) is backend.array_type
    assert numpy.isfinite(to_numpy(w.grad)).all()


# --------------------------------------------------------------------------------------------------------------
# fakegpu is as strict as CuPy 13/14 (each of these passed silently on an earlier stand-in)
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("call", [lambda d: d + [1.0, 2.0], lambda d: (1.0, 2.0) * d,
                                  lambda d: FAKE.xp.maximum(d, [0.0, 5.0]), lambda d: FAKE.xp.where(d > 1, [1, 2], d),
                                  lambda d: FAKE.xp.where(d > 1, d, (0.0, 0.0))],
                         ids=["add_list", "mul_tuple", "ufunc_list", "where_list", "where_tuple"])
def test_fakegpu_refuses_lists_and_tuples_as_operands(call):
    with pytest.raises(TypeError, match="CuPy refuses lists and tuples"):
        call(fake_array([1.0, 2.0]))


def test_fakegpu_still_takes_lists_of_arrays_and_shapes():
    device = fake_array([1.0, 2.0])
    assert FAKE.xp.concatenate([device, device]).shape == (4,) and device.reshape((2, 1)).shape == (2, 1)


def test_fakegpu_arrays_have_no_writeable_flag_setflags_or_index():
    device = fake_array([1.0, 2.0])
    assert device.flags.c_contiguous and device.flags["C_CONTIGUOUS"]
    with pytest.raises(AttributeError):
        device.flags.writeable = False
    with pytest.raises(AttributeError, match="setflags"):
        device.setflags(write=False)
    with pytest.raises(TypeError):
        [10, 20, 30][fake_array(1)]  # CuPy arrays are not Python indices (__index__)


def test_fakegpu_ufunc_reduce_only_for_add_and_multiply():
    device = fake_array([1.0, 3.0, 2.0])
    with pytest.raises(TypeError, match=r"maximum.reduce is not in CuPy.*xp.max"):
        FAKE.xp.maximum.reduce(device)
    with pytest.raises(TypeError, match="reduce is not in CuPy"):
        numpy.maximum.reduce(device)
    assert FAKE.xp.add.reduce(device).item() == 6.0


def test_fakegpu_sorts_like_cupy_13():
    device = fake_array([3.0, 1.0, 2.0])
    with pytest.raises(TypeError, match="kind=None or 'stable' only"):
        FAKE.xp.argsort(device, kind="quicksort")
    with pytest.raises(TypeError, match="kind=None or 'stable' only"):
        FAKE.xp.sort(device, kind="heapsort")
    with pytest.raises(TypeError, match="takes only `axis`"):
        device.argsort(kind="stable")
    assert FAKE.xp.argsort(device, kind="stable").tolist() == device.argsort().tolist() == [1, 2, 0]


@pytest.mark.parametrize("method", ["permutation", "choice", "normal", "shuffle", "bit_generator"])
def test_fakegpu_generator_has_only_cupys_methods(method):
    generator = FAKE.random_generator(0)
    with pytest.raises(AttributeError, match=f"device generator has no '{method}'"):
        getattr(generator, method)
    assert type(generator.random((2,), dtype=numpy.float32)) is FakeGpuArray


def test_fakegpu_wraps_out_of_range_indices_as_cupy_does():
    device = fake_array([10.0, 20.0, 30.0])
    index = FAKE.xp.asarray([3, -4, 1])
    assert device[index].tolist() == [10.0, 30.0, 20.0]  # 3 -> 0 and -4 -> -1: no IndexError
    assert FAKE.xp.take_along_axis(device, index, axis=0).tolist() == [10.0, 30.0, 20.0]
    target = FAKE.xp.zeros(3)
    FAKE.xp.add.at(target, index, 1.0)
    assert target.tolist() == [1.0, 1.0, 1.0]


def test_fakegpu_names_the_implicit_upload_of_a_host_index():
    device = fake_array([10.0, 20.0, 30.0])
    with pytest.raises(TypeError, match=r"CuPy would copy the index to the device implicitly.*asarray\(index\)"):
        device[numpy.array([0, 1])]


def test_fakegpu_adds_at_in_a_shuffled_order():
    """Atomic adds on a GPU land in any order, so float sums differ in their last bits from run to run; the
    stand-in shuffles them. (Here: many values whose float32 sum depends on the order.)"""
    values = FAKE.xp.asarray(numpy.random.default_rng(0).standard_normal(4000).astype(numpy.float32) * 1e3)
    index = FAKE.xp.zeros(4000, dtype=numpy.int64)
    sums = set()
    for _ in range(5):
        target = FAKE.xp.zeros(1, dtype=numpy.float32)
        FAKE.xp.add.at(target, index, values)
        sums.add(target.item())
    assert len(sums) > 1
    assert max(sums) - min(sums) < 1e-2 * abs(max(sums)) + 1.0


def test_fakegpu_counts_host_reads():
    from minimoe.backend import host_reads

    device = fake_array([1.0, 0.0, 2.0])
    before = host_reads()
    device.get(), device.item if False else None, device.sum().item(), device.tolist(), bool(device[0] > 0)
    int(device[0]), float(device[0])
    assert host_reads() - before == 6
    before = host_reads()
    FAKE.xp.bincount(FAKE.xp.asarray([0, 1, 1]))  # CuPy reads min and max back
    device[device > 0]  # the result's size depends on the mask
    device.nonzero()
    assert host_reads() - before == 4
    before = host_reads()
    (device * 2 + 1).sum(), FAKE.xp.argsort(device, kind="stable"), device[FAKE.xp.asarray([0, 2])]
    assert host_reads() == before  # pure device work reads nothing back
