"""Reverse-mode automatic differentiation: the Tensor, and the Function that made it.

A Tensor wraps one backend array (`.data`). Every op is a `Function`: `forward` maps input arrays to an output
array and saves what `backward` will need; `backward` maps the gradient of the loss with respect to the output
to gradients with respect to the inputs (the chain rule, one op at a time).

Calling a Function on tensors records it as the output's `creator`, and the Function keeps its inputs. A
finished computation is therefore a graph, loss -> creator -> inputs -> their creators -> ... -> leaves.
`Tensor.backward()` sorts that graph topologically (iteratively: a 10,000-op chain is fine), then visits each
Function after every Function that used its output, so each receives its whole gradient before passing it on.

The ops themselves live in `minimoe.functional`, which also attaches the operators (`+`, `@`, `.sum()`, ...)
to Tensor. This file is the whole engine.
"""

import functools
import weakref

from . import backend

__all__ = ["Tensor", "Function", "no_grad", "enable_grad", "is_grad_enabled", "ShapeError",
           "tensor", "zeros", "ones", "full", "zeros_like", "ones_like", "arange", "randn", "rand",
           "get_default_dtype", "set_default_dtype"]


class ShapeError(ValueError):
    """An op received shapes it cannot combine. The message names the op and the shapes."""


# --------------------------------------------------------------------------------------------------------------
# gradient mode and default dtype
# --------------------------------------------------------------------------------------------------------------

_grad_enabled = True


def is_grad_enabled():
    return _grad_enabled


class _GradMode:
    enabled = None

    def __enter__(self):
        global _grad_enabled
        self.previous, _grad_enabled = _grad_enabled, self.enabled

    def __exit__(self, *exc):
        global _grad_enabled
        _grad_enabled = self.previous

    def __call__(self, function):
        """As a decorator: every call runs in a block of its own, so a decorated function that calls itself
        restores the right mode on the way out."""
        @functools.wraps(function)
        def in_mode(*args, **kwargs):
            with type(self)():
                return function(*args, **kwargs)

        return in_mode


class no_grad(_GradMode):
    """Inside `with no_grad():` (or a function decorated `@no_grad()`), ops record no graph: no memory is kept
    for backward. Use it for evaluation, generation and optimizer updates."""

    enabled = False


class enable_grad(_GradMode):
    """Turn graph recording back on inside a `no_grad` block."""

    enabled = True


_default_dtype = "float32"


def get_default_dtype():
    """The dtype of new floating-point tensors and parameters ("float32" unless changed)."""
    return _default_dtype


def set_default_dtype(dtype):
    """Set the dtype of new floating-point tensors ("float32" or "float64"); returns the previous one."""
    global _default_dtype
    dtype = str(backend.get_backend().xp.dtype(dtype))
    if dtype not in ("float32", "float64"):
        raise ValueError(f"set_default_dtype: expected float32 or float64, got {dtype}")
    previous, _default_dtype = _default_dtype, dtype
    return previous


# --------------------------------------------------------------------------------------------------------------
# Function: one differentiable op
# --------------------------------------------------------------------------------------------------------------

