"""One helper checks an op against PyTorch: forward values, and the gradient of every input under a random
(non-uniform) upstream gradient, in float64 to tight tolerances; then against finite differences."""

import numpy as np
import torch

import minimoe
from minimoe.testing import check_close

TOL = 1e-10


def random_inputs(shapes, seed=0, low=-2.0, high=2.0):
    """Host float64 arrays, one per shape. Values are continuous, so ties (for max, topk) have probability 0."""
    rng = np.random.default_rng(seed)
    return [rng.uniform(low, high, shape) for shape in shapes]


def check_op(mine, reference, shapes=None, arrays=None, grad=True, atol=TOL, rtol=TOL, gradcheck=True,
             seed=0):
    """Run `mine` on minimoe tensors (current backend) and `reference` on torch tensors made from the same
    float64 arrays; compare outputs and every input's gradient for a random upstream gradient."""
    arrays = arrays if arrays is not None else random_inputs(shapes, seed)
    ours = [minimoe.tensor(a, requires_grad=grad, dtype="float64") for a in arrays]
    theirs = [torch.tensor(a, requires_grad=grad) for a in arrays]
    out, expected = mine(*ours), reference(*theirs)
    check_close(out, expected, atol, rtol, name="forward", quiet=True)
    assert out.dtype == np.float64, f"output dtype {out.dtype}, expected float64"
    if not grad:
        return out
    upstream = np.random.default_rng(seed + 1).uniform(0.5, 1.5, expected.shape)
    out.backward(minimoe.tensor(upstream, dtype="float64"))
    expected.backward(torch.tensor(upstream))
    for i, (x, t) in enumerate(zip(ours, theirs)):
        reference_grad = t.grad if t.grad is not None else torch.zeros_like(t)
        assert x.grad is not None, f"input {i}: no gradient"
        check_close(x.grad, reference_grad, atol, rtol, name=f"grad of input {i}", quiet=True)
    if gradcheck and all(a.size <= 64 for a in arrays):
        minimoe.gradcheck(mine, [minimoe.tensor(a, requires_grad=True, dtype="float64") for a in arrays],
                          atol=1e-6, rtol=1e-5)
    return out
