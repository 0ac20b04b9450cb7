"""One helper checks an op against PyTorch: forward values, and the gradient of every input under a random
(non-uniform) upstream gradient, in float64 to tight tolerances; then against finite differences.

PyTorch is optional: the engine's own tests need none. `torch`, `TF` and `twin("moe")` (a module of
tests/reference/) are imported on first use, so a test file imports without torch; a test that reaches for one of
them is skipped then, with the reason, and the file's torch-free tests still run."""

import importlib

import numpy as np
import pytest

import minimoe
from minimoe.testing import check_close

TOL = 1e-10


def require_torch():
    """The torch module, or skip the calling test with the reason."""
    return pytest.importorskip("torch", reason="PyTorch is not installed: this test compares minimoe with it",
                               exc_type=ImportError)


class _NeedsTorch:
    """A module that needs torch (torch itself, torch.nn.functional, a twin in tests/reference/), imported when
    the first attribute is read: the test that reads it skips when torch is missing."""

    def __init__(self, module):
        self._module = module

    def __getattr__(self, name):
        if name.startswith("_"):  # pytest's collection looks for its own markers on every module attribute
            raise AttributeError(name)
        require_torch()
        return getattr(importlib.import_module(self._module), name)


torch = _NeedsTorch("torch")
TF = _NeedsTorch("torch.nn.functional")


def twin(name):
    """tests/reference/<name>.py, the PyTorch twin of a minimoe module, imported on first use."""
    return _NeedsTorch(f"reference.{name}")


def random_inputs(shapes, seed=0, low=-2.0, high=2.0):
    """Host float64 arrays, one per shape. Values are continuous, so ties (for max, topk) have probability 0."""
    rng = np.random.default_rng(seed)
    return [rng.uniform(low, high, shape) for shape in shapes]


def grad_subsets(n):
    """Which inputs require grad: all of them, then (with two or more inputs) each one alone, so the backward's
    `needs_grad[i]` branches are taken both ways."""
    return [(True,) * n] + ([tuple(i == j for j in range(n)) for i in range(n)] if n > 1 else [])


def check_op(mine, reference, shapes=None, arrays=None, grad=True, atol=TOL, rtol=TOL, gradcheck=True,
             seed=0):
    """Run `mine` on minimoe tensors (current backend) and `reference` on torch tensors made from the same
    float64 arrays; compare outputs and the gradients for a random upstream gradient, first with every input
    requiring grad, then (with several inputs) with each input alone requiring it. Skips without torch."""
    torch = require_torch()
    arrays = arrays if arrays is not None else random_inputs(shapes, seed)
    subsets = grad_subsets(len(arrays)) if grad else [(False,) * len(arrays)]
    for needs in subsets:
        ours = [minimoe.tensor(a, requires_grad=g, dtype="float64") for a, g in zip(arrays, needs)]
        theirs = [torch.tensor(a, requires_grad=g) for a, g in zip(arrays, needs)]
        out, expected = mine(*ours), reference(*theirs)
        check_close(out, expected, atol, rtol, name="forward", quiet=True)
        assert out.dtype == np.float64, f"output dtype {out.dtype}, expected float64"
        if not grad:
            return out
        upstream = np.random.default_rng(seed + 1).uniform(0.5, 1.5, expected.shape)
        out.backward(minimoe.tensor(upstream, dtype="float64"))
        expected.backward(torch.tensor(upstream))
        for i, (x, t) in enumerate(zip(ours, theirs)):
            if not needs[i]:
                assert x.grad is None, f"input {i} does not require grad but got a gradient"
                continue
            reference_grad = t.grad if t.grad is not None else torch.zeros_like(t)
            assert x.grad is not None, f"input {i}: no gradient (inputs requiring grad: {needs})"
            check_close(x.grad, reference_grad, atol, rtol, name=f"grad of input {i} (requiring grad: {needs})",
                        quiet=True)
    if gradcheck:
        check_finite_differences(mine, arrays)
    return out


def check_finite_differences(mine, arrays):
    """minimoe's gradients against central finite differences (torch-free); inputs of at most 64 elements."""
    if all(a.size <= 64 for a in arrays):
        minimoe.gradcheck(mine, [minimoe.tensor(a, requires_grad=True, dtype="float64") for a in arrays],
                          atol=1e-6, rtol=1e-5)