class Function:
    """One differentiable op. A subclass writes

        forward(self, *arrays)  -> output array       (call self.save(...) for what backward needs)
        backward(self, grad)    -> one gradient per input (or None where an input needs none)

    and is used as `Exp()(x)`; op parameters (an axis, a shape) go to `__init__`. A Function object is one
    node of the graph, so each call makes a new one. Backward may return a gradient in the *broadcast* shape
    of the output: the engine sums it down to each input's shape.

    The backward contract: **never write into `g`**. The engine may hand the same array to several backwards
    (Add returns its g for both inputs), so `g *= 2` would silently change other gradients. Compute a new
    array (`g * 2`) — writing in place into arrays your backward made itself is fine. On NumPy the engine hands
    `g` over read-only, so a backward that breaks the contract raises instead of corrupting gradients.

    The dtype rule: the tensor inputs of an op share one floating dtype (float32 with float64, or an integer
    tensor with a float one, raises: cast with `.astype(...)` first; boolean masks may join in), and an op never
    turns integer inputs into a float result by itself. Numbers (Python's, and NumPy scalars) and integer
    arrays that are not tensors (counts) take the tensor's dtype (`x * 0.5` stays float32).
    """

    __slots__ = ("inputs", "saved", "needs_grad", "retained")
    changes_dtype = False  # True for the one op whose job is to change the dtype (Cast)

    def save(self, *arrays):
        """Keep arrays for backward; they are released as soon as backward has used them."""
        self.saved = arrays

    @property
    def name(self):
        return type(self).__name__.lower()

    def __call__(self, *inputs):
        if getattr(self, "needs_grad", None) is not None:
            raise RuntimeError(f"{self.name}: this {type(self).__name__} object is already a node of a graph. A "
                               f"Function object records one call: make a new one per call, "
                               f"{type(self).__name__}(...)(x)")
        reference = next((x for x in inputs if isinstance(x, Tensor)), None)
        if reference is None:
            raise TypeError(f"{self.name}: needs at least one Tensor input")
        array_type = type(reference.data)
        tensors, arrays = [], []  # a plain loop: this runs for every op, and generators cost microseconds
        for x in inputs:
            if not isinstance(x, Tensor):
                x = _constant_like(x, reference, self.name)
            elif type(x.data) is not array_type:
                raise TypeError(
                    f"{self.name}: inputs live on different backends ({backend.backend_of(reference.data).name} "
                    f"and {backend.backend_of(x.data).name}); move one with .to(...) first")
            tensors.append(x)
            arrays.append(x.data)
        float_dtype = arrays[0].dtype
        for array in arrays:  # the usual case, one dtype, costs a comparison per input
            if array.dtype != float_dtype:
                float_dtype = _common_float_dtype(self.name, tensors)
                break
        else:
            float_dtype = float_dtype if float_dtype.kind == "f" else None
        try:
            output = self.forward(*arrays)
        except ShapeError:
            raise
        except ValueError as error:
            raise ShapeError(f"{self.name}: {error} (input shapes {_shapes(tensors)})") from error
        except (IndexError, TypeError) as error:  # the base class: some subclasses (NumPy's casting errors) take
            kind = IndexError if isinstance(error, IndexError) else TypeError  # other arguments than a message
            raise kind(f"{self.name}: {error} (input shapes {_shapes(tensors)})") from error
        if type(output) is not array_type:
            output = _as_array_like(output, array_type, self.name)
        if float_dtype is None and output.dtype.kind == "f" and not self.changes_dtype:
            raise TypeError(f"{self.name}: got {' and '.join(str(x.dtype) for x in tensors)} input(s), which would "
                            f"silently give a {output.dtype} result; cast first, e.g. x.astype('float32')")

        if not (_grad_enabled and any(x.requires_grad for x in tensors)):
            self.saved = None  # no backward will come: let go of saved arrays now
            return Tensor(output)
        self.inputs, self.needs_grad = tuple(tensors), tuple(x.requires_grad for x in tensors)
        result = Tensor(output, requires_grad=True)
        result.creator = self
        return result

    def release(self):
        """Forget inputs and saved arrays: this part of the graph is done."""
        self.inputs = self.saved = None


def _shapes(tensors):
    return ", ".join(str(x.shape) for x in tensors)


def _common_float_dtype(op_name, tensors):
    """The one floating dtype of inputs of several dtypes (None if none is floating): only boolean masks may join
    a floating dtype; anything else would be promoted silently, and raises."""
    floats = {x.dtype for x in tensors if x.dtype.kind == "f"}
    if not floats:
        return None
    if len(floats) == 1 and all(x.dtype.kind in "fb" for x in tensors):
        return floats.pop()
    raise TypeError(f"{op_name}: inputs of dtypes {', '.join(str(x.dtype) for x in tensors)} would be promoted "
                    "silently (float32 with float64 or with an integer tensor becomes float64); cast them to one "
                    "dtype first, e.g. x.astype('float32')")


