"""Gradient checking: compare backward's gradients with central finite differences.

    d/dθ L  ≈  (L(θ + ε) - L(θ - ε)) / 2ε        error O(ε²)

With ε = 1e-6 in float64 the two agree to about 1e-8 relative for smooth functions; far worse means the
backward is wrong. `gradcheck` checks L = Σ fn(inputs) ⊙ w with random fixed weights w: a gradient of all
ones would hide a backward that transposes or ignores its incoming gradient.
"""

import numpy as np

from .autograd import Tensor, no_grad
from .backend import backend_of

__all__ = ["gradcheck", "GradcheckError", "numerical_grad"]


class GradcheckError(AssertionError):
    """Analytic and numerical gradients disagree."""


def numerical_grad(fn, inputs, index, upstream, eps=1e-6):
    """Central-difference gradient of Σ fn(*inputs) ⊙ upstream with respect to inputs[index], element by element
    (a test tool: 2 forward passes per element)."""
    x = inputs[index]
    original_data = x.data
    host = x.numpy().astype(np.float64)  # a copy: x's own array is never changed
    grad = np.zeros_like(host)
    to_backend = backend_of(x.data)
    try:
        with no_grad():
            for i in np.ndindex(*host.shape):
                original = host[i]
                values = []
                for delta in (eps, -eps):
                    host[i] = original + delta
                    x.data = to_backend.asarray(host, dtype=x.dtype)
                    values.append((fn(*inputs) * upstream).sum().item())
                host[i] = original
                grad[i] = (values[0] - values[1]) / (2 * eps)
    finally:
        x.data = original_data
    return grad


def gradcheck(fn, inputs, eps=1e-6, atol=1e-6, rtol=1e-5, seed=0):
    """Check `fn`'s gradients for every input tensor that requires grad. Inputs must be float64.
    Returns True, or raises GradcheckError naming the input, the worst element and both values."""
    inputs = list(inputs)
    for i, x in enumerate(inputs):
        if isinstance(x, Tensor) and x.requires_grad and x.dtype != np.float64:
            raise TypeError(f"gradcheck: input {i} is {x.dtype}; finite differences need float64 (use dtype='float64')")
    output = fn(*inputs)
    rng = np.random.default_rng(seed)
    upstream = Tensor(backend_of(output.data).asarray(rng.uniform(0.5, 1.5, output.shape), dtype=output.dtype))
    for x in inputs:
        if isinstance(x, Tensor):
            x.grad = None
    (output * upstream).sum().backward()
    for i, x in enumerate(inputs):
        if not (isinstance(x, Tensor) and x.requires_grad):
            continue
        analytic = np.zeros(x.shape) if x.grad is None else backend_of(x.grad).to_numpy(x.grad)
        numerical = numerical_grad(fn, inputs, i, upstream, eps)
        error = np.abs(analytic - numerical) - (atol + rtol * np.abs(numerical))
        if (error > 0).any():
            worst = tuple(int(i) for i in np.unravel_index(np.argmax(error), error.shape))
            raise GradcheckError(f"gradcheck: input {i} (shape {x.shape}): at {worst} backward gives "
                                 f"{analytic[worst]:.10g}, finite differences {numerical[worst]:.10g} "
                                 f"(max |difference| {np.abs(analytic - numerical).max():.3g})")
    return True
