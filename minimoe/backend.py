"""Array backends: NumPy on the CPU, CuPy on an NVIDIA GPU, and a CPU stand-in that behaves like CuPy.

Every array in minimoe lives on exactly one backend. Library code never imports NumPy or CuPy for its
arithmetic: an op asks for the array module of the arrays it was given (`get_array_module(x)`), so the same
line runs on either library; code that *creates* arrays asks the current backend (`get_backend().xp`).

Moving data between host and device is always explicit (`Tensor.to("gpu")`, `backend.to_numpy(x)`). CuPy
refuses to turn a device array into a NumPy array behind your back, and refuses to mix the two in one
operation. The "fakegpu" backend copies that behaviour on the CPU, so a stray host array in an op fails a
test on a laptop instead of on a student's GPU.

Choose a backend with `minimoe.set_backend("numpy" | "cupy" | "fakegpu")`, the `use_backend(...)` context
manager, or the environment variable `MINIMOE_BACKEND` (read at the first `get_backend()`, not at import, so
`set_backend` overrides it).
"""

import builtins
import contextlib
import functools
import math
import os

import numpy

__all__ = [
    "Backend", "BackendUnavailableError", "get_backend", "set_backend", "use_backend", "available_backends",
    "get_array_module", "backend_of", "backend_named", "to_host", "manual_seed", "host_rng", "device_rng",
    "DeviceGenerator",
    "random_state", "set_random_state",
    "keep_freed_host_memory", "debug_checks", "set_debug_checks", "check_index_range", "host_reads",
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

    def bincount(self, values, size):
        """counts[j] = how many entries of the integer array `values` equal j, for j < size (all values must be in
        [0, size)). Unlike `xp.bincount`, which on CuPy reads min and max back to the host to size its result
        (two syncs), this never waits for the device: a scatter-add of ones into `size` counters."""
        return self.scatter_sum(self.xp.ones(values.shape[0], dtype="int32"), values, size)

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

    def bincount(self, values, size):
        return numpy.bincount(values, minlength=size)

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
        try:
            available = cupy.is_available()
        except Exception as error:  # CuPy 13 raises (e.g. cudaErrorInsufficientDriver) where 14 returns False
            raise BackendUnavailableError(
                f"CuPy is installed but cannot reach a GPU: cupy.is_available() raised {type(error).__name__}: "
                f"{error}. Is the NVIDIA driver installed (nvidia-smi)? Use the 'numpy' backend on this machine, "
                "or 'fakegpu' to rehearse GPU rules on the CPU.") from None
        if not available:
            raise BackendUnavailableError(
                "CuPy is installed but found no usable NVIDIA GPU (cupy.is_available() is False). "
                "Use the 'numpy' backend on this machine, or 'fakegpu' to rehearse GPU rules on the CPU.")
        _smoke_test(cupy)
        self.xp, self.array_type = cupy, cupy.ndarray

    def to_numpy(self, array):
        return self.xp.asnumpy(array)

    def random_generator(self, seed):
        """A generator on cuRAND's Philox4x32-10. It is counter-based, so seeding a fresh one (as DeviceGenerator does
        for every draw) is one light kernel; CuPy's default, XORWOW, skips ahead once per GPU thread to seed."""
        return self.xp.random.Generator(self.xp.random.Philox4x3210(seed))

    def erf(self, x):
        import cupyx.scipy.special

        return cupyx.scipy.special.erf(x)


def _smoke_test(cupy):
    """One tiny op of each kind the library needs, so a GPU without CUDA's libraries fails here, naming the missing
    piece, instead of deep inside the first layer."""
    steps = [
        ("an elementwise kernel, compiled at run time by NVRTC (libnvrtc from the CUDA toolkit)",
         lambda x: x * 2 + 1),
        ("a matrix product, run by cuBLAS (libcublas)", lambda x: x @ x),
        ("a reduction", lambda x: x.sum(axis=0)),
        ("copying a value back to the host (.item())", lambda x: x[0, 0].item()),
    ]
    try:
        x = cupy.arange(4, dtype=cupy.float32).reshape(2, 2)
    except Exception as error:
        raise BackendUnavailableError(f"CuPy sees a GPU but cannot allocate memory on it ({type(error).__name__}: "
                                      f"{error})") from None
    for what, step in steps:
        try:
            step(x)
        except Exception as error:
            raise BackendUnavailableError(
                f"CuPy sees a GPU, but {what} failed: {type(error).__name__}: {error}. Install the CUDA libraries "
                "matching your CuPy package (e.g. CUDA 12 with cupy-cuda12x; see CuPy's installation guide), or "
                "use the 'numpy' backend.") from None


# --------------------------------------------------------------------------------------------------------------
# fakegpu: NumPy dressed up as a device library
# --------------------------------------------------------------------------------------------------------------
# What CuPy 13/14 do differently from NumPy, and the stand-in copies (each has a test in tests/test_backend.py):
# - no implicit conversion to or from host arrays; no lists or tuples as operands of ufuncs and `where`
# - no `flags.writeable` / `setflags`, no `__index__`, `ufunc.reduce` only for add and multiply
# - `argsort`/`sort` take kind=None or "stable" only, and their method forms no `kind` at all (CuPy 13)
# - the generator has CuPy's methods only (no permutation, choice, normal, bit_generator.state)
# - out-of-range integer-array indices wrap around (a[-1 - n] is a[-1]) instead of raising; the library checks
#   indices itself (functional.check_indices)
# - `ufunc.at` adds in an arbitrary order (atomic adds): the stand-in shuffles the contributions, so a test
#   that expects bit-identical sums from a device path fails here as it would on a GPU
# - every read of device values by the host is counted (`host_reads()`), including the ones CuPy makes inside
#   bincount, nonzero and boolean-mask indexing, so tests can hold the library to a budget of syncs

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


def _raw_index(index):
    """An index for a FakeGpuArray. A host NumPy index array is refused: CuPy would copy it to the device behind
    your back (an implicit transfer, and a wait for it); the stand-in is stricter and asks for the copy."""
    try:
        return _to_raw(index, "indexing")
    except TypeError:
        raise TypeError("fakegpu: indexing a device array with a host NumPy array. CuPy would copy the index to the "
                        "device implicitly (a hidden host->device transfer); fakegpu refuses it so the copy is "
                        "explicit: get_backend().asarray(index), or build the index with the array's module") from None


def _refuse_sequences(operands, what):
    """CuPy's ufuncs and `where` take arrays and scalars, not lists or tuples."""
    for operand in operands:
        if isinstance(operand, (list, tuple)):
            raise TypeError(f"fakegpu: {what} got a {type(operand).__name__} operand; CuPy refuses lists and tuples "
                            "here (Unsupported type). Make it an array first: xp.asarray(...)")


def _to_device(value):
    """Wrap NumPy results as FakeGpuArrays; NumPy scalars become 0-d arrays, as CuPy returns them."""
    if isinstance(value, (numpy.ndarray, numpy.generic)):
        return FakeGpuArray(numpy.asarray(value))
    if isinstance(value, tuple):
        return tuple(_to_device(v) for v in value)
    if isinstance(value, list):
        return [_to_device(v) for v in value]
    return value


_host_reads = 0


def _count_host_read(n=1):
    global _host_reads
    _host_reads += n


def host_reads():
    """How many times the host has read device values (synchronising with the device) on fakegpu so far: `.get()`,
    `.item()`, `.tolist()`, `bool()`, `int()`, `float()`, printing, and the reads CuPy makes inside `bincount` (2),
    `nonzero` and boolean-mask indexing (1 each). Tests take differences of it around a step."""
    return _host_reads


def _wrap_indices(index, shape):
    """CuPy wraps out-of-range integer-array indices around (mod the axis length) instead of raising: so does the
    stand-in. Python integers, slices and boolean masks are left alone (CuPy checks integers as NumPy does)."""
    parts = index if isinstance(index, tuple) else (index,)
    consumed = builtins.sum(1 if not isinstance(p, numpy.ndarray) or p.dtype.kind != "b" else p.ndim
                            for p in parts if p is not None and p is not Ellipsis)
    wrapped, axis = [], 0
    for p in parts:
        if p is None:
            wrapped.append(p)
        elif p is Ellipsis:
            wrapped.append(p)
            axis += len(shape) - consumed
        elif isinstance(p, numpy.ndarray) and p.dtype.kind in "iu" and axis < len(shape) and shape[axis]:
            wrapped.append(p % shape[axis])
            axis += 1
        else:
            wrapped.append(p)
            axis += p.ndim if isinstance(p, numpy.ndarray) and p.dtype.kind == "b" else 1
    return tuple(wrapped) if isinstance(index, tuple) else wrapped[0]


def _has_mask(index):
    parts = index if isinstance(index, tuple) else (index,)
    return any(isinstance(p, numpy.ndarray) and p.dtype.kind == "b" for p in parts)


_CUPY_FLAGS = ("c_contiguous", "f_contiguous", "owndata")


class _Flags:
    """CuPy's `ndarray.flags`: contiguity and ownership, nothing writable."""

    __slots__ = _CUPY_FLAGS

    def __init__(self, flags):
        for name in _CUPY_FLAGS:
            setattr(self, name, getattr(flags, name))

    def __getitem__(self, name):
        return getattr(self, name.lower())


class FakeGpuArray(numpy.lib.mixins.NDArrayOperatorsMixin):
    """A NumPy array that follows CuPy's rules: it never converts itself to a host array implicitly
    (`numpy.asarray(x)` raises), and it refuses to meet a host array in any operation."""

    __slots__ = ("_array",)

    def __init__(self, array):
        self._array = array

    # the NumPy protocols: every ufunc and array function unwraps, computes, and wraps again
    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        name = f"numpy.{ufunc.__name__}"
        _refuse_sequences(inputs, name)
        raw_inputs = _to_raw(inputs, name)
        if "out" in kwargs:
            kwargs["out"] = _to_raw(kwargs["out"], name)
        if method != "__call__":
            return _to_device(_ufunc_method(ufunc, method)(*raw_inputs, **kwargs))
        return _to_device(getattr(ufunc, method)(*raw_inputs, **kwargs))

    def __array_function__(self, func, types, args, kwargs):
        return _call_like_cupy(func, func.__name__, args, kwargs)

    def __array__(self, dtype=None, copy=None):
        raise TypeError(
            "fakegpu: implicit conversion of a device array to a host NumPy array is not allowed (CuPy refuses "
            "it too). Copy it explicitly: tensor.numpy(), tensor.to('cpu') or backend.to_numpy(array).")

    # what CuPy arrays offer
    def get(self):
        """Explicit copy to the host, like `cupy.ndarray.get()`."""
        _count_host_read()
        return self._array.copy()

    def item(self):
        _count_host_read()
        return self._array.item()

    def tolist(self):
        _count_host_read()
        return self._array.tolist()

    @property
    def flags(self):
        return _Flags(self._array.flags)

    def setflags(self, *args, **kwargs):
        raise AttributeError("fakegpu: 'ndarray' has no attribute 'setflags' (CuPy arrays cannot be made read-only)")

    def argsort(self, axis=-1, **kwargs):
        if kwargs:
            raise TypeError(f"fakegpu: ndarray.argsort() got {sorted(kwargs)}; CuPy 13's method takes only `axis` "
                            "(use xp.argsort(x, axis, kind='stable'))")
        return FakeGpuArray(self._array.argsort(axis=axis, kind="stable"))

    def sort(self, axis=-1, **kwargs):
        if kwargs:
            raise TypeError(f"fakegpu: ndarray.sort() got {sorted(kwargs)}; CuPy 13's method takes only `axis`")
        self._array.sort(axis=axis, kind="stable")

    def nonzero(self):
        _count_host_read()
        return _to_device(self._array.nonzero())

    def __getitem__(self, index):
        raw = _wrap_indices(_raw_index(index), self._array.shape)
        if _has_mask(raw):
            _count_host_read()  # the size of the result depends on the mask: CuPy reads it back
        return _to_device(self._array[raw])

    def __setitem__(self, index, value):
        self._array[_wrap_indices(_raw_index(index), self._array.shape)] = _to_raw(value, "item assignment")

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
        _count_host_read()
        return bool(self._array)

    def __float__(self):
        _count_host_read()
        return float(self._array)

    def __int__(self):
        _count_host_read()
        return int(self._array)

    def __repr__(self):
        _count_host_read()
        return f"fakegpu.{self._array!r}"


def _ufunc_method(ufunc, method):
    """ufunc.at (shuffled, wrapping indices) and ufunc.reduce (add and multiply only, as in CuPy)."""
    if method == "at":
        return functools.partial(_shuffled_at, ufunc)
    if method == "reduce" and ufunc.__name__ not in ("add", "multiply"):
        raise TypeError(f"fakegpu: {ufunc.__name__}.reduce is not in CuPy (its ufunc.reduce covers add and "
                        "multiply); use the reduction function, e.g. xp.max(x, axis) for maximum.reduce")
    if method not in ("reduce", "outer"):
        raise TypeError(f"fakegpu: {ufunc.__name__}.{method} is not in CuPy")
    return getattr(ufunc, method)


deterministic_atomic_adds = False  # tests that need bit-identical sums on fakegpu may set this (CuPy cannot)


def _shuffled_at(ufunc, target, index, values=None):
    """ufunc.at(target, index, values) with out-of-range indices wrapped and the contributions applied in a random
    order, as CuPy's atomic adds apply them on a GPU (floating-point sums then differ in their last bits)."""
    index = _wrap_indices(index, target.shape)
    parts = index if isinstance(index, tuple) else (index,)
    if values is None or deterministic_atomic_adds or not all(
            isinstance(p, (int, numpy.integer)) or (isinstance(p, numpy.ndarray) and p.dtype.kind in "iu")
            for p in parts):
        return ufunc.at(target, index, values) if values is not None else ufunc.at(target, index)
    shape = numpy.broadcast_shapes(*(numpy.shape(p) for p in parts))
    count = math.prod(shape)
    flat = [numpy.broadcast_to(p, shape).reshape(count) for p in parts]
    trailing = target.shape[len(parts):]
    flat_values = numpy.broadcast_to(values, shape + trailing).reshape((count,) + trailing)
    order = _shuffler.permutation(count)
    ufunc.at(target, tuple(p[order] for p in flat), flat_values[order])


_shuffler = numpy.random.default_rng()  # not seeded: a GPU's order of atomic adds is not reproducible either

_CUPY_GENERATOR_METHODS = {  # cupy.random.Generator (CuPy 13/14); no normal, choice, permutation, shuffle, state
    "beta", "binomial", "chisquare", "dirichlet", "exponential", "f", "gamma", "geometric", "hypergeometric",
    "integers", "logseries", "poisson", "power", "random", "standard_exponential", "standard_gamma",
    "standard_normal", "uniform"}


def _call_like_cupy(func, name, args, kwargs):
    """A NumPy function applied as CuPy would apply it to FakeGpuArrays (the checks of `_CupyRules`)."""
    where = f"numpy.{name}"
    if name == "where":
        _refuse_sequences(args[1:] + tuple(kwargs.values()), where)
    raw_args, raw_kwargs = _to_raw(args, where), _to_raw(kwargs, where)
    if name in ("argsort", "sort") and raw_kwargs.get("kind") not in (None, "stable"):
        raise TypeError(f"fakegpu: {name}(kind={raw_kwargs['kind']!r}): CuPy sorts with kind=None or 'stable' only")
    if name in ("take_along_axis", "take"):
        raw_args = _wrap_take(name, raw_args, raw_kwargs)
    if name == "bincount":
        _count_host_read(2)  # CuPy reads min(x) < 0 and max(x) back to size the result
    elif name in ("nonzero", "flatnonzero", "argwhere", "unique"):  # the result's size depends on the data
        _count_host_read()
    return _to_device(func(*raw_args, **raw_kwargs))


def _wrap_take(name, args, kwargs):
    """take and take_along_axis wrap out-of-range indices on CuPy."""
    array, indices, *rest = args
    axis = rest[0] if rest else kwargs.get("axis")
    if not isinstance(indices, numpy.ndarray) or indices.dtype.kind not in "iu":
        return args
    length = array.size if axis is None else array.shape[axis]
    return (array, indices % length if length else indices, *rest)


class _FakeGpuFunction:
    """A NumPy function or ufunc that unwraps FakeGpuArrays, refuses host arrays, and wraps what it returns.
    Ufunc methods (`xp.add.at`, ...) get the same treatment."""

    def __init__(self, function, name):
        self._function, self._name = function, name

    def __call__(self, *args, **kwargs):
        if isinstance(self._function, numpy.ufunc):
            _refuse_sequences(args, self._name)
            return _to_device(self._function(*_to_raw(args, self._name), **_to_raw(kwargs, self._name)))
        result = _call_like_cupy(self._function, getattr(self._function, "__name__", self._name), args, kwargs)
        if isinstance(result, numpy.random.Generator):  # default_rng(): its draws land on the device
            return _FakeGpuGenerator(result)
        return result

    def __getattr__(self, name):
        if isinstance(self._function, numpy.ufunc):
            method = _ufunc_method(self._function, name)
            return lambda *args, **kwargs: _to_device(method(*_to_raw(args, name), **_to_raw(kwargs, name)))
        return _FakeGpuFunction(getattr(self._function, name), f"{self._name}.{name}")


class _FakeGpuGenerator:
    """cupy.random.Generator's methods only: draws land on the device."""

    def __init__(self, generator):
        self._generator = generator

    def __getattr__(self, name):
        if name not in _CUPY_GENERATOR_METHODS:
            raise AttributeError(f"fakegpu: the device generator has no {name!r}: CuPy's Generator offers "
                                 f"{', '.join(sorted(_CUPY_GENERATOR_METHODS))} (draw on the host for the rest)")
        method = getattr(self._generator, name)
        return lambda *args, **kwargs: _to_device(method(*args, **kwargs))


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
        if name == "asnumpy":
            return lambda array: array.get() if type(array) is FakeGpuArray else numpy.asarray(array)
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
    """The backend new tensors and parameters are created on (at first use: the one MINIMOE_BACKEND names)."""
    return _current or _backend_from_environment()


def set_backend(name):
    """Make `name` ("numpy", "cupy" or "fakegpu"; or "cpu", "gpu") the backend for new tensors; returns the
    previous one. Tensors that already exist stay where they are."""
    global _current
    chosen = backend_named(name)
    try:
        previous = get_backend()
    except (ValueError, BackendUnavailableError):  # MINIMOE_BACKEND names one that cannot run: this overrides it
        previous = _backends["numpy"]
    _current = chosen
    return previous


@contextlib.contextmanager
def use_backend(name):
    """`with use_backend("cupy"): ...` creates new tensors on CuPy inside the block."""
    global _current
    previous, _current = _current, backend_named(name)
    try:
        yield _current
    finally:
        _current = previous


def backend_of(array):
    """The Backend an array belongs to."""
    try:
        return _backend_by_array_type[type(array)]
    except KeyError:
        if isinstance(array, numpy.generic):
            return _backend_by_array_type[numpy.ndarray]
        raise TypeError(f"{type(array).__name__} is not an array of any minimoe backend "
                        "(for a Tensor, pass its array: tensor.data)") from None


def to_host(array):
    """A host NumPy array from an array of any backend (a copy for device arrays; NumPy arrays, lists and numbers
    pass through as they are). The explicit door to the host for code that does not know where its array lives,
    e.g. saving a checkpoint."""
    try:
        return backend_of(array).to_numpy(array)
    except TypeError:
        return array


def get_array_module(array):
    """numpy, cupy or the fakegpu module: whichever library `array` belongs to (DeZero's idiom)."""
    return backend_of(array).xp


# --------------------------------------------------------------------------------------------------------------
# index checks: NumPy raises on an out-of-range index, CuPy wraps it around silently
# --------------------------------------------------------------------------------------------------------------

_debug_checks = os.environ.get("MINIMOE_DEBUG", "") not in ("", "0")


def debug_checks():
    """Whether checks that read device values run (each one is a device->host sync). Off by default; on with the
    environment variable MINIMOE_DEBUG=1 or `set_debug_checks(True)`. Checks on host (NumPy) arrays always run."""
    return _debug_checks


def set_debug_checks(on):
    """Turn the device-side checks on or off; returns the previous setting."""
    global _debug_checks
    previous, _debug_checks = _debug_checks, bool(on)
    return previous


def check_index_range(index, size, what, allow_negative=False):
    """Raise an IndexError naming `what` if an integer index array points outside an axis of `size` entries.

    CuPy's gather and scatter kernels wrap an out-of-range index around (index mod size) where NumPy raises, so
    a bad token id would silently read another row on a GPU. The library therefore checks indices itself: always
    on host arrays (free), and on device arrays when `debug_checks()` is on (reading min and max back is a sync).
    Indices the library makes itself (sampled tokens, top-k, sorting) are in range by construction; token ids
    from the tokenizer are checked on the host before they are uploaded."""
    if index.size == 0 or (backend_of(index).device != "cpu" and not _debug_checks):
        return
    low, high = int(index.min()), int(index.max())
    if high >= size or low < (-size if allow_negative else 0):
        allowed = f"[{-size}, {size})" if allow_negative else f"[0, {size})"
        raise IndexError(f"{what}: indices range over [{low}, {high}] but only {allowed} exist ({size} entries)")


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


class DeviceGenerator:
    """The random generator of a device backend (CuPy, fakegpu), with a state that can be saved.

    CuPy's generators keep their state in device memory and cannot hand it out, so a resumed run could not draw
    the numbers an uninterrupted one would have. This one is counter-based: draw number n comes from a fresh
    device generator seeded with (seed, n), so its whole state is two integers — the seed and how many draws it has
    made — which a checkpoint stores as JSON. (Seeding costs a little per draw: one draw per dropout layer or
    sampling step, never per element; on CuPy the generator is Philox, cheap to seed.) It offers the draws the
    library needs, with CuPy's signatures."""

    def __init__(self, backend_name, seed):
        self.backend_name, self.seed, self.draws = backend_name, [int(s) for s in seed], 0

    def _next(self):
        key = numpy.random.SeedSequence(self.seed + [self.draws]).generate_state(1, numpy.uint32)[0]
        self.draws += 1
        return _backend(self.backend_name).random_generator(int(key))

    def random(self, size=None, dtype="float64"):
        """Uniform [0, 1) numbers of shape `size` on the device."""
        return self._next().random(size, dtype=dtype)

    def standard_normal(self, size=None, dtype="float64"):
        """Normal(0, 1) numbers of shape `size` on the device."""
        return self._next().standard_normal(size, dtype=dtype)

    def integers(self, low, high=None, size=None, dtype="int64"):
        """Integers in [low, high) of shape `size` on the device."""
        return self._next().integers(low, high, size, dtype=dtype)

    @property
    def state(self):
        return {"seed": list(self.seed), "draws": self.draws}

    @state.setter
    def state(self, state):
        self.seed, self.draws = [int(s) for s in state["seed"]], int(state["draws"])


def device_rng(backend=None):
    """The generator that draws dropout masks, gate noise and samples on `backend` (default: the current one):
    NumPy's own Generator on the NumPy backend, a `DeviceGenerator` on CuPy and fakegpu."""
    backend = backend or get_backend()
    if backend.name not in _device_rngs:
        _device_rngs[backend.name] = backend.random_generator([_seed, 1]) if backend.device == "cpu" \
            else DeviceGenerator(backend.name, [_seed, 1])
    return _device_rngs[backend.name]


def random_state():
    """The state of the host generator and of every device generator used so far, as JSON-friendly dicts
    (checkpoints save it so a resumed run draws the same numbers, on every backend)."""
    state = {"seed": _seed, "host": _host_rng.bit_generator.state,
             "numpy": device_rng(_backend("numpy")).bit_generator.state}
    for name, generator in _device_rngs.items():
        if name != "numpy":
            state[name] = generator.state
    return state


def set_random_state(state):
    """Restore what `random_state()` returned (a state saved before device generators were saved restores the
    host and NumPy generators, and starts the device ones from the seed)."""
    manual_seed(state["seed"])
    _host_rng.bit_generator.state = state["host"]
    device_rng(_backend("numpy")).bit_generator.state = state["numpy"]
    for name in ("cupy", "fakegpu"):
        if name in state:
            _device_rngs[name] = DeviceGenerator(name, [_seed, 1])
            _device_rngs[name].state = state[name]


def _backend_from_environment():
    """MINIMOE_BACKEND chooses the backend at first use, not at import: a machine without a GPU can still import
    minimoe with MINIMOE_BACKEND=cupy set, and `set_backend` (or the CLI's --backend) overrides the variable. A bad
    value fails at that first use, naming the variable."""
    global _current
    name = os.environ.get("MINIMOE_BACKEND") or "numpy"
    try:
        _current = backend_named(name)
    except (ValueError, BackendUnavailableError) as error:
        raise type(error)(f"environment variable MINIMOE_BACKEND={name!r}: {error} (set_backend(...) or --backend "
                          "overrides it)") from None
    return _current