def _constant_like(value, reference, op_name):
    """A Python number (or, on NumPy, an array or list) used in an op with tensors becomes a constant on the same
    backend. Numbers — Python's and NumPy's scalars — and integer arrays (counts) take the tensor's float dtype, so
    `x * 0.5`, `x / np.int64(3)` and `x / counts` stay float32; a float array of another precision is not
    converted (the op then refuses to mix dtypes). On a device backend a host array or list is refused, as CuPy
    refuses it: nothing is copied to the device behind your back."""
    xp = backend.get_array_module(reference.data)
    if reference.backend.device != "cpu" and isinstance(value, (backend.numpy.ndarray, list, tuple)):
        raise TypeError(f"{op_name}: a host {type(value).__name__} meets a {reference.backend.name} tensor; nothing "
                        "is copied to the device implicitly (CuPy refuses this too). Move it explicitly: "
                        "minimoe.tensor(value) or get_backend().asarray(value)")
    is_number = isinstance(value, (int, float, backend.numpy.integer, backend.numpy.floating)) \
        and not isinstance(value, bool)
    dtype = reference.dtype if reference.dtype.kind == "f" and is_number else None
    constant = xp.asarray(value, dtype=dtype)
    if reference.dtype.kind == "f" and constant.dtype.kind in "iu":  # counts, ids: exact in the tensor's dtype
        constant = constant.astype(reference.dtype)
    return Tensor(constant)


def _as_array_like(value, array_type, op_name):
    """NumPy returns scalars, not arrays, from reductions and 0-d arithmetic: make them 0-d arrays. Anything
    else is a host array that leaked into a device op, which is a bug in that op."""
    if array_type is backend.NumpyBackend.array_type:
        return backend.numpy.asarray(value)
    raise TypeError(f"{op_name}: produced a {type(value).__name__} from {array_type.__name__} inputs; "
                    "an op must compute with its inputs' array module (get_array_module)")


def _input_grad(function, x, grad):
    """The gradient `function.backward` returned for its input x: checked, then summed down to x's shape."""
    if type(grad) is not type(x.data):
        grad = _as_array_like(grad, type(x.data), f"{function.name}.backward")
    if grad.shape == x.shape:  # the usual case: nothing to check, nothing to sum
        return grad
    if not _broadcasts_to(x.shape, grad.shape):
        raise ShapeError(f"{function.name}.backward: returned a gradient of shape {grad.shape} for an input of "
                         f"shape {x.shape}; it must have the input's shape or the output's broadcast shape")
    return sum_to(grad, x.shape)


def _broadcasts_to(shape, target):
    """Whether an array of `shape` broadcasts to `target` (NumPy's rule: compare sizes from the right)."""
    return len(shape) <= len(target) and all(n in (1, m) for n, m in zip(shape[::-1], target[::-1]))


def sum_to(grad, shape):
    """Undo broadcasting: sum `grad` over the axes that broadcasting added or stretched, down to `shape`."""
    if grad.shape == shape:
        return grad
    lead = grad.ndim - len(shape)
    stretched = tuple(lead + i for i, n in enumerate(shape) if n == 1 and grad.shape[lead + i] != 1)
    return grad.sum(axis=tuple(range(lead)) + stretched, keepdims=True).reshape(shape)


# --------------------------------------------------------------------------------------------------------------
# Tensor
# --------------------------------------------------------------------------------------------------------------

