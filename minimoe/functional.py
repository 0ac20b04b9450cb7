"""The ops: each a Function with its forward and its backward side by side, and its lowercase function right
under it (class Exp, then def exp).

Import as `import minimoe.functional as F`. Every forward computes with the array module of its inputs
(`xp = get_array_module(x)`), so the same line runs on NumPy and CuPy. Every backward receives `g`, the
gradient of the loss with respect to the op's output, and returns the gradient with respect to each input.
Where an op is fused or works in place for speed, its plain version, composed of ordinary ops, sits right after
it with the suffix `_plain` (`softmax_plain`), and a comment gives the plain expression of each in-place chain.

Notation in the docstrings: y is the output, g = dL/dy the incoming gradient, ⊙ the elementwise product.
Tie rules: `max` splits the gradient equally among tied maxima (like torch.amax); `maximum`/`minimum` give
half to each side of a tie (like torch); `topk` keeps the lower index first among equal values.

Contents, in the order a student meets them:
    0. the Tensor's operators    x + y is add(x, y), x.sum() is sum(x), ...: the table, and comparisons
    1. elementwise               Add Sub Mul Div Neg Pow Maximum Minimum Clip, Exp Log Sqrt Tanh, Cast
    2. reductions                Reduction (their base): Sum Mean Max Var LogSumExp
    3. shapes                    Reshape Permute (transpose) BroadcastTo
    4. indexing and joining      GetItem TakeAlongAxis (gather) IndexAdd Concatenate Stack split Where
                                 (masked_fill) topk (topk_indices)
    5. linear algebra            Matmul Linear
    6. activations               Sigmoid Relu Silu Swiglu Gelu; Softmax LogSoftmax, with shifted_exp, the
                                 stable softmax kernel every op here shares
    7. losses                    CrossEntropy
    8. layers' ops               Embedding RMSNorm LayerNorm Dropout
    9. attention                 ScaledDotProductAttention
"""

import builtins
import itertools
import math

from .autograd import Function, ShapeError, Tensor, sum_to
from .backend import backend_of, check_index_range, device_rng, get_array_module

__all__ = [
    "add", "sub", "mul", "div", "neg", "pow", "maximum", "minimum", "clip", "exp", "log", "sqrt", "tanh", "cast",
    "sum", "mean", "max", "var", "logsumexp",
    "reshape", "permute", "transpose", "broadcast_to",
    "getitem", "take_along_axis", "gather", "index_add", "concatenate", "stack", "split", "where", "masked_fill",
    "topk", "topk_indices",
    "matmul", "linear",
    "sigmoid", "sigmoid_plain", "relu", "silu", "silu_plain", "swiglu", "swiglu_plain", "gelu",
    "shifted_exp", "softmax", "softmax_plain", "log_softmax",
    "cross_entropy",
    "embedding", "rms_norm", "layer_norm", "dropout",
    "scaled_dot_product_attention",
]


def _axes(axis, ndim):
    """Normalise an axis argument (None, int or tuple, possibly negative) to a sorted tuple of axes."""
    if axis is None:
        return tuple(range(ndim))
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    for a in axes:
        if not -builtins.max(ndim, 1) <= a < builtins.max(ndim, 1):
            raise ShapeError(f"axis {a} is out of range for a tensor with {ndim} dimensions")
    return tuple(sorted(a % ndim for a in axes)) if ndim else ()  # a 0-d tensor reduces over no axis


def _reduced_count(shape, axes):
    return math.prod(shape[a] for a in axes)


def _row_dot(a, b):
    """Σᵢ aᵢ bᵢ over the last axis, kept as an axis of size 1: (..., C), (..., C) -> (..., 1). einsum makes the
    products and the sum in one pass, without an (..., C) temporary for a ⊙ b (and NumPy's .sum() is slow on
    many short rows)."""
    return get_array_module(a).einsum("...i,...i->...", a, b)[..., None]


def _raw(value):
    """Tensor -> its array; lists -> arrays are left to the op's array module."""
    return value.data if isinstance(value, Tensor) else value


# ==============================================================================================================
# 0. the Tensor's operators: x + y calls add(x, y), x.sum() calls sum(x); the file's last line installs them
# ==============================================================================================================

def _install_tensor_methods():
    """Give Tensor its operators and methods. They live here, beside the ops, so that autograd.py stays the
    engine alone."""
    import operator

    swap = lambda f: lambda a, b: f(b, a)  # noqa: E731  (reflected operators: 2 - x is sub(2, x))
    methods = {
        "__add__": add, "__radd__": swap(add), "__sub__": sub, "__rsub__": swap(sub),
        "__mul__": mul, "__rmul__": swap(mul), "__truediv__": div, "__rtruediv__": swap(div),
        "__neg__": neg, "__pow__": pow, "__rpow__": swap(pow), "__matmul__": matmul, "__rmatmul__": swap(matmul),
        "__getitem__": getitem,
        "__lt__": _comparison(operator.lt), "__le__": _comparison(operator.le),
        "__gt__": _comparison(operator.gt), "__ge__": _comparison(operator.ge),
        "__eq__": _comparison(operator.eq), "__ne__": _comparison(operator.ne),
        "__and__": _comparison(operator.and_), "__or__": _comparison(operator.or_),
        "__invert__": lambda a: Tensor(~a.data),
        "sum": sum, "mean": mean, "max": max, "var": var, "logsumexp": logsumexp,
        "exp": exp, "log": log, "sqrt": sqrt, "tanh": tanh, "sigmoid": sigmoid, "relu": relu,
        "softmax": softmax, "log_softmax": log_softmax, "masked_fill": masked_fill, "clip": clip,
        "reshape": reshape, "permute": permute, "transpose": transpose, "broadcast_to": broadcast_to,
        "astype": cast,
        "unsqueeze": lambda x, axis: reshape(x, _unsqueezed_shape(x.shape, axis)),
        "squeeze": lambda x, axis: reshape(x, x.shape[:axis % x.ndim] + x.shape[axis % x.ndim + 1:]),
        "flatten": lambda x: reshape(x, (-1,)),
    }
    for name, method in methods.items():
        setattr(Tensor, name, method)


def _comparison(op):
    """x < y, x == y, ...: boolean tensors outside the graph (a comparison has no gradient)."""
    def compare(a, b):
        b = _raw(b)
        return Tensor(op(a.data, b))

    return compare


def _unsqueezed_shape(shape, axis):
    axis = axis % (len(shape) + 1)
    return shape[:axis] + (1,) + shape[axis:]


