"""Array backends: NumPy on the CPU, CuPy on an NVIDIA GPU, and a CPU stand-in that behaves like CuPy.

Every array in minimoe lives on exactly one backend. Library code never imports NumPy or CuPy for its
arithmetic: an op asks for the array module of the arrays it was given (`get_array_module(x)`), so the same
line runs on either library; code that *creates* arrays asks the current backend (`get_backend().xp`).

Moving data between host and device is always explicit (`Tensor.to("gpu")`, `backend.to_numpy(x)`). CuPy
refuses to turn a device array into a NumPy array behind your back, and refuses to mix the two in one
operation. The "fakegpu" backend copies that behaviour on the CPU, so a stray host array in an op fails a
test on a laptop instead of on a student's GPU.

Choose a backend with `minimoe.set_backend("numpy" | "cupy" | "fakegpu")`, the `use_backend(...)` context
manager, or the environment variable `MINIMOE_BACKEND` (read once, at import).
"""

import contextlib
import math
import os

import numpy

__all__ = [
    "Backend", "BackendUnavailableError", "get_backend", "set_backend", "use_backend", "available_backends",
    "get_array_module", "backend_of", "backend_named", "manual_seed", "host_rng", "random_state", "set_random_state",
    "keep_freed_host_memory",
]


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run here (library not installed, or no GPU)."""


class Backend:
    """One array library: its module `xp`, the array type it makes, and the few things that differ.

    name   -- "numpy", "cupy" or "fakegpu"
    device -- "cpu" or "gpu" (fakegpu pretends to be a GPU: its arrays refuse implicit host conversion)
    xp     -- the NumPy-compatible module every op calls
    """

    name = device = None
    xp = array_type = None

    def asarray(self, data, dtype=None):
        """Copy host data (NumPy arrays, lists, scalars) onto this backend. The one door from host to device.
        Always a copy, as a transfer to a GPU is: the result never shares memory with `data`, so an optimizer
        updating it in place cannot change the caller's array."""
        return self.xp.array(data, dtype=dtype)

    def to_numpy(self, array):
        """Copy an array of this backend into a host NumPy array. The one door from device to host."""
        raise NotImplementedError

    def erf(self, x):
        """The error function erf(x) = 2/sqrt(pi) * integral_0^x exp(-t^2) dt, elementwise."""
        raise NotImplementedError

    def random_generator(self, seed):
        """A seeded generator on this backend with `.random(shape, dtype)` and `.standard_normal(shape, dtype)`."""
        return self.xp.random.default_rng(seed)

    def scatter_sum(self, values, index, size):
        """out[j] = Σ values[i] over the i with index[i] = j, for j < size (zero where no index points): a new array
        of shape (size,) + values.shape[1:]; index is 1-D, an integer per row of values. It is the backward of
        gathering rows, x[index], and the combine step of a Mixture-of-Experts layer. CuPy's `add.at` makes these
        sums with atomic adds on the GPU."""
        out = self.xp.zeros((size,) + values.shape[1:], dtype=values.dtype)
        self.xp.add.at(out, index, values)
        return out

    def __repr__(self):
        return f"Backend({self.name!r}, device={self.device!r})"


class NumpyBackend(Backend):
    name, device = "numpy", "cpu"
    xp, array_type = numpy, numpy.ndarray

    def to_numpy(self, array):
        return array

    def erf(self, x):
        import scipy.special  # imported on first use: only the exact GELU needs it

        return scipy.special.erf(x)

    def scatter_sum(self, values, index, size):
        """Rows are summed as a product with a sparse 0/1 matrix S (size × n), S[j, i] = 1 where index[i] = j:
        out = S @ values. NumPy's `add.at` adds one index at a time; SciPy's sparse product makes the same sums in
        one compiled pass, 5-15× faster on the rows of an MoE layer. (`add.at` is fast for single numbers.)"""
        if values.ndim == 1:
            return super().scatter_sum(values, index, size)
        import scipy.sparse  # imported on first use, like scipy.special above

        n = index.shape[0]
        # column i of S holds a single 1, in row index[i]: compressed sparse columns, one entry per column
        # (index % size: negative indices count from the end, as in NumPy indexing)
        selector = scipy.sparse.csc_matrix((numpy.ones(n, dtype=values.dtype), index % size, numpy.arange(n + 1)),
                                           shape=(size, n))
        return (selector @ values.reshape(n, math.prod(values.shape[1:]))).reshape((size,) + values.shape[1:])