class Tensor:
    """An array that remembers how it was computed, so gradients can flow back through it.

    data          -- the backend array (NumPy or CuPy)
    grad          -- after backward: d(loss)/d(this tensor), an array of the same shape (leaves only)
    requires_grad -- whether gradients should be computed for this tensor
    creator       -- the Function that produced it (None for leaves: inputs and parameters)
    """

    __slots__ = ("data", "grad", "requires_grad", "creator", "__weakref__")
    __array_ufunc__ = None  # numpy_array + tensor calls Tensor.__radd__ instead of looping over the tensor

    def __init__(self, data, requires_grad=False, dtype=None):
        if type(data) not in backend._backend_by_array_type:
            data = _to_backend_array(data, dtype)
        elif dtype is not None and data.dtype != dtype:
            data = data.astype(dtype)
        if requires_grad and data.dtype.kind != "f":
            raise TypeError(f"requires_grad=True needs a floating-point tensor, but this one is {data.dtype}: "
                            "only real-valued tensors have gradients (integer token ids never need one)")
        self.data = data
        self.grad = None
        self.requires_grad = requires_grad
        self.creator = None

    # ---- what it is -------------------------------------------------------------------------------------------
    @property
    def shape(self):
        return self.data.shape

    @property
    def dtype(self):
        return self.data.dtype

    @property
    def ndim(self):
        return self.data.ndim

    @property
    def size(self):
        return self.data.size

    @property
    def backend(self):
        return backend.backend_of(self.data)

    @property
    def device(self):
        return self.backend.device

    @property
    def is_leaf(self):
        return self.creator is None

    def __len__(self):
        return len(self.data)

    def __bool__(self):
        """`if loss < 0.5:` asks for a host value; only a one-element tensor has a single truth value."""
        if self.size != 1:
            raise ValueError(f"the truth value of a tensor of shape {self.shape} is ambiguous: compare a "
                             "one-element tensor (e.g. x.max() > 0), or reduce x.data with .any()/.all()")
        return bool(self.data)

    def __array__(self, dtype=None, copy=None):
        """numpy.asarray(tensor) (plotting, printing) works on NumPy; device tensors refuse, as CuPy arrays
        do: copy them with .numpy()."""
        array = backend.numpy.asarray(self.data, dtype=dtype)
        return array.copy() if copy else array

    def __repr__(self):
        where = "" if self.backend.name == "numpy" else f", backend={self.backend.name!r}"
        grad = ", requires_grad=True" if self.requires_grad else ""
        body = repr(self.backend.to_numpy(self.data)).replace("array(", "").rstrip(")")
        return f"Tensor({body}{grad}{where})"

    __hash__ = object.__hash__  # `==` is elementwise (functional.py); identity stays the hash

    def __setitem__(self, index, value):
        raise TypeError("Tensors in a graph are not modified in place (backward would see the new values). "
                        "Build a new tensor instead, e.g. F.where(mask, value, x) or x.masked_fill(mask, value).")

    def retain_grad(self):
        """Keep this intermediate tensor's gradient in `.grad` at the next backward (by default only leaves get
        one), to look at how the gradient flows through a graph. A no-op on a leaf that requires grad."""
        if not self.requires_grad:
            raise RuntimeError("retain_grad(): this tensor does not require grad, so it will get no gradient")
        if self.creator is not None:
            self.creator.retained = weakref.ref(self)

    # ---- leaving the graph, leaving the device ----------------------------------------------------------------
    def detach(self):
        """The same data as a new leaf that does not require grad: gradients stop here."""
        return Tensor(self.data)

    def item(self):
        """The value of a one-element tensor as a Python number (copies it to the host)."""
        return self.data.item()

    def numpy(self):
        """The data as a host NumPy array (a copy for device tensors, the array itself on NumPy)."""
        return self.backend.to_numpy(self.data)

    def tolist(self):
        return self.numpy().tolist()

    def to(self, where):
        """This tensor on another backend: "cpu"/"numpy", "gpu"/"cupy", or "fakegpu". Gradients do not flow
        across the move: the result is a new leaf (with the same requires_grad)."""
        target = backend.backend_named(where)
        if target is self.backend:
            return self
        return Tensor(target.asarray(self.numpy()), requires_grad=self.requires_grad)

    def to_cpu(self):
        return self.to("cpu")

    def to_gpu(self):
        return self.to("gpu")

    # ---- backward ---------------------------------------------------------------------------------------------
    # Longer than our other functions on purpose: the whole of reverse mode (order, ownership of gradient arrays,
    # accumulation into leaves, releasing the graph) reads best as one loop in one place, as in micrograd.
    def backward(self, grad=None, retain_graph=False):
        """Accumulate d(self)/d(leaf) · grad into the `.grad` of every leaf that requires grad.

        grad         -- the gradient of the final loss with respect to this tensor; may be omitted for a
                        one-element tensor (then it is 1)
        retain_graph -- keep the graph for another backward; by default each op's saved arrays are released
                        as soon as its backward has run, so a training loop's memory stays flat
        """
        if not self.requires_grad:
            raise RuntimeError("backward(): this tensor does not require grad, so there is nothing to "
                               "differentiate. Was it computed under no_grad(), or from tensors none of which "
                               "has requires_grad=True?")
        xp = backend.get_array_module(self.data)
        if grad is None:
            if self.size != 1:
                raise RuntimeError(f"backward() without a gradient needs a one-element tensor (a loss), but this "
                                   f"one has shape {self.shape}. Pass backward(grad) with a gradient of that shape.")
            grad = xp.ones_like(self.data)
        else:
            if isinstance(grad, Tensor):
                if grad.backend is not self.backend:
                    raise TypeError(f"backward: the gradient lives on {grad.backend.name}, this tensor on "
                                    f"{self.backend.name}; move it with .to({self.backend.name!r}) first")
                grad = grad.data
            elif self.device != "cpu" and type(grad) is not self.backend.array_type:
                raise TypeError(f"backward: the gradient is a host {type(grad).__name__}, this tensor lives on "
                                f"{self.backend.name}; nothing is copied to the device implicitly: pass "
                                "minimoe.tensor(grad) (or an array of the tensor's backend)")
            grad = xp.asarray(grad, dtype=self.dtype)
            if grad.shape != self.shape:
                raise ShapeError(f"backward: gradient of shape {grad.shape} for a tensor of shape {self.shape}")

        if self.creator is None:
            _accumulate(self, grad)
            return
        if type(grad) is backend.numpy.ndarray:
            grad = grad.view()  # the engine marks the gradients it hands to backwards read-only: not the caller's
        grads = {self.creator: grad}  # Function -> gradient of its output, summed over all its uses
        owned = set()  # Functions whose gradient in grads is an array this engine made: no one else holds it,
        #                so adding into it in place (+=) is safe
        for function in reversed(_topological_order(self.creator)):
            output_grad = grads.pop(function, None)
            if output_grad is not None:
                retained = getattr(function, "retained", None)
                if retained is not None and retained() is not None:  # an output that asked for retain_grad()
                    _accumulate(retained(), output_grad)
                input_grads = _call_backward(function, output_grad)
                if not isinstance(input_grads, tuple):
                    input_grads = (input_grads,)
                if len(input_grads) != len(function.inputs):
                    raise TypeError(f"{function.name}.backward returned {len(input_grads)} gradients for "
                                    f"{len(function.inputs)} inputs; return one per input (None for no gradient)")
                for x, x_grad in zip(function.inputs, input_grads):
                    if x_grad is None or not x.requires_grad:
                        continue
                    x_grad = _input_grad(function, x, x_grad)
                    if x.creator is None:
                        _accumulate(x, x_grad)
                    elif x.creator in owned:
                        grads[x.creator] += x_grad
                    elif x.creator in grads:  # a backward may return its g itself (Add does): never add into it
                        grads[x.creator] = grads[x.creator] + x_grad
                        owned.add(x.creator)
                    else:
                        grads[x.creator] = x_grad
            if not retain_graph:
                function.release()