# ==============================================================================================================
# 1. elementwise (broadcasting: backward may return the output's shape; the engine sums it down)
# ==============================================================================================================

class Add(Function):
    """y = a + b;   dL/da = g,   dL/db = g."""

    def forward(self, a, b):
        return a + b

    def backward(self, g):
        return g, g


def add(a, b):
    return Add()(a, b)


class Sub(Function):
    """y = a - b;   dL/da = g,   dL/db = -g."""

    def forward(self, a, b):
        return a - b

    def backward(self, g):
        return g, -g


def sub(a, b):
    return Sub()(a, b)


class Mul(Function):
    """y = a ⊙ b;   dL/da = g ⊙ b,   dL/db = g ⊙ a."""

    def forward(self, a, b):
        self.save(a, b)
        return a * b

    def backward(self, g):
        a, b = self.saved
        return g * b, g * a


def mul(a, b):
    return Mul()(a, b)


class Div(Function):
    """y = a / b;   dL/da = g / b,   dL/db = -g ⊙ a / b²."""

    def forward(self, a, b):
        self.save(a, b)
        return a / b

    def backward(self, g):
        a, b = self.saved
        ga = g / b
        return ga, (-ga * a / b if self.needs_grad[1] else None)


def div(a, b):
    return Div()(a, b)


class Neg(Function):
    """y = -x;   dL/dx = -g."""

    def forward(self, x):
        return -x

    def backward(self, g):
        return -g


def neg(x):
    return Neg()(x)


class Pow(Function):
    """y = x ** p;   dL/dx = g ⊙ p x^(p-1),   dL/dp = g ⊙ y ln x."""

    def forward(self, x, p):
        y = x ** p
        self.save(x, p, y)
        return y

    def backward(self, g):
        x, p, y = self.saved
        xp = get_array_module(x)
        gx = g * p * x ** (p - 1) if self.needs_grad[0] else None
        gp = g * y * xp.log(x) if self.needs_grad[1] else None
        return gx, gp


def pow(x, p):
    return Pow()(x, p)


class Maximum(Function):
    """y = max(a, b) elementwise; the gradient goes to the larger input (half to each on a tie)."""

    def forward(self, a, b):
        self.save(a, b)
        return get_array_module(a).maximum(a, b)

    def backward(self, g):
        a, b = self.saved
        share_a = (a > b) + (a == b) * g.dtype.type(0.5)  # in g's dtype: a Python 0.5 would make it float64
        return g * share_a, g * (1 - share_a)


def maximum(a, b):
    return Maximum()(a, b)


class Minimum(Function):
    """y = min(a, b) elementwise; the gradient goes to the smaller input (half to each on a tie)."""

    def forward(self, a, b):
        self.save(a, b)
        return get_array_module(a).minimum(a, b)

    def backward(self, g):
        a, b = self.saved
        share_a = (a < b) + (a == b) * g.dtype.type(0.5)  # in g's dtype: a Python 0.5 would make it float64
        return g * share_a, g * (1 - share_a)


def minimum(a, b):
    return Minimum()(a, b)


class Clip(Function):
    """y = min(max(x, low), high);   dL/dx = g where low ≤ x ≤ high, else 0 (as torch.clamp)."""

    def __init__(self, low, high):
        self.low, self.high = low, high

    def forward(self, x):
        self.save(x)
        return get_array_module(x).clip(x, self.low, self.high)

    def backward(self, g):
        (x,) = self.saved
        inside = get_array_module(x).ones(x.shape, dtype=bool)
        if self.low is not None:
            inside &= x >= self.low
        if self.high is not None:
            inside &= x <= self.high
        return g * inside


def clip(x, low=None, high=None):
    """Clamp x to [low, high] (either bound may be None)."""
    return Clip(low, high)(x)


class Exp(Function):
    """y = eˣ;   dL/dx = g ⊙ y."""

    def forward(self, x):
        y = get_array_module(x).exp(x)
        self.save(y)
        return y

    def backward(self, g):
        (y,) = self.saved
        return g * y


def exp(x):
    return Exp()(x)


class Log(Function):
    """y = ln x;   dL/dx = g / x."""

    def forward(self, x):
        self.save(x)
        return get_array_module(x).log(x)

    def backward(self, g):
        (x,) = self.saved
        return g / x


def log(x):
    return Log()(x)


class Sqrt(Function):
    """y = √x;   dL/dx = g / (2y)."""

    def forward(self, x):
        y = get_array_module(x).sqrt(x)
        self.save(y)
        return y

    def backward(self, g):
        (y,) = self.saved
        return g / (2 * y)


def sqrt(x):
    return Sqrt()(x)


class Tanh(Function):
    """y = tanh x;   dL/dx = g ⊙ (1 - y²)."""

    def forward(self, x):
        y = get_array_module(x).tanh(x)
        self.save(y)
        return y

    def backward(self, g):
        (y,) = self.saved
        return g * (1 - y * y)


def tanh(x):
    return Tanh()(x)


class Cast(Function):
    """y = x as another dtype;   dL/dx = g cast back to x's dtype."""

    changes_dtype = True

    def __init__(self, dtype):
        self.dtype = dtype

    def forward(self, x):
        self.save(x.dtype)
        return x.astype(self.dtype)

    def backward(self, g):
        (dtype,) = self.saved
        return g.astype(dtype)


def cast(x, dtype):
    return Cast(dtype)(x)


# ==============================================================================================================
# 2. reductions
# ==============================================================================================================

class Reduction(Function):
    """What the five reductions share: `axis` (None for every axis, an int or a tuple; negative counts from the
    end) and `keepdims`. forward calls `self.reduce_axes(x)` first; backward puts the reduced axes back with
    `self.expand(g)`, so that g broadcasts against the input."""

    def __init__(self, axis=None, keepdims=False):
        self.axis, self.keepdims = axis, keepdims

    def reduce_axes(self, x):
        """The axes of x this reduction removes, as a sorted tuple of non-negative ints (kept as self.axes)."""
        self.axes = _axes(self.axis, x.ndim)
        return self.axes

    def expand(self, g):
        """g with the reduced axes put back with size 1 (they already are with keepdims)."""
        return g if self.keepdims else get_array_module(g).expand_dims(g, self.axes)

    def drop_kept(self, y, shape):
        """y, computed with keepdims=True from an input of `shape`, without the reduced axes unless keepdims."""
        return y if self.keepdims else y.reshape(tuple(n for i, n in enumerate(shape) if i not in self.axes))