class CupyBackend(Backend):
    name, device = "cupy", "gpu"

    def __init__(self):
        try:
            import cupy
        except ImportError as error:
            raise BackendUnavailableError(
                "The 'cupy' backend needs CuPy, which is not installed. On a machine with an NVIDIA GPU and "
                "CUDA 12, install it with:  pip install cupy-cuda12x") from error
        if not cupy.is_available():
            raise BackendUnavailableError(
                "CuPy is installed but found no usable NVIDIA GPU (cupy.is_available() is False). "
                "Use the 'numpy' backend on this machine, or 'fakegpu' to rehearse GPU rules on the CPU.")
        self.xp, self.array_type = cupy, cupy.ndarray

    def to_numpy(self, array):
        return self.xp.asnumpy(array)

    def erf(self, x):
        import cupyx.scipy.special

        return cupyx.scipy.special.erf(x)


# --------------------------------------------------------------------------------------------------------------
# fakegpu: NumPy dressed up as a device library
# --------------------------------------------------------------------------------------------------------------

def _host_mixing_error(what):
    return TypeError(
        f"fakegpu: {what} mixes a host NumPy array with device arrays. CuPy refuses this too: create the array "
        "with the backend's module (get_array_module(x) or get_backend().xp), or move it explicitly "
        "with get_backend().asarray(...).")


def _to_raw(value, what):
    """Unwrap FakeGpuArrays (recursing into lists, tuples and keyword dicts); refuse host NumPy arrays."""
    if type(value) is FakeGpuArray:
        return value._array
    if isinstance(value, numpy.ndarray):
        raise _host_mixing_error(what)
    if isinstance(value, (list, tuple)):
        return type(value)(_to_raw(v, what) for v in value)
    if isinstance(value, dict):  # keyword arguments, e.g. xp.exp(x, out=x)
        return {key: _to_raw(v, what) for key, v in value.items()}
    return value


def _to_device(value):
    """Wrap NumPy results as FakeGpuArrays; NumPy scalars become 0-d arrays, as CuPy returns them."""
    if isinstance(value, (numpy.ndarray, numpy.generic)):
        return FakeGpuArray(numpy.asarray(value))
    if isinstance(value, tuple):
        return tuple(_to_device(v) for v in value)
    if isinstance(value, list):
        return [_to_device(v) for v in value]
    return value


class FakeGpuArray(numpy.lib.mixins.NDArrayOperatorsMixin):
    """A NumPy array that follows CuPy's rules: it never converts itself to a host array implicitly
    (`numpy.asarray(x)` raises), and it refuses to meet a host array in any operation."""

    __slots__ = ("_array",)

    def __init__(self, array):
        self._array = array

    # the NumPy protocols: every ufunc and array function unwraps, computes, and wraps again
    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        name = f"numpy.{ufunc.__name__}"
        raw_inputs = _to_raw(inputs, name)
        if "out" in kwargs:
            kwargs["out"] = _to_raw(kwargs["out"], name)
        return _to_device(getattr(ufunc, method)(*raw_inputs, **kwargs))

    def __array_function__(self, func, types, args, kwargs):
        name = f"numpy.{func.__name__}"
        return _to_device(func(*_to_raw(args, name), **_to_raw(kwargs, name)))

    def __array__(self, dtype=None, copy=None):
        raise TypeError(
            "fakegpu: implicit conversion of a device array to a host NumPy array is not allowed (CuPy refuses "
            "it too). Copy it explicitly: tensor.numpy(), tensor.to('cpu') or backend.to_numpy(array).")

    # what CuPy arrays offer
    def get(self):
        """Explicit copy to the host, like `cupy.ndarray.get()`."""
        return self._array.copy()

    def __getitem__(self, index):
        return _to_device(self._array[_to_raw(index, "indexing")])

    def __setitem__(self, index, value):
        self._array[_to_raw(index, "indexing")] = _to_raw(value, "item assignment")

    def __getattr__(self, name):  # shape, dtype, reshape, sum, astype, ...
        if name.startswith("__"):  # never lend NumPy's __array_interface__ & co.: that would be an implicit copy
            raise AttributeError(name)
        attribute = getattr(self._array, name)
        if not callable(attribute):
            return _to_device(attribute)  # .T is an array; .shape, .dtype pass through unchanged

        def method(*args, **kwargs):
            return _to_device(attribute(*_to_raw(args, name), **_to_raw(kwargs, name)))

        return method

    def __len__(self):
        return len(self._array)

    def __iter__(self):
        return (_to_device(row) for row in self._array)

    def __bool__(self):
        return bool(self._array)

    def __float__(self):
        return float(self._array)

    def __int__(self):
        return int(self._array)

    def __index__(self):
        return self._array.__index__()

    def __repr__(self):
        return f"fakegpu.{self._array!r}"


