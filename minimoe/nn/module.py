"""Modules: layers that own parameters, and the few basic layers everything else is built from.

A Module is a plain Python object whose attributes may be Parameters (trainable leaf tensors), buffers
(state that is saved but not trained, e.g. a routing bias) and other Modules. Names follow the attribute path,
`layers.0.attn.wq.weight`, exactly as in PyTorch, so a PyTorch twin of a model loads minimoe's state dict.
"""

import math
import numbers

from ..autograd import Tensor, get_default_dtype
from ..backend import backend_named, backend_of, get_backend, host_rng, to_host
from .. import functional as F

__all__ = ["Parameter", "Module", "ModuleList", "Linear", "Embedding", "RMSNorm", "LayerNorm", "Dropout",
           "init_uniform", "init_normal"]


class Parameter(Tensor):
    """A leaf tensor that a Module trains: requires_grad is always True."""

    __slots__ = ()

    def __init__(self, data):
        super().__init__(data, requires_grad=True)


def init_uniform(shape, bound):
    """Uniform(-bound, bound) values, drawn on the host from the seeded generator, on the current backend."""
    return get_backend().asarray(host_rng().uniform(-bound, bound, shape), dtype=get_default_dtype())


def init_normal(shape, std):
    """Normal(0, std²) values, drawn on the host from the seeded generator, on the current backend."""
    return get_backend().asarray(host_rng().standard_normal(shape) * std, dtype=get_default_dtype())


class Module:
    """Base class of every layer. Subclasses call `super().__init__()` first, assign Parameters and sub-Modules
    as attributes, and write `forward`. Calling the module calls `forward`."""

    def __init__(self):
        self.training = True
        self._buffer_names = []

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def forward(self, *args, **kwargs):
        raise NotImplementedError(f"{type(self).__name__} has no forward()")

    # ---- buffers ----------------------------------------------------------------------------------------------
    def register_buffer(self, name, array):
        """Keep `array` as `self.<name>`: saved in the state dict, never trained, moved with the module."""
        self._buffer_names.append(name)
        setattr(self, name, array)

    # ---- walking the tree -------------------------------------------------------------------------------------
    def named_children(self):
        for name, value in vars(self).items():
            if isinstance(value, Module):
                yield name, value

    def named_modules(self, prefix=""):
        yield prefix, self
        for name, child in self.named_children():
            yield from child.named_modules(f"{prefix}.{name}" if prefix else name)

    def named_parameters(self):
        """(dotted name, Parameter) for every parameter, in the order the attributes were assigned."""
        for module_name, module in self.named_modules():
            for name, value in vars(module).items():
                if isinstance(value, Parameter):
                    yield (f"{module_name}.{name}" if module_name else name), value

    def parameters(self):
        return [p for _, p in self.named_parameters()]

    def named_buffers(self):
        for module_name, module in self.named_modules():
            for name in module._buffer_names:
                yield (f"{module_name}.{name}" if module_name else name), getattr(module, name)

    def num_parameters(self):
        return sum(p.size for p in self.parameters())

    # ---- modes --------------------------------------------------------------------------------------------------
    def train(self, mode=True):
        """Training mode (dropout on, noisy routing on); returns self."""
        for _, module in self.named_modules():
            module.training = mode
        return self

    def eval(self):
        """Evaluation mode (dropout off, deterministic routing); returns self."""
        return self.train(False)

    def zero_grad(self):
        for p in self.parameters():
            p.grad = None

    # ---- saving, loading, moving --------------------------------------------------------------------------------
    def state_dict(self):
        """{dotted name: array} for every parameter and buffer (the arrays themselves, not copies)."""
        state = {name: p.data for name, p in self.named_parameters()}
        state.update(self.named_buffers())
        return state

    def load_state_dict(self, state):
        """Copy arrays into this module's parameters and buffers. Strict: a missing name, an unexpected name or
        a wrong shape raises a ValueError that lists them all, before anything is changed."""
        own = self.state_dict()
        missing = [name for name in own if name not in state]
        unexpected = [name for name in state if name not in own]
        wrong = [f"{name}: saved {tuple(state[name].shape)}, model {tuple(own[name].shape)}"
                 for name in own if name in state and tuple(state[name].shape) != tuple(own[name].shape)]
        if missing or unexpected or wrong:
            problems = ([f"missing: {', '.join(missing)}"] if missing else []) + \
                       ([f"unexpected: {', '.join(unexpected)}"] if unexpected else []) + \
                       ([f"wrong shape: {'; '.join(wrong)}"] if wrong else [])
            raise ValueError(f"{type(self).__name__}.load_state_dict: " + " | ".join(problems))
        parameters = dict(self.named_parameters())
        modules = dict(self.named_modules())
        for name, value in state.items():
            target = backend_of(own[name])
            host = value if type(value) is target.array_type else to_host(value)
            array = target.xp.array(host, dtype=own[name].dtype)  # a copy: never share memory with `state`
            if name in parameters:
                parameters[name].data = array
            else:
                module_name, _, attribute = name.rpartition(".")
                setattr(modules[module_name], attribute, array)

    def to(self, where):
        """Move every parameter and buffer to another backend ("cpu"/"numpy", "gpu"/"cupy", "fakegpu"), in place;
        returns self. Create the optimizer after moving: it keeps the arrays it had."""
        target = backend_named(where)
        for name, value in self.state_dict().items():
            self._assign(name, target.asarray(to_host(value), dtype=value.dtype))
        return self

    def _assign(self, name, array):
        module_name, _, attribute = name.rpartition(".")
        module = dict(self.named_modules())[module_name]
        current = getattr(module, attribute)
        if isinstance(current, Parameter):
            current.data, current.grad = array, None
        else:
            setattr(module, attribute, array)

    # ---- printing -----------------------------------------------------------------------------------------------
    def extra_repr(self):
        return ""

    def __repr__(self):
        own = sum(v.size for v in vars(self).values() if isinstance(v, Parameter))
        lines = [f"{type(self).__name__}({self.extra_repr()})" + (f"  # {own:,} parameters" if own else "")]
        children = [(name, repr(child)) for name, child in self.named_children()]
        for name, text in _runs_of_equal(children):
            child_lines = text.split("\n")
            lines.append(f"  ({name}): {child_lines[0]}")
            lines.extend("  " + line for line in child_lines[1:])
        if children:
            lines.append(f"  total: {self.num_parameters():,} parameters")
        return "\n".join(lines)