class Sum(Reduction):
    """y = Σ over `axis` of x;   dL/dx = g broadcast back over the summed axes."""

    def forward(self, x):
        axes = self.reduce_axes(x)
        self.save(x.shape)
        return x.sum(axis=axes, keepdims=self.keepdims)

    def backward(self, g):
        (shape,) = self.saved
        return get_array_module(g).broadcast_to(self.expand(g), shape)


def sum(x, axis=None, keepdims=False):
    return Sum(axis, keepdims)(x)


class Mean(Reduction):
    """y = (1/n) Σ over `axis` of x;   dL/dx = g / n broadcast back (n = number of elements averaged)."""

    def forward(self, x):
        axes = self.reduce_axes(x)
        self.save(x.shape)
        return x.mean(axis=axes, keepdims=self.keepdims)

    def backward(self, g):
        (shape,) = self.saved
        g = self.expand(g) * (1 / _reduced_count(shape, self.axes))
        return get_array_module(g).broadcast_to(g, shape)


def mean(x, axis=None, keepdims=False):
    return Mean(axis, keepdims)(x)


class Max(Reduction):
    """y = max over `axis` of x;   dL/dx = g at the maximum (split equally among tied maxima), 0 elsewhere."""

    def forward(self, x):
        y = x.max(axis=self.reduce_axes(x), keepdims=True)
        self.save(x, y)
        return self.drop_kept(y, x.shape)

    def backward(self, g):
        x, y = self.saved
        is_max = x == y
        ties = is_max.sum(axis=self.axes, keepdims=True, dtype=g.dtype)  # in g's dtype: an integer count upcasts
        return self.expand(g) * is_max / ties


def max(x, axis=None, keepdims=False):
    return Max(axis, keepdims)(x)


class Var(Reduction):
    """y = Σ (x - x̄)² / (n - correction) over `axis` (correction=1: unbiased, torch's default; 0: population).
    dL/dx = g ⊙ 2 (x - x̄) / (n - correction)."""

    def __init__(self, axis, keepdims, correction):
        super().__init__(axis, keepdims)
        self.correction = correction

    def forward(self, x):
        axes = self.reduce_axes(x)
        centered = x - x.mean(axis=axes, keepdims=True)
        denominator = _reduced_count(x.shape, axes) - self.correction
        self.save(centered, denominator)
        return (centered * centered).sum(axis=axes, keepdims=self.keepdims) / denominator

    def backward(self, g):
        centered, denominator = self.saved
        return self.expand(g) * centered * (2 / denominator)


def var(x, axis=None, keepdims=False, correction=1):
    return Var(axis, keepdims, correction)(x)


class LogSumExp(Reduction):
    """y = log Σ exp(x) over `axis`, computed as m + log Σ exp(x - m) with m = max x (no overflow).
    dL/dx = g ⊙ softmax(x)."""

    def forward(self, x):
        e, total, m = shifted_exp(x, self.reduce_axes(x))
        e /= total  # softmax(x), what backward needs
        self.save(e)
        return self.drop_kept(m + get_array_module(x).log(total), x.shape)

    def backward(self, g):
        (probabilities,) = self.saved
        return self.expand(g) * probabilities


def logsumexp(x, axis=-1, keepdims=False):
    return LogSumExp(axis, keepdims)(x)


# ==============================================================================================================
# 3. shapes
# ==============================================================================================================

class Reshape(Function):
    """y = x with a new shape (same elements, same order);   dL/dx = g reshaped back."""

    def __init__(self, shape):
        self.shape = shape

    def forward(self, x):
        self.save(x.shape)
        return x.reshape(self.shape)

    def backward(self, g):
        (shape,) = self.saved
        return g.reshape(shape)


def reshape(x, *shape):
    shape = shape[0] if len(shape) == 1 and isinstance(shape[0], (tuple, list)) else shape
    return Reshape(tuple(shape))(x)


class Permute(Function):
    """y = x with its axes reordered (y.shape[i] = x.shape[axes[i]]);   dL/dx = g with the inverse order."""

    def __init__(self, axes):
        self.axes = axes

    def forward(self, x):
        if sorted(a % x.ndim for a in self.axes) != list(range(x.ndim)):
            raise ShapeError(f"permute: {self.axes} is not an ordering of the {x.ndim} axes of shape {x.shape}")
        return x.transpose(self.axes)

    def backward(self, g):
        inverse = sorted(range(len(self.axes)), key=lambda i: self.axes[i] % len(self.axes))
        return g.transpose(inverse)


def permute(x, *axes):
    axes = axes[0] if len(axes) == 1 and isinstance(axes[0], (tuple, list)) else axes
    return Permute(tuple(axes))(x)


def transpose(x, axis0=-2, axis1=-1):
    """Swap two axes (torch's transpose(dim0, dim1)); by default the last two."""
    axes = list(range(x.ndim))
    axes[axis0], axes[axis1] = axes[axis1], axes[axis0]
    return Permute(tuple(axes))(x)


class BroadcastTo(Function):
    """y = x broadcast to `shape`;   dL/dx = g summed back down (the engine does it)."""

    def __init__(self, shape):
        self.shape = shape

    def forward(self, x):
        return get_array_module(x).broadcast_to(x, self.shape)

    def backward(self, g):
        return g


def broadcast_to(x, shape):
    return BroadcastTo(tuple(shape))(x)


# ==============================================================================================================
# 4. indexing and joining
# ==============================================================================================================

def _is_basic_index(index):
    """Slices, integers, None and Ellipsis never select an element twice; nor do boolean masks."""
    parts = index if isinstance(index, tuple) else (index,)
    return all(p is None or p is Ellipsis or isinstance(p, (int, slice))
               or (hasattr(p, "dtype") and p.dtype.kind == "b") for p in parts)


def _is_row_index(index):
    """One 1-D array of integers: x[ids] picks whole rows of x."""
    return getattr(index, "ndim", None) == 1 and index.dtype.kind in "iu"


class GetItem(Function):
    """y = x[index] (basic or advanced indexing).
    dL/dx = zeros with g written (basic) or scatter-added (advanced: a repeated index collects every copy's
    gradient) at the indexed positions."""

    def __init__(self, index):
        self.index = index

    def forward(self, x):
        if _is_row_index(self.index):
            check_index_range(self.index, x.shape[0], "getitem", allow_negative=True)
        self.save(x.shape, x.dtype)
        return x[self.index]

    def backward(self, g):
        shape, dtype = self.saved
        if _is_row_index(self.index):  # x[ids]: each row of g summed into the row it was taken from
            return backend_of(g).scatter_sum(g, self.index, shape[0])
        xp = get_array_module(g)
        gx = xp.zeros(shape, dtype=dtype)
        if _is_basic_index(self.index):
            gx[self.index] = g
        else:
            xp.add.at(gx, self.index, g)
        return gx

    def release(self):
        super().release()
        self.index = None  # index arrays can be as large as the data