class _FakeGpuFunction:
    """A NumPy function or ufunc that unwraps FakeGpuArrays, refuses host arrays, and wraps what it returns.
    Ufunc methods (`xp.add.at`, `xp.maximum.reduce`, ...) get the same treatment."""

    def __init__(self, function, name):
        self._function, self._name = function, name

    def __call__(self, *args, **kwargs):
        result = self._function(*_to_raw(args, self._name), **_to_raw(kwargs, self._name))
        if isinstance(result, numpy.random.Generator):  # default_rng(): its draws land on the device
            return _FakeGpuModule(result)
        return _to_device(result)

    def __getattr__(self, name):
        return _FakeGpuFunction(getattr(self._function, name), f"{self._name}.{name}")


class _FakeGpuModule:
    """Stands in for the `cupy` module: NumPy's functions, returning FakeGpuArrays and refusing host arrays.
    `asarray`/`array` are the explicit host-to-device copies, so they accept host data."""

    _TRANSFERS = {"asarray", "array", "ascontiguousarray"}

    def __init__(self, module):
        self._module = module

    def __getattr__(self, name):
        attribute = getattr(self._module, name)
        if type(attribute).__name__ == "module":
            return _FakeGpuModule(attribute)
        if isinstance(attribute, type) or not callable(attribute):
            return attribute  # dtypes (float32, finfo), constants (pi, inf, newaxis)
        if name in self._TRANSFERS:
            def transfer(data, *args, **kwargs):
                if type(data) is FakeGpuArray:
                    return FakeGpuArray(attribute(data._array, *args, **kwargs))
                return FakeGpuArray(numpy.array(data, *args, **kwargs))  # host -> device is a copy, as in CuPy
            return transfer
        return _FakeGpuFunction(attribute, f"{name}()")


class FakeGpuBackend(Backend):
    name, device = "fakegpu", "gpu"
    xp, array_type = _FakeGpuModule(numpy), FakeGpuArray

    def to_numpy(self, array):
        return array.get()

    def erf(self, x):
        return FakeGpuArray(_backends["numpy"].erf(x._array))


# --------------------------------------------------------------------------------------------------------------
# choosing a backend, and finding the backend of an array
# --------------------------------------------------------------------------------------------------------------

_BACKEND_CLASSES = {"numpy": NumpyBackend, "cupy": CupyBackend, "fakegpu": FakeGpuBackend}
_backends = {"numpy": NumpyBackend(), "fakegpu": FakeGpuBackend()}  # "cupy" joins on first use
_backend_by_array_type = {backend.array_type: backend for backend in _backends.values()}
_current = None


def _backend(name):
    if name not in _BACKEND_CLASSES:
        raise ValueError(f"unknown backend {name!r}: choose one of {sorted(_BACKEND_CLASSES)} "
                         "(or 'cpu' for numpy, 'gpu' for cupy)")
    if name not in _backends:
        backend = _BACKEND_CLASSES[name]()
        _backends[name] = backend
        _backend_by_array_type[backend.array_type] = backend
    return _backends[name]


def backend_named(where):
    """The Backend called `where`: "numpy", "cupy", "fakegpu", or the device names "cpu" (NumPy) and "gpu" (CuPy)."""
    return _backend({"cpu": "numpy", "gpu": "cupy"}.get(where, where))


def available_backends():
    """Names of the backends that can run on this machine."""
    names = []
    for name in _BACKEND_CLASSES:
        try:
            _backend(name)
            names.append(name)
        except BackendUnavailableError:
            pass
    return names