def _runs_of_equal(children):
    """Consecutive children that print the same (a ModuleList of 64 experts) are shown once: ("0-63", "64 × …")."""
    runs = []
    for name, text in children:
        if runs and runs[-1][2] == text and name.isdigit():  # list entries only: wq and wk stay apart
            runs[-1][1] = name
        else:
            runs.append([name, name, text])
    return [(first, text) if first == last else (f"{first}-{last}", f"{int(last) - int(first) + 1} × {text}")
            for first, last, text in runs]


_host = to_host  # the old private name, still imported by checkpoint.py


class ModuleList(Module):
    """A list of modules, named "0", "1", ... in the state dict."""

    def __init__(self, modules):
        super().__init__()
        for i, module in enumerate(modules):
            setattr(self, str(i), module)
        self._length = len(modules)

    def __len__(self):
        return self._length

    def __iter__(self):
        return (getattr(self, str(i)) for i in range(self._length))

    def __getitem__(self, i):
        if not -self._length <= i < self._length:
            raise IndexError(f"ModuleList index {i} out of range for {self._length} modules")
        return getattr(self, str(i % self._length))


class Linear(Module):
    """y = x Wᵀ + b with W of shape (out_features, in_features), as torch.nn.Linear.
    Initialised like PyTorch: W, b ~ Uniform(-1/√in, 1/√in)."""

    def __init__(self, in_features, out_features, bias=True):
        super().__init__()
        for name, size in (("in_features", in_features), ("out_features", out_features)):
            if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1:
                raise ValueError(f"Linear: {name} must be an integer ≥ 1, got {size!r}")
        self.in_features, self.out_features = in_features, out_features
        bound = 1 / math.sqrt(in_features)
        self.weight = Parameter(init_uniform((out_features, in_features), bound))
        self.bias = Parameter(init_uniform((out_features,), bound)) if bias else None

    def forward(self, x):  # (..., in) -> (..., out)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self):
        return f"{self.in_features} -> {self.out_features}" + ("" if self.bias is not None else ", bias=False")


class Embedding(Module):
    """A table of `num_embeddings` vectors of size `dim`; ids (...) -> (..., dim). Initialised N(0, 1)."""

    def __init__(self, num_embeddings, dim):
        super().__init__()
        self.num_embeddings, self.dim = num_embeddings, dim
        self.weight = Parameter(init_normal((num_embeddings, dim), 1.0))

    def forward(self, ids):
        return F.embedding(ids, self.weight)

    def extra_repr(self):
        return f"{self.num_embeddings}, {self.dim}"


class RMSNorm(Module):
    """x / √(mean(x²) + eps) ⊙ weight over the last axis (weight starts at ones)."""

    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = Parameter(get_backend().xp.ones(dim, dtype=get_default_dtype()))

    def forward(self, x):
        return F.rms_norm(x, self.weight, self.eps)  # plain: x / √(mean(x²) + eps) ⊙ weight, see forward_plain

    def forward_plain(self, x):
        """The same, composed of ordinary ops, so autograd writes the backward that F.rms_norm writes by hand."""
        return x * ((x * x).mean(axis=-1, keepdims=True) + self.eps) ** -0.5 * self.weight

    def extra_repr(self):
        return f"{self.dim}, eps={self.eps}"


class LayerNorm(Module):
    """(x - mean) / √(var + eps) ⊙ weight + bias over the last axis."""

    def __init__(self, dim, eps=1e-5):
        super().__init__()
        self.dim, self.eps = dim, eps
        xp = get_backend().xp
        self.weight = Parameter(xp.ones(dim, dtype=get_default_dtype()))
        self.bias = Parameter(xp.zeros(dim, dtype=get_default_dtype()))

    def forward(self, x):
        return F.layer_norm(x, self.weight, self.bias, self.eps)

    def extra_repr(self):
        return f"{self.dim}, eps={self.eps}"


class Dropout(Module):
    """Zeroes elements with probability p in training mode; the identity in eval mode."""

    def __init__(self, p=0.0):
        super().__init__()
        if not 0 <= p < 1:
            raise ValueError(f"Dropout: p must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x):
        return F.dropout(x, self.p, self.training)

    def extra_repr(self):
        return f"p={self.p}"