def getitem(x, index):
    """x[index]; `index` may hold ints, slices, None, Ellipsis, lists, arrays and integer/boolean tensors."""
    xp = get_array_module(x.data)

    def convert(part):
        part = _raw(part)
        return xp.asarray(part) if isinstance(part, list) else part

    index = tuple(convert(p) for p in index) if isinstance(index, tuple) else convert(index)
    return GetItem(index)(x)


def _along_axis_index(indices, axis, shape):
    """The full index tuple that makes x[tuple] equal take_along_axis(x, indices, axis)."""
    xp = get_array_module(indices)
    ndim = len(shape)
    grids = [xp.arange(n).reshape((1,) * d + (n,) + (1,) * (ndim - d - 1)) for d, n in enumerate(shape)]
    grids[axis] = indices
    return tuple(grids)


class TakeAlongAxis(Function):
    """y = take_along_axis(x, indices, axis): y[..., j, ...] = x[..., indices[..., j, ...], ...].
    dL/dx = zeros with g scatter-added at the taken positions (repeated indices accumulate)."""

    def __init__(self, indices, axis):
        self.indices, self.axis = indices, axis

    def forward(self, x):
        if self.indices.ndim != x.ndim:
            raise ShapeError(f"take_along_axis: indices of shape {self.indices.shape} need as many dimensions as "
                             f"the input of shape {x.shape}")
        check_index_range(self.indices, x.shape[self.axis], "take_along_axis", allow_negative=True)
        self.save(x.shape, x.dtype)
        return get_array_module(x).take_along_axis(x, self.indices, axis=self.axis)

    def backward(self, g):
        shape, dtype = self.saved
        xp = get_array_module(g)
        gx = xp.zeros(shape, dtype=dtype)
        xp.add.at(gx, _along_axis_index(self.indices, self.axis % len(shape), shape), g)
        return gx

    def release(self):
        super().release()
        self.indices = None


def take_along_axis(x, indices, axis):
    """Like numpy.take_along_axis; differentiable in x (indices are integers)."""
    return TakeAlongAxis(_raw(indices), axis)(x)


def gather(x, axis, indices):
    """torch.gather's argument order; the same as take_along_axis when `indices` has x's shape outside `axis`."""
    return take_along_axis(x, indices, axis)


class IndexAdd(Function):
    """y = x, then y[index[i]] += source[i] along axis 0 (repeated indices accumulate).
    dL/dx = g,   dL/dsource = g[index].   This is the 'combine' of a Mixture-of-Experts layer."""

    def __init__(self, index):
        self.index = index

    def forward(self, x, source):
        if source.shape[1:] != x.shape[1:] or source.shape[0] != self.index.shape[0]:
            raise ShapeError(f"index_add: source {source.shape} must be (len(index)={self.index.shape[0]},) + "
                             f"{x.shape[1:]} to add into {x.shape}")
        check_index_range(self.index, x.shape[0], "index_add", allow_negative=True)
        return x + backend_of(x).scatter_sum(source, self.index, x.shape[0])

    def backward(self, g):
        return g, (g[self.index] if self.needs_grad[1] else None)

    def release(self):
        super().release()
        self.index = None


def index_add(x, index, source):
    """x with source[i] added to row index[i] (axis 0); repeated indices accumulate."""
    return IndexAdd(_raw(index))(x, source)


class Concatenate(Function):
    """y = the inputs joined along `axis`;   dL/dxᵢ = the slice of g that xᵢ became."""

    def __init__(self, axis):
        self.axis = axis

    def forward(self, *xs):
        self.save(list(itertools.accumulate(x.shape[self.axis] for x in xs))[:-1])
        return get_array_module(xs[0]).concatenate(xs, axis=self.axis)

    def backward(self, g):
        (boundaries,) = self.saved
        return tuple(get_array_module(g).split(g, boundaries, axis=self.axis))


def concatenate(tensors, axis=0):
    return Concatenate(axis)(*tensors)


class Stack(Function):
    """y = the inputs stacked along a new `axis`;   dL/dxᵢ = g taken at position i of that axis."""

    def __init__(self, axis):
        self.axis = axis

    def forward(self, *xs):
        return get_array_module(xs[0]).stack(xs, axis=self.axis)

    def backward(self, g):
        return tuple(get_array_module(g).moveaxis(g, self.axis, 0))


def stack(tensors, axis=0):
    return Stack(axis)(*tensors)