def _call_backward(function, g):
    """function.backward(g), keeping the contract "never write into g": on NumPy, g is handed over read-only
    (CuPy arrays have no such flag; the NumPy tests catch a backward that breaks it). Every g here is the engine's
    own array, or a view of one (the caller's gradient is wrapped in a view first), so no one else's flag changes."""
    if type(g) is backend.numpy.ndarray:
        g.flags.writeable = False
    try:
        return function.backward(g)
    except ValueError as error:
        if "read-only" not in str(error):
            raise
        raise RuntimeError(f"{function.name}.backward wrote into its upstream gradient g ({error}). A backward "
                           "must never modify g: other gradients may share its memory. Compute a new array "
                           "instead (g * 2, not g *= 2).") from error


def _accumulate(leaf, grad):
    """leaf.grad += grad. The first gradient is copied so that no two `.grad`s ever share memory."""
    if leaf.grad is None:
        leaf.grad = grad.astype(leaf.dtype, copy=True)
    else:
        leaf.grad += grad


def _topological_order(root):
    """Functions reachable from `root`, each after all the Functions that produced its inputs.
    An explicit stack instead of recursion, so deep graphs cannot hit Python's recursion limit."""
    order, visited, stack = [], set(), [(root, False)]
    while stack:
        function, inputs_done = stack.pop()
        if inputs_done:
            order.append(function)
            continue
        if function in visited:
            continue
        if function.inputs is None:
            raise RuntimeError("backward through a graph that has already been freed: the first backward released "
                               "its saved arrays. Call backward(retain_graph=True) the first time if you need "
                               "a second pass, or recompute the forward.")
        visited.add(function)
        stack.append((function, True))
        for x in function.inputs:
            if x.creator is not None and x.creator not in visited:
                stack.append((x.creator, False))
    return order