def get_backend():
    """The backend new tensors and parameters are created on."""
    return _current


def set_backend(name):
    """Make `name` ("numpy", "cupy" or "fakegpu"; or "cpu", "gpu") the backend for new tensors; returns the
    previous one. Tensors that already exist stay where they are."""
    global _current
    previous, _current = _current, backend_named(name)
    return previous


@contextlib.contextmanager
def use_backend(name):
    """`with use_backend("cupy"): ...` creates new tensors on CuPy inside the block."""
    previous = set_backend(name)
    try:
        yield _current
    finally:
        set_backend(previous.name)


def backend_of(array):
    """The Backend an array belongs to."""
    try:
        return _backend_by_array_type[type(array)]
    except KeyError:
        if isinstance(array, numpy.generic):
            return _backend_by_array_type[numpy.ndarray]
        raise TypeError(f"{type(array).__name__} is not an array of any minimoe backend "
                        "(for a Tensor, pass its array: tensor.data)") from None


def get_array_module(array):
    """numpy, cupy or the fakegpu module: whichever library `array` belongs to (DeZero's idiom)."""
    return backend_of(array).xp


# --------------------------------------------------------------------------------------------------------------
# host memory
# --------------------------------------------------------------------------------------------------------------

def keep_freed_host_memory():
    """Ask the C library's allocator (glibc, on Linux) to keep the memory NumPy frees, for the next array.

    NumPy takes a fresh block from malloc for every large temporary. glibc hands freed blocks of more than ~128 KB
    back to the operating system, so the next temporary of that size costs page faults: the kernel maps and zeroes
    every 4 KB page again. A training step makes the same temporaries every step; on the demo model that churn is
    10-30% of the step. With this setting they are reused instead (the process keeps its peak memory, which a
    training loop needs again at the next step anyway). Process-wide, so it is the program's choice — the library
    never calls it. Returns True where it took effect (glibc), False elsewhere (macOS's allocator keeps freed
    memory by itself)."""
    import ctypes
    import ctypes.util

    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's <malloc.h>
    return bool(mallopt(m_mmap_threshold, 32 * 2 ** 20)) and bool(mallopt(m_trim_threshold, 2 ** 30))


# --------------------------------------------------------------------------------------------------------------
# random numbers
# --------------------------------------------------------------------------------------------------------------
# Parameters are drawn on the host from one seeded NumPy generator and copied to the backend once, so the same
# seed gives the same initial model on every backend. Dropout masks and sampled tokens are drawn on the device,
# from a generator per backend.

_seed = 0
_host_rng = numpy.random.default_rng(_seed)
_device_rngs = {}


def manual_seed(seed):
    """Reset every random generator minimoe uses (parameter init, dropout, sampling) from one seed."""
    global _seed, _host_rng
    _seed = int(seed)
    _host_rng = numpy.random.default_rng(_seed)
    _device_rngs.clear()


def host_rng():
    """The host NumPy generator parameters are initialised from."""
    return _host_rng


def device_rng(backend=None):
    """The generator that draws dropout masks and samples on `backend` (default: the current one)."""
    backend = backend or _current
    if backend.name not in _device_rngs:
        _device_rngs[backend.name] = backend.random_generator([_seed, 1])
    return _device_rngs[backend.name]


def random_state():
    """The state of the host generator and of the NumPy device generator, as JSON-friendly dicts
    (checkpoints save it so a resumed run draws the same numbers)."""
    return {"seed": _seed, "host": _host_rng.bit_generator.state,
            "numpy": device_rng(_backend("numpy")).bit_generator.state}


def set_random_state(state):
    """Restore what `random_state()` returned."""
    manual_seed(state["seed"])
    _host_rng.bit_generator.state = state["host"]
    device_rng(_backend("numpy")).bit_generator.state = state["numpy"]


def _set_backend_from_environment():
    """MINIMOE_BACKEND chooses the backend at import; a bad value fails the import, naming the variable."""
    name = os.environ.get("MINIMOE_BACKEND") or "numpy"
    try:
        set_backend(name)
    except (ValueError, BackendUnavailableError) as error:
        raise type(error)(f"environment variable MINIMOE_BACKEND={name!r}: {error}") from None


_set_backend_from_environment()