def split(x, sizes, axis=-1):
    """Split along `axis` into pieces of the given sizes (an int: equal pieces of that size). Each piece is a
    slice of x, so the gradient of each flows back into its own part of x."""
    length = x.shape[axis]
    if isinstance(sizes, int):
        if length % sizes:
            raise ShapeError(f"split: axis {axis} of shape {x.shape} does not divide into pieces of {sizes}")
        sizes = [sizes] * (length // sizes)
    if builtins.sum(sizes) != length:
        raise ShapeError(f"split: sizes {list(sizes)} add up to {builtins.sum(sizes)}, not {length} "
                         f"(axis {axis} of shape {x.shape})")
    lead = (slice(None),) * (axis % x.ndim)
    pieces, start = [], 0
    for size in sizes:
        pieces.append(getitem(x, lead + (slice(start, start + size),)))
        start += size
    return pieces


class Where(Function):
    """y = a where condition else b;   dL/da = g where condition,   dL/db = g elsewhere."""

    def __init__(self, condition):
        self.condition = condition

    def forward(self, a, b):
        return get_array_module(a).where(self.condition, a, b)

    def backward(self, g):
        zero = get_array_module(g).zeros((), dtype=g.dtype)
        xp = get_array_module(g)
        return xp.where(self.condition, g, zero), xp.where(self.condition, zero, g)

    def release(self):
        super().release()
        self.condition = None


def where(condition, a, b):
    """a where condition else b, elementwise with broadcasting; a or b may be Python numbers."""
    return Where(_raw(condition))(a, b)


def masked_fill(x, mask, value):
    """x with `value` wherever mask is True."""
    return Where(_raw(mask))(value, x)


def topk_indices(x, k):
    """Indices of the k largest entries along the last axis of a raw array, largest first: (..., n) -> (..., k).
    Shared by `topk` and the MoE gate. k rounds of argmax, each hiding the entry it took: O(k·n), faster than a
    sort for the few experts a token picks, and largest first by construction. Ties go to the lower index (argmax
    takes the first maximum), as a stable sort would; -inf entries come after every finite one."""
    xp = get_array_module(x)
    choice = x.astype(xp.float64) if x.dtype.kind != "f" else x
    choice = xp.maximum(choice, xp.finfo(choice.dtype).min)  # a copy where -inf ranks above the entries taken
    rows = choice.reshape(-1, x.shape[-1])  # (N, n)
    row = xp.arange(rows.shape[0])
    best = xp.empty((rows.shape[0], k), dtype=row.dtype)  # (N, k)
    for i in range(k):
        best[:, i] = rows.argmax(axis=-1)
        rows[row, best[:, i]] = -xp.inf  # taken: the next round finds the next best
    return best.reshape(x.shape[:-1] + (k,))


def topk(x, k, axis=-1):
    """The k largest entries along `axis`, largest first, and their integer indices.
    Returns (values, indices): values is differentiable (a take_along_axis of x); indices is an integer tensor.
    Ties: among equal values the lower index comes first (see topk_indices)."""
    if not 0 < k <= x.shape[axis]:
        raise ShapeError(f"topk: k={k} but axis {axis} of shape {x.shape} has {x.shape[axis]} entries")
    xp = get_array_module(x.data)
    indices = xp.moveaxis(topk_indices(xp.moveaxis(x.data, axis, -1), k), -1, axis)
    return take_along_axis(x, indices, axis), Tensor(indices)


# ==============================================================================================================
# 5. linear algebra
# ==============================================================================================================

class Matmul(Function):
    """y = a @ b, batched and broadcasting like numpy.matmul (1-D operands act as a row / a column).
    dL/da = g @ bᵀ,   dL/db = aᵀ @ g   (ᵀ swaps the last two axes; broadcast batch axes are summed)."""

    def forward(self, a, b):
        if a.ndim == 0 or b.ndim == 0:
            raise ShapeError(f"matmul: operands must have at least 1 dimension, got shapes {a.shape} and {b.shape}")
        if a.shape[-1] != b.shape[-2 if b.ndim > 1 else 0]:
            raise ShapeError(f"matmul: cannot multiply shapes {a.shape} and {b.shape}: the inner sizes "
                             f"{a.shape[-1]} and {b.shape[-2 if b.ndim > 1 else 0]} differ")
        self.save(a, b)
        if b.ndim == 2 and a.ndim > 2:  # a weight shared by every batch: one product over all rows, not a loop
            return (a.reshape(-1, a.shape[-1]) @ b).reshape(a.shape[:-1] + b.shape[-1:])
        return a @ b

    def backward(self, g):
        a, b = self.saved
        a2 = a[None, :] if a.ndim == 1 else a  # (1, k)
        b2 = b[:, None] if b.ndim == 1 else b  # (k, 1)
        g2 = g[..., None] if b.ndim == 1 else g  # put back the axes the 1-D operands dropped: (..., m, p)
        if a.ndim == 1:
            g2 = get_array_module(g).expand_dims(g2, -2)
        ga = gb = None
        if self.needs_grad[0]:
            ga = sum_to(g2 @ b2.swapaxes(-1, -2), a2.shape).reshape(a.shape)
        if self.needs_grad[1]:
            if b2.ndim == 2 and a2.ndim > 2:  # a weight shared by every batch: fold the batch into one product
                gb = a2.reshape(-1, a2.shape[-1]).T @ g2.reshape(-1, g2.shape[-1])
            else:
                gb = sum_to(a2.swapaxes(-1, -2) @ g2, b2.shape)
            gb = gb.reshape(b.shape)
        return ga, gb


def matmul(a, b):
    return Matmul()(a, b)


class Linear(Function):
    """y = x Wᵀ + b, W of shape (out, in) as in torch.nn.Linear.
    dL/dx = g W,   dL/dW = Σ_rows gᵀ x,   dL/db = Σ_rows g."""

    def forward(self, x, weight, bias=None):
        if x.shape[-1] != weight.shape[-1]:
            raise ShapeError(f"linear: input has {x.shape[-1]} features (shape {x.shape}) but the weight "
                             f"{weight.shape} expects {weight.shape[-1]}")
        self.save(x, weight)
        y = x.reshape(-1, x.shape[-1]) @ weight.T  # (rows, out): every leading axis folded into one product
        if bias is not None:
            y += bias
        return y.reshape(x.shape[:-1] + (weight.shape[0],))  # (..., out)

    def backward(self, g):
        x, weight = self.saved
        g2 = g.reshape(-1, g.shape[-1])  # (rows, out)
        gx = (g2 @ weight).reshape(x.shape) if self.needs_grad[0] else None  # (..., in)
        gw = g2.T @ x.reshape(-1, x.shape[-1]) if self.needs_grad[1] else None  # (out, in)
        if len(self.needs_grad) == 2:  # called without a bias
            return gx, gw
        return gx, gw, (g2.sum(axis=0) if self.needs_grad[2] else None)  # (out,)


def linear(x, weight, bias=None):
    """x @ weight.T + bias, with weight stored (out_features, in_features) like PyTorch."""
    return Linear()(x, weight) if bias is None else Linear()(x, weight, bias)


# ==============================================================================================================
# 6. activations
# ==============================================================================================================

def _sigmoid(x):
    """σ(x) = 1 / (1 + e⁻ˣ), written as (1 + tanh(x/2)) / 2, which never overflows (see sigmoid_plain)."""
    xp = get_array_module(x)
    s = xp.asarray(0.5 * x)  # one new array (asarray: NumPy turns 0-d results into scalars), then in place
    xp.tanh(s, out=s)
    s += 1
    s *= 0.5
    return s


class Sigmoid(Function):
    """y = σ(x) = 1 / (1 + e⁻ˣ);   dL/dx = g ⊙ y (1 - y)."""

    def forward(self, x):
        y = _sigmoid(x)
        self.save(y)
        return y

    def backward(self, g):
        (y,) = self.saved
        gx = 1 - y  # plain: g * y * (1 - y), here in place on one new array
        gx *= y
        gx *= g
        return gx


def sigmoid(x):
    return Sigmoid()(x)


def sigmoid_plain(x):
    """σ(x) = 1 / (1 + e⁻ˣ) composed of ordinary ops: what `Sigmoid` computes, with the backward autograd derives.
    exp(-x) overflows to inf for x below about -709 (float64), which still gives 0."""
    return 1 / (1 + exp(-x))


class Relu(Function):
    """y = max(x, 0);   dL/dx = g where x > 0, else 0."""

    def forward(self, x):
        self.save(x)
        return get_array_module(x).maximum(x, 0)

    def backward(self, g):
        (x,) = self.saved
        return g * (x > 0)


def relu(x):
    return Relu()(x)


class Silu(Function):
    """y = x σ(x) (also called swish);   dL/dx = g ⊙ σ(x) (1 + x (1 - σ(x)))."""

    def forward(self, x):
        s = _sigmoid(x)
        self.save(x, s)
        return x * s

    def backward(self, g):
        x, s = self.saved
        gx = 1 - s  # plain: g * s * (1 + x * (1 - s)), here in place on one new array
        gx *= x
        gx += 1
        gx *= s
        gx *= g
        return gx


def silu(x):
    return Silu()(x)


def silu_plain(x):
    """x σ(x) composed of ordinary ops: what `Silu` computes."""
    return x * sigmoid_plain(x)


class Swiglu(Function):
    """y = silu(a) ⊙ b = a σ(a) ⊙ b: the gated unit of a SwiGLU feed-forward (Shazeer 2020), a = x W₁ᵀ the gate,
    b = x W₃ᵀ the value.   dL/da = g ⊙ b ⊙ σ(a) (1 + a (1 - σ(a))),   dL/db = g ⊙ a σ(a).
    One op rather than silu followed by a product: one graph node, and one (tokens, width) array fewer kept for
    backward — in an MoE layer these are the largest arrays."""

    def forward(self, a, b):
        if a.shape != b.shape:
            raise ShapeError(f"swiglu: the gate {a.shape} and the value {b.shape} must have the same shape")
        s = _sigmoid(a)
        self.save(a, b, s)
        y = a * s  # plain: a * s * b
        y *= b
        return y

    def backward(self, g):
        a, b, s = self.saved
        ga = gb = None
        if self.needs_grad[0]:
            ga = 1 - s  # plain: g * b * s * (1 + a * (1 - s)), here in place on one new array
            ga *= a
            ga += 1
            ga *= s
            ga *= b
            ga *= g
        if self.needs_grad[1]:
            gb = a * s  # plain: g * a * s
            gb *= g
        return ga, gb


def swiglu(a, b):
    """silu(a) ⊙ b, the SwiGLU gated unit: a the gate, b the value (same shapes)."""
    return Swiglu()(a, b)


def swiglu_plain(a, b):
    """silu(a) ⊙ b composed of ordinary ops: what `Swiglu` computes in one node."""
    return silu_plain(a) * b


class Gelu(Function):
    """y = x Φ(x), Φ the standard normal CDF.
    exact:  Φ(x) = (1 + erf(x/√2)) / 2;                 dL/dx = g ⊙ (Φ(x) + x φ(x)),  φ the normal density
    tanh:   y ≈ x (1 + tanh u) / 2,  u = √(2/π)(x + 0.044715 x³);
            dL/dx = g ⊙ ((1 + tanh u)/2 + x (1 - tanh² u) √(2/π)(1 + 3·0.044715 x²) / 2)"""

    C, A = math.sqrt(2 / math.pi), 0.044715

    def __init__(self, approximate):
        if approximate not in ("none", "tanh"):
            raise ValueError(f"gelu: approximate must be 'none' or 'tanh', got {approximate!r}")
        self.approximate = approximate

    def forward(self, x):
        xp = get_array_module(x)
        if self.approximate == "tanh":
            t = xp.tanh(self.C * (x + self.A * x ** 3))
            self.save(x, t)
            return 0.5 * x * (1 + t)
        cdf = 0.5 * (1 + backend_of(x).erf(x * (1 / math.sqrt(2))))
        self.save(x, cdf)
        return x * cdf

    def backward(self, g):
        x, saved = self.saved
        if self.approximate == "tanh":
            t = saved
            return g * (0.5 * (1 + t) + 0.5 * x * (1 - t * t) * self.C * (1 + 3 * self.A * x * x))
        density = get_array_module(x).exp(-0.5 * x * x) * (1 / math.sqrt(2 * math.pi))
        return g * (saved + x * density)


def gelu(x, approximate="none"):
    """GELU; approximate="tanh" for the tanh approximation (GPT-2), "none" for the exact erf form."""
    return Gelu(approximate)(x)


def shifted_exp(x, axis=-1, out=None):
    """The stable softmax kernel, on a raw array, shared by every op that exponentiates and normalises (softmax,
    log_softmax, logsumexp, cross_entropy, attention, and sampling in generate.py):

        m = max x,   e = exp(x - m),   Σe    along `axis`;     softmax(x) = e / Σe,   logsumexp(x) = m + log Σe

    Shifting by m changes neither result (it cancels), but every x - m ≤ 0, so exp cannot overflow, and the
    largest term is exactly 1, so Σe ≥ 1 and its log is safe. Returns (e, Σe, m), the last two with `axis`
    kept (size 1). With out=x, e is computed in x's own memory (for a large array nobody needs afterwards)."""
    xp = get_array_module(x)
    m = x.max(axis=axis, keepdims=True)
    e = xp.exp(x - m) if out is None else xp.exp(xp.subtract(x, m, out=out), out=out)
    return e, e.sum(axis=axis, keepdims=True), m


class Softmax(Function):
    """y = exp(x - max x) / Σ exp(x - max x) along `axis`;   dL/dx = y ⊙ (g - Σ g ⊙ y)."""

    def __init__(self, axis):
        self.axis = axis

    def forward(self, x):
        y, total, _ = shifted_exp(x, self.axis)
        y /= total
        self.save(y)
        return y

    def backward(self, g):
        (y,) = self.saved
        return y * (g - (g * y).sum(axis=self.axis, keepdims=True))


def softmax(x, axis=-1):
    return Softmax(axis)(x)


def softmax_plain(x, axis=-1):
    """exp(x - max x) / Σ exp(x - max x) composed of ordinary ops (DeZero's softmax_simple, made stable): what
    `Softmax` computes, with its backward derived by autograd. Gradient flows through the max as well, but those
    terms cancel: softmax does not change when a constant is subtracted from every entry."""
    e = exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


class LogSoftmax(Function):
    """y = x - logsumexp(x) along `axis`;   dL/dx = g - softmax(x) ⊙ Σ g."""

    def __init__(self, axis):
        self.axis = axis

    def forward(self, x):
        e, total, m = shifted_exp(x, self.axis)
        y = x - m
        y -= get_array_module(x).log(total)
        e /= total  # softmax(x), what backward needs
        self.save(e)
        return y

    def backward(self, g):
        (probabilities,) = self.saved
        return g - probabilities * g.sum(axis=self.axis, keepdims=True)


def log_softmax(x, axis=-1):
    return LogSoftmax(axis)(x)


# ==============================================================================================================
# 7. losses
# ==============================================================================================================

class CrossEntropy(Function):
    """Softmax and negative log-likelihood fused, over logits (..., C) with integer targets (...).
    lossₜ = logsumexp(xₜ) - xₜ[targetₜ];   reduction "mean" averages over targets ≠ ignore_index.
    dL/dxₜ = g · (softmax(xₜ) - onehot(targetₜ)) (divided by the count for "mean"; 0 for ignored targets).
    Fusing the two is cheaper and steadier than log_softmax followed by picking: the gradient never forms
    1/softmax."""

    def __init__(self, targets, ignore_index, reduction):
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"cross_entropy: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")
        self.targets, self.ignore_index, self.reduction = targets, ignore_index, reduction

    def forward(self, logits):
        xp = get_array_module(logits)
        targets, classes = self.targets, logits.shape[-1]
        if targets.shape != logits.shape[:-1]:
            raise ShapeError(f"cross_entropy: targets of shape {targets.shape} must match the logits "
                             f"{logits.shape} without the class axis, i.e. {logits.shape[:-1]}")
        valid = targets != self.ignore_index
        safe_targets = xp.where(valid, targets, 0)
        check_index_range(safe_targets, classes, f"cross_entropy (targets ≠ ignore_index={self.ignore_index})")
        picked = xp.take_along_axis(logits, safe_targets[..., None], axis=-1)  # (..., 1) the target's logit
        probabilities, total, m = shifted_exp(logits)  # (..., C), (..., 1), (..., 1)
        probabilities /= total
        losses = (xp.log(total) - (picked - m))[..., 0] * valid  # (...,) logsumexp - x[target]
        count = xp.maximum(valid.sum(), 1).astype(logits.dtype)  # "mean" divides by it; no targets -> loss 0
        self.save(probabilities, safe_targets, valid, count)
        if self.reduction == "none":
            return losses
        return losses.sum() / count if self.reduction == "mean" else losses.sum()

    def backward(self, g):
        probabilities, targets, valid, count = self.saved
        xp = get_array_module(probabilities)
        weight = valid * (g / count if self.reduction == "mean" else g)  # (...,)
        grad = (probabilities * weight[..., None]).reshape(-1, probabilities.shape[-1])  # (rows, C)
        grad[xp.arange(grad.shape[0]), targets.reshape(-1)] -= weight.reshape(-1)  # minus the one-hot, in place
        return grad.reshape(probabilities.shape)

    def release(self):
        super().release()
        self.targets = None