# --------------------------------------------------------------------------------------------------------------
# making tensors
# --------------------------------------------------------------------------------------------------------------

def _to_backend_array(data, dtype):
    """Host data (list, number, NumPy array) -> an array of the current backend. Python floats take the default
    dtype; NumPy arrays keep theirs unless `dtype` says otherwise."""
    current = backend.get_backend()
    if isinstance(data, Tensor):
        data = data.data
    if not hasattr(data, "dtype"):
        probe = _numeric_probe(data)
        dtype = dtype or (_default_dtype if probe.dtype.kind == "f" else None)
    elif data.dtype.kind not in "biuf":
        raise TypeError(f"tensor: expected numbers (bool, int or float), got an array of dtype {data.dtype}")
    if type(data) in backend._backend_by_array_type and type(data) is not current.array_type:
        data = backend.backend_of(data).to_numpy(data)
    return current.asarray(data, dtype=dtype)


def _numeric_probe(data):
    """Host data as a NumPy array, to read its kind; anything that is not numbers (text, None, ragged lists)
    raises a TypeError naming what was given."""
    try:
        probe = backend.numpy.asarray(data)
    except ValueError as error:  # ragged nested lists
        raise TypeError(f"tensor: cannot make a tensor from {type(data).__name__} data ({error})") from None
    if probe.dtype.kind not in "biuf":
        raise TypeError(f"tensor: expected numbers (bool, int or float) or nested lists of them, got "
                        f"{type(data).__name__} {_short(data)} (NumPy reads it as {probe.dtype})")
    return probe


def _short(data):
    text = repr(data)
    return text if len(text) <= 40 else text[:37] + "..."


def tensor(data, requires_grad=False, dtype=None):
    """A new leaf tensor on the current backend from a list, number or array (always a copy of `data`)."""
    return Tensor(_to_backend_array(data, dtype), requires_grad=requires_grad)


def _filled(fill, shape, dtype, requires_grad):
    xp = backend.get_backend().xp
    return Tensor(fill(xp, shape, dtype or _default_dtype), requires_grad=requires_grad)


def zeros(*shape, dtype=None, requires_grad=False):
    return _filled(lambda xp, s, d: xp.zeros(s, dtype=d), _shape_arg(shape), dtype, requires_grad)


def ones(*shape, dtype=None, requires_grad=False):
    return _filled(lambda xp, s, d: xp.ones(s, dtype=d), _shape_arg(shape), dtype, requires_grad)


def full(shape, value, dtype=None, requires_grad=False):
    return _filled(lambda xp, s, d: xp.full(s, value, dtype=d), _shape_arg((shape,)), dtype, requires_grad)


def zeros_like(x, requires_grad=False):
    return Tensor(backend.get_array_module(x.data).zeros_like(x.data), requires_grad=requires_grad)


def ones_like(x, requires_grad=False):
    return Tensor(backend.get_array_module(x.data).ones_like(x.data), requires_grad=requires_grad)


def arange(*args, dtype=None):
    """Like numpy.arange; integer arguments give an int64 tensor."""
    return Tensor(backend.get_backend().xp.arange(*args, dtype=dtype))


def randn(*shape, std=1.0, dtype=None, requires_grad=False):
    """Normal(0, std²) samples, drawn on the host from the seeded generator (`minimoe.manual_seed`), so the
    same seed gives the same numbers on every backend."""
    values = backend.host_rng().standard_normal(_shape_arg(shape)) * std
    return tensor(values, dtype=dtype or _default_dtype, requires_grad=requires_grad)


def rand(*shape, dtype=None, requires_grad=False):
    """Uniform[0, 1) samples from the seeded host generator."""
    values = backend.host_rng().random(_shape_arg(shape))
    return tensor(values, dtype=dtype or _default_dtype, requires_grad=requires_grad)


def _shape_arg(shape):
    """Accept both zeros(2, 3) and zeros((2, 3))."""
    if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
        return tuple(shape[0])
    return tuple(shape)