def cross_entropy(logits, targets, ignore_index=-100, reduction="mean"):
    """Cross-entropy of logits (..., C) (class axis LAST, unlike torch's (N, C, ...)) against integer targets
    (...). reduction: "mean" over non-ignored targets (0 if there are none, where torch gives NaN),
    "sum", or "none" (per-target losses, 0 at ignored positions)."""
    targets = _raw(targets)
    if not hasattr(targets, "dtype"):
        targets = get_array_module(logits.data).asarray(targets)
    return CrossEntropy(targets, ignore_index, reduction)(logits)


# ==============================================================================================================
# 8. layers' ops: embedding, normalisation, dropout
# ==============================================================================================================

class Embedding(Function):
    """y = weight[ids] (a row per id);   dL/dweight = zeros with each row of g added at its id."""

    def __init__(self, ids):
        self.ids = ids

    def forward(self, weight):
        vocabulary = weight.shape[0]
        if self.ids.dtype.kind not in "iu":
            raise TypeError(f"embedding: ids must be integers, got {self.ids.dtype}")
        check_index_range(self.ids, vocabulary, f"embedding (a table of {vocabulary} rows)")
        self.save(weight.shape)
        return weight[self.ids]

    def backward(self, g):
        (shape,) = self.saved
        return backend_of(g).scatter_sum(g.reshape(-1, shape[-1]), self.ids.reshape(-1), shape[0])

    def release(self):
        super().release()
        self.ids = None


def embedding(ids, weight):
    """Rows of `weight` (V, C) picked by integer ids (...) -> (..., C)."""
    ids = _raw(ids)
    if not hasattr(ids, "dtype"):
        ids = get_array_module(weight.data).asarray(ids)
    return Embedding(ids)(weight)


class RMSNorm(Function):
    """y = x / rms(x) ⊙ w over the last axis, rms(x) = √(mean(x²) + eps).
    With x̂ = x / rms and h = g ⊙ w:   dL/dx = (h - x̂ mean(h ⊙ x̂)) / rms,   dL/dw = Σ_rows g ⊙ x̂."""

    def __init__(self, eps):
        self.eps = eps

    def forward(self, x, weight):
        xp = get_array_module(x)
        inverse_rms = 1 / xp.sqrt(_row_dot(x, x) / x.shape[-1] + self.eps)  # (..., 1)
        normalized = x * inverse_rms
        self.save(normalized, inverse_rms, weight)
        return normalized * weight

    def backward(self, g):
        normalized, inverse_rms, weight = self.saved
        h = g * weight  # (..., C), a new array: the rest happens in place
        # plain: (h - normalized * mean(h ⊙ normalized)) * inverse_rms
        h -= normalized * (_row_dot(h, normalized) / normalized.shape[-1])
        h *= inverse_rms
        rows = (-1, weight.shape[0])
        gw = get_array_module(g).einsum("ni,ni->i", g.reshape(rows), normalized.reshape(rows))  # Σ over the rows
        return h, gw


def rms_norm(x, weight, eps=1e-6):
    """Root-mean-square normalisation over the last axis, scaled by `weight` (C,)."""
    if weight.shape != x.shape[-1:]:
        raise ShapeError(f"rms_norm: weight {weight.shape} must match the last axis of the input {x.shape}")
    return RMSNorm(eps)(x, weight)


class LayerNorm(Function):
    """y = (x - mean) / √(var + eps) ⊙ w + b over the last axis (population variance).
    With x̂ the normalised x, σ⁻¹ = 1/√(var + eps), h = g ⊙ w:
    dL/dx = σ⁻¹ (h - mean(h) - x̂ mean(h ⊙ x̂)),   dL/dw = Σ_rows g ⊙ x̂,   dL/db = Σ_rows g."""

    def __init__(self, eps):
        self.eps = eps

    def forward(self, x, weight, bias):
        xp = get_array_module(x)
        centered = x - x.mean(axis=-1, keepdims=True)
        inverse_std = 1 / xp.sqrt((centered * centered).mean(axis=-1, keepdims=True) + self.eps)
        normalized = centered * inverse_std
        self.save(normalized, inverse_std, weight)
        return normalized * weight + bias

    def backward(self, g):
        normalized, inverse_std, weight = self.saved
        h = g * weight
        gx = inverse_std * (h - h.mean(axis=-1, keepdims=True)
                            - normalized * (h * normalized).mean(axis=-1, keepdims=True))
        rows = g.reshape(-1, weight.shape[0])
        return gx, (rows * normalized.reshape(rows.shape)).sum(axis=0), rows.sum(axis=0)


def layer_norm(x, weight, bias, eps=1e-5):
    """Layer normalisation over the last axis with scale `weight` (C,) and shift `bias` (C,)."""
    if weight.shape != x.shape[-1:] or bias.shape != x.shape[-1:]:
        raise ShapeError(f"layer_norm: weight {weight.shape} and bias {bias.shape} must match the last axis of "
                         f"the input {x.shape}")
    return LayerNorm(eps)(x, weight, bias)


class Dropout(Function):
    """y = x ⊙ m / (1 - p), m ~ Bernoulli(1 - p) per element;   dL/dx = g ⊙ m / (1 - p)."""

    def __init__(self, scaled_mask):
        self.scaled_mask = scaled_mask

    def forward(self, x):
        return x * self.scaled_mask

    def backward(self, g):
        return g * self.scaled_mask

    def release(self):
        super().release()
        self.scaled_mask = None


def dropout(x, p=0.5, training=True, generator=None):
    """Zero each element with probability p and scale the rest by 1/(1-p), in training; the identity in eval.
    The mask comes from `generator` (default: the backend's seeded generator, see minimoe.manual_seed)."""
    if not 0 <= p <= 1:
        raise ValueError(f"dropout: p must be in [0, 1], got {p}")
    if not training or p == 0:
        return x
    generator = generator or device_rng(backend_of(x.data))
    keep = generator.random(x.shape, dtype=x.dtype) >= p
    return Dropout(keep.astype(x.dtype) * (0.0 if p == 1 else 1 / (1 - p)))(x)


# ==============================================================================================================
# 9. attention
# ==============================================================================================================

class ScaledDotProductAttention(Function):
    """Attention as one op:   y = softmax(q kᵀ · scale + mask) v   over the last two axes.
    q (..., Tq, D), k (..., Tk, D), v (..., Tk, Dv) -> y (..., Tq, Dv). The leading axes broadcast, so keys that
    every head shares can come with a head axis of 1.
    Causal mask: query i sits at position start_pos + i and sees keys 0..start_pos + i (keys are positions
    0..Tk-1; with a key/value cache the first start_pos of them are the past). Hidden scores become -inf: weight 0.
    With S = q kᵀ · scale, P = softmax(S) and g = dL/dy:
        dL/dv = Pᵀ g,   dP = g vᵀ,   dS = P ⊙ (dP - rowsum(dP ⊙ P)),
        dL/dq = dS k · scale,   dL/dk = dSᵀ q · scale.
    Hidden entries have P = 0, so they pass no gradient. Fused, the op keeps its inputs and P for backward (not the
    scores, the masked scores and the exponentials), and attention's whole backward fits on one screen.
    The same attention composed of ordinary ops: minimoe.nn.scaled_dot_product_attention_plain."""

    def __init__(self, causal, scale, start_pos):
        self.causal, self.scale, self.start_pos = causal, scale, start_pos

    def forward(self, q, k, v):
        if builtins.min(q.ndim, k.ndim, v.ndim) < 2 or q.shape[-1] != k.shape[-1] or k.shape[-2] != v.shape[-2]:
            raise ShapeError(f"scaled_dot_product_attention: q (..., Tq, D) {q.shape}, k (..., Tk, D) {k.shape} and "
                             f"v (..., Tk, Dv) {v.shape} must agree on D and on Tk")
        queries, keys = q.shape[-2], k.shape[-2]
        if self.causal and self.start_pos + queries > keys:
            raise ShapeError(f"scaled_dot_product_attention: causal queries at positions {self.start_pos}.."
                             f"{self.start_pos + queries - 1} (start_pos={self.start_pos}) need keys for positions "
                             f"0..{self.start_pos + queries - 1}, but there are {keys} keys")
        xp = get_array_module(q)
        scale = 1 / math.sqrt(q.shape[-1]) if self.scale is None else self.scale
        scores = (q * scale) @ k.swapaxes(-1, -2)  # (..., Tq, Tk); scaling q costs Tq·D products, not Tq·Tk
        if self.causal:  # add -inf to the scores of the keys a query may not see yet
            future = xp.arange(keys) > xp.arange(self.start_pos, self.start_pos + queries)[:, None]  # (Tq, Tk)
            scores += xp.where(future, -xp.inf, 0).astype(scores.dtype)
        # softmax in place: the (..., Tq, Tk) scores are the largest arrays of a step, so none is copied
        p, total, _ = shifted_exp(scores, out=scores)  # plain: p = softmax(scores)
        p /= total  # (..., Tq, Tk)
        self.save(q, k, v, p, scale)
        return p @ v

    def backward(self, g):
        q, k, v, p, scale = self.saved
        gv = p.swapaxes(-1, -2) @ g if self.needs_grad[2] else None  # (..., Tk, Dv)
        ds = g @ v.swapaxes(-1, -2)  # dP (..., Tq, Tk), turned into dS in place:
        ds -= _row_dot(ds, p)  # plain: dS = P ⊙ (dP - rowsum(dP ⊙ P)), softmax's backward
        ds *= p
        gq = (ds @ k) * scale if self.needs_grad[0] else None  # (..., Tq, D)
        gk = (ds.swapaxes(-1, -2) @ q) * scale if self.needs_grad[1] else None  # (..., Tk, D)
        return gq, gk, gv


def scaled_dot_product_attention(q, k, v, causal=True, scale=None, start_pos=0):
    """softmax(q kᵀ · scale) v with a causal mask: q (..., Tq, D), k (..., Tk, D), v (..., Tk, Dv) -> (..., Tq, Dv).
    scale defaults to 1/√D. Query i is at position start_pos + i and sees keys 0..start_pos + i: start_pos=0 for a
    whole sequence, start_pos = the number of cached positions when k and v hold the cache's past plus the new
    tokens (then Tk = start_pos + Tq). Unlike torch's is_causal, which aligns the mask top-left, this supports
    more keys than queries."""
    return ScaledDotProductAttention(causal, scale, start_pos)(q, k, v)


_install_tensor_methods()  # section 0's table, now that every op exists
