"""The engine itself: how the graph is recorded, walked and freed; the errors a user meets; gradcheck as a tool.
Every op's own maths is checked in test_ops.py."""

import gc
import tracemalloc
import weakref

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra.numpy import array_shapes

import minimoe
import minimoe.functional as F
from minimoe import Function, GradcheckError, ShapeError, gradcheck
from minimoe.optim import Adam, clip_grad_norm_
from minimoe.testing import check_close, to_numpy
from parity import check_op, torch


def leaf(values, requires_grad=True):
    return minimoe.tensor(values, requires_grad=requires_grad, dtype="float64")


def functions_in_graph(output):
    """Every Function reachable from `output`."""
    found, stack = [], [output.creator]
    while stack:
        function = stack.pop()
        if function is None or any(function is f for f in found):
            continue
        found.append(function)
        stack.extend(x.creator for x in function.inputs)
    return found


# --------------------------------------------------------------------------------------------------------------
# graph semantics
# --------------------------------------------------------------------------------------------------------------

def test_non_leaf_used_twice_collects_both_gradients(backend):
    a = leaf([1.0, -2.0, 3.0])
    b = a + a
    c = b + b  # c = 4a
    c.backward(leaf([0.5, 1.5, -2.0], requires_grad=False))
    assert to_numpy(a.grad).tolist() == [2.0, 6.0, -8.0]


def test_tensor_used_in_two_branches_matches_torch(backend):
    values = np.random.default_rng(0).uniform(-1, 1, (3, 4))
    f = lambda a: (a * 2.0).sum(axis=1) * a.exp().mean(axis=1) + (a.tanh() * a).sum(axis=1)  # noqa: E731
    g = lambda a: (a * 2.0).sum(dim=1) * a.exp().mean(dim=1) + (a.tanh() * a).sum(dim=1)  # noqa: E731
    check_op(f, g, arrays=[values])


def test_no_grad_records_no_graph(backend):
    a = leaf([1.0, 2.0])
    with minimoe.no_grad():
        b = a * 2.0 + 1.0
        assert not minimoe.is_grad_enabled()
    assert minimoe.is_grad_enabled()
    assert b.creator is None and b.is_leaf and not b.requires_grad

    @minimoe.no_grad()
    def double(x):
        assert not minimoe.is_grad_enabled()
        return x * 2.0

    c = double(a)
    assert c.creator is None and not c.requires_grad and minimoe.is_grad_enabled()
    with minimoe.no_grad():
        with minimoe.enable_grad():
            d = a * 2.0
    assert d.requires_grad and d.creator is not None


def test_no_grad_restores_the_mode_after_an_error_and_when_nested():
    with pytest.raises(KeyError):
        with minimoe.no_grad():
            raise KeyError("inside")
    assert minimoe.is_grad_enabled()

    @minimoe.no_grad()
    def depth(n):  # the same decorated function, entered again before it returns
        return 0 if n == 0 else 1 + depth(n - 1)

    with minimoe.enable_grad():  # puts the mode back for the other tests even if no_grad got it wrong
        assert depth(3) == 3
        assert minimoe.is_grad_enabled()


def test_no_grad_releases_saved_arrays_at_once():
    exp = F.Exp()
    with minimoe.no_grad():
        exp(leaf([1.0, 2.0]))
    assert exp.saved is None


def test_detach_stops_the_gradient(backend):
    a = leaf([1.0, -2.0, 0.5])
    b = a * 3.0
    c = b.detach()
    assert c.is_leaf and not c.requires_grad
    (c * a).sum().backward()  # only the direct path: d/da (c ⊙ a) = c = 3a, not 6a
    check_close(a.grad, 3.0 * to_numpy(a), name="grad through detach")


def test_backward_twice_with_retain_graph_accumulates(backend):
    a = leaf([1.0, -2.0, 0.5])
    y = (a * a * a).sum()
    y.backward(retain_graph=True)
    first = to_numpy(a.grad).copy()
    check_close(first, 3 * to_numpy(a) ** 2, name="first backward")
    y.backward()
    check_close(a.grad, 2 * first, name="second backward")
    with pytest.raises(RuntimeError, match="already been freed"):
        y.backward()


def test_fresh_graphs_accumulate_into_leaf_grad(backend):
    a = leaf([1.0, -2.0])
    for _ in range(3):
        (a * a).sum().backward()
    check_close(a.grad, 3 * 2 * to_numpy(a), name="three backwards")
    a.grad = None
    (a * a).sum().backward()
    check_close(a.grad, 2 * to_numpy(a), name="after clearing")


def test_backward_with_an_explicit_gradient(backend):
    rng = np.random.default_rng(1)
    a_values, b_values, upstream = rng.normal(size=(3, 2, 3))
    a, b = leaf(a_values), leaf(b_values)
    (a * b).backward(leaf(upstream, requires_grad=False))
    check_close(a.grad, upstream * b_values, name="a.grad")
    check_close(b.grad, upstream * a_values, name="b.grad")
    a.grad = None
    if backend.device == "cpu":
        (a * b).backward(upstream)  # on NumPy a host array is the backend's own array
        check_close(a.grad, upstream * b_values, name="a.grad from a host gradient")
    else:  # a device tensor refuses a host gradient, as CuPy would: no implicit copy to the device
        with pytest.raises(TypeError, match="host ndarray.*nothing is copied to the device implicitly"):
            (a * b).backward(upstream)


def test_zero_dimensional_tensors_throughout(backend):
    x, w = leaf(1.5), leaf(-0.5)
    y = (x * w + x.exp()) ** 2.0
    assert y.shape == ()
    y.backward()
    tx, tw = torch.tensor(1.5, requires_grad=True, dtype=torch.float64), torch.tensor(-0.5, requires_grad=True,
                                                                                       dtype=torch.float64)
    ((tx * tw + tx.exp()) ** 2.0).backward()
    for mine, theirs, name in [(x, tx, "x"), (w, tw, "w")]:
        assert type(mine.grad) is backend.array_type, f"{name}.grad is a {type(mine.grad).__name__}"
        assert mine.grad.shape == ()
        check_close(mine.grad, theirs.grad, name=f"{name}.grad")
    y_value = y.item()
    assert isinstance(y_value, float)


def test_leaf_gradients_never_share_memory(backend):
    a, b = leaf([1.0, 2.0]), leaf([3.0, 4.0])
    upstream = leaf([0.5, -1.0], requires_grad=False)
    (a + b).backward(upstream)  # add's backward hands the same array to both inputs
    a.grad += 100.0
    assert to_numpy(b.grad).tolist() == [0.5, -1.0]
    assert to_numpy(upstream).tolist() == [0.5, -1.0]
    d = leaf([5.0, 6.0])
    d.backward(upstream)  # a leaf's own backward copies the gradient too
    d.grad += 1.0
    assert to_numpy(upstream).tolist() == [0.5, -1.0]


def test_truth_value_of_a_tensor(backend):
    assert bool(leaf([0.5]) > 0) and not bool(leaf(0.0))
    x = leaf([1.0, -1.0])
    assert bool(x.max() > 0.5)
    with pytest.raises(ValueError, match=r"shape \(2,\) is ambiguous"):
        bool(x > 0)


# --------------------------------------------------------------------------------------------------------------
# clear errors
# --------------------------------------------------------------------------------------------------------------

def test_binary_op_shape_mismatch_names_the_op_and_shapes(backend):
    with pytest.raises(ShapeError, match=r"^add: .*\(2, 3\), \(4,\)"):
        leaf(np.ones((2, 3))) + leaf(np.ones(4))
    with pytest.raises(ShapeError, match=r"^mul: .*\(2, 3\), \(3, 2\)"):
        leaf(np.ones((2, 3))) * leaf(np.ones((3, 2)))


def test_matmul_shape_mismatch_names_the_op_and_shapes(backend):
    with pytest.raises(ShapeError, match=r"^matmul: cannot multiply shapes \(2, 3\) and \(4, 5\)"):
        leaf(np.ones((2, 3))) @ leaf(np.ones((4, 5)))
    with pytest.raises(ShapeError, match=r"^matmul: .*\(2, 3, 4\), \(3, 4, 5\)"):  # batch axes that cannot broadcast
        leaf(np.ones((2, 3, 4))) @ leaf(np.ones((3, 4, 5)))


def test_mixing_backends_says_so_and_how_to_fix():
    host = leaf([1.0, 2.0]).to("numpy")
    device = host.to("fakegpu")
    for mix in (lambda: host + device, lambda: device * host, lambda: F.matmul(host, device)):
        with pytest.raises(TypeError, match=r"different backends \((numpy and fakegpu|fakegpu and numpy)\).*\.to\("):
            mix()
    y = device * 2.0
    with pytest.raises(TypeError, match=r"gradient lives on numpy.*\.to\('fakegpu'\)"):
        y.backward(host)


def test_backward_on_a_non_scalar_needs_a_gradient(backend):
    y = leaf(np.ones((2, 3))) * 2.0
    with pytest.raises(RuntimeError, match=r"one-element tensor.*shape \(2, 3\).*backward\(grad\)"):
        y.backward()
    with pytest.raises(ShapeError, match=r"gradient of shape \(3,\) for a tensor of shape \(2, 3\)"):
        y.backward(minimoe.tensor(np.ones(3)))


def test_backward_through_a_freed_graph(backend):
    a = leaf([1.0, 2.0])
    b = a.exp()
    loss = b.sum()
    loss.backward()
    with pytest.raises(RuntimeError, match=r"already been freed.*retain_graph=True"):
        loss.backward()
    with pytest.raises(RuntimeError, match="already been freed"):  # another loss through the same, freed, op
        (b * 2.0).sum().backward()


def test_requires_grad_on_an_integer_tensor(backend):
    with pytest.raises(TypeError, match=r"requires_grad=True needs a floating-point tensor.*int64"):
        minimoe.tensor([1, 2, 3], requires_grad=True)
    with pytest.raises(TypeError, match="floating-point"):
        minimoe.Tensor(minimoe.arange(3).data, requires_grad=True)


def test_backward_on_a_tensor_that_does_not_require_grad(backend):
    with pytest.raises(RuntimeError, match=r"does not require grad.*no_grad\(\)"):
        (leaf([1.0, 2.0], requires_grad=False) * 2.0).sum().backward()


def test_a_function_object_records_one_call():
    relu = F.Relu()
    h = relu(leaf([1.0, -2.0]))
    with pytest.raises(RuntimeError, match=r"relu: this Relu object is already a node.*Relu\(\.\.\.\)\(x\)"):
        relu(h)


class _Scale(Function):
    """y = 2x with a backward chosen by the test (to check what the engine does with a wrong one)."""

    def __init__(self, backward):
        self.wrong_backward = backward

    def forward(self, x):
        return 2 * x

    def backward(self, g):
        return self.wrong_backward(g)


def test_engine_checks_what_backward_returns(backend):
    x = leaf(np.ones((2, 3)))
    upstream = minimoe.tensor(np.arange(6.0).reshape(2, 3), dtype=x.dtype)
    with pytest.raises(ShapeError, match=r"_scale.backward: returned a gradient of shape \(3, 2\) for an input of "
                                         r"shape \(2, 3\)"):
        _Scale(lambda g: 2 * g.T)(x).backward(upstream)
    with pytest.raises(TypeError, match=r"_scale.backward returned 2 gradients for 1 inputs"):
        _Scale(lambda g: (2 * g, 2 * g))(x).backward(upstream)
    y = leaf(1.5)
    _Scale(lambda g: g * 2.0)(y).backward()  # NumPy makes a scalar of 0-d arithmetic: it becomes a 0-d array
    assert type(y.grad) is backend.array_type and y.grad.item() == 2.0


# --------------------------------------------------------------------------------------------------------------
# deep graphs and memory
# --------------------------------------------------------------------------------------------------------------

def test_deep_chain_backpropagates_without_recursion_error(backend):
    x = leaf(0.3)
    y = x
    for _ in range(10_000):
        y = 0.5 * y + x  # y_n = x (1 + 1/2 + ... + 1/2^(n-1)), and x is used 10,000 times
    y.backward()
    check_close(x.grad, 2.0 * (1 - 0.5 ** 10_000), name="d y_10000 / dx")


def test_dropping_a_deep_graph_does_not_crash():
    x = leaf(1.0)
    y = x
    for _ in range(10_000):
        y = y * 1.0001
    del y  # freeing 10,000 nested Tensor -> Function -> Tensor links
    gc.collect()
    assert x.grad is None


def test_backward_releases_the_graph(backend):
    rng = np.random.default_rng(2)
    x, w = leaf(rng.normal(size=(4, 3)), requires_grad=False), leaf(rng.normal(size=(3, 5)))
    h = x @ w
    r = F.relu(h)
    loss = (r * r).mean()
    functions = functions_in_graph(loss)
    assert len(functions) == 4
    h_ref, r_ref = weakref.ref(h), weakref.ref(r)
    data_ref = weakref.ref(h.data) if backend.name == "numpy" else None
    del h, r
    assert h_ref() is not None and r_ref() is not None  # the graph holds them until backward has used them
    loss.backward()
    assert all(f.inputs is None and f.saved is None for f in functions)
    assert h_ref() is None and r_ref() is None
    if data_ref is not None:
        assert data_ref() is None
    assert loss.creator is not None and loss.creator.inputs is None  # the loss itself stays readable
    assert np.isfinite(loss.item())


def test_training_steps_keep_memory_flat(backend):
    """Repeated forward/backward/clip/step of a small MLP: the arrays alive after step 10 and after step 60 are
    the same (NumPy reports every array's buffer to tracemalloc, in its own domain), and so is the number of
    live Function objects."""
    rng = np.random.default_rng(3)
    x, y = leaf(rng.normal(size=(32, 16)), requires_grad=False), leaf(rng.normal(size=(32, 1)), requires_grad=False)
    params = [leaf(rng.normal(size=shape) * 0.3) for shape in [(16, 64), (64,), (64, 1)]]
    optimizer = Adam(params, lr=1e-3)

    def step():
        w1, b1, w2 = params
        loss = ((F.relu(x @ w1 + b1) @ w2 - y) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        clip_grad_norm_(params, 1.0)
        optimizer.step()

    def array_bytes():
        numpy_arrays = tracemalloc.DomainFilter(True, np.lib.tracemalloc_domain)
        return sum(trace.size for trace in tracemalloc.take_snapshot().filter_traces([numpy_arrays]).traces)

    def live_functions():
        return sum(issubclass(type(o), Function) for o in gc.get_objects())  # type(): no __class__ lookups

    tracemalloc.start()
    try:
        for _ in range(10):
            step()
        before, functions_before = array_bytes(), live_functions()
        for _ in range(50):
            step()
        growth = array_bytes() - before
    finally:
        tracemalloc.stop()
    one_activation = 32 * 64 * 8
    assert growth < one_activation // 16, f"array memory grew by {growth} bytes over 50 steps"
    assert live_functions() <= functions_before


# --------------------------------------------------------------------------------------------------------------
# gradcheck as a user tool
# --------------------------------------------------------------------------------------------------------------

class _ForgetsUpstream(Function):
    """y = x²; backward returns 2x instead of g ⊙ 2x (a classic mistake)."""

    def forward(self, x):
        self.save(x)
        return x * x

    def backward(self, g):
        (x,) = self.saved
        return 2 * x


class _TransposedMatmul(Function):
    """y = a @ b; backward gives a the gradient g @ b instead of g @ bᵀ (right shape for square b, wrong values)."""

    def forward(self, a, b):
        self.save(a, b)
        return a @ b

    def backward(self, g):
        a, b = self.saved
        return g @ b, a.swapaxes(-1, -2) @ g


def test_gradcheck_passes_on_a_correct_op(backend):
    rng = np.random.default_rng(4)
    a, b = leaf(rng.normal(size=(3, 4))), leaf(rng.normal(size=(4,)))
    before = to_numpy(a).copy()
    assert gradcheck(lambda a, b: F.softmax(a * b).log() + (a @ b)[:, None], [a, b]) is True
    np.testing.assert_array_equal(to_numpy(a), before)  # the inputs are left as they were


def test_gradcheck_catches_a_backward_that_forgets_the_upstream_gradient(backend):
    x = leaf(np.random.default_rng(5).normal(size=(2, 3)))
    with pytest.raises(GradcheckError, match=r"input 0 \(shape \(2, 3\)\).*backward gives"):
        gradcheck(lambda x: _ForgetsUpstream()(x), [x])


def test_gradcheck_catches_a_transposed_gradient(backend):
    rng = np.random.default_rng(6)
    a, b = leaf(rng.normal(size=(3, 3))), leaf(rng.normal(size=(3, 3)))
    with pytest.raises(GradcheckError, match="input 0"):
        gradcheck(lambda a, b: _TransposedMatmul()(a, b), [a, b])


def test_gradcheck_refuses_float32():
    x = minimoe.tensor([1.0, 2.0], dtype="float32", requires_grad=True)
    with pytest.raises(TypeError, match=r"input 0 is float32; finite differences need float64"):
        gradcheck(F.tanh, [x])


def test_gradcheck_restores_the_input_when_fn_fails():
    x = leaf([1.0, 2.0])
    original = x.data
    calls = []

    def fails_on_the_second_call(x):
        calls.append(1)
        if len(calls) > 1:
            raise ArithmeticError("boom")
        return x * 2.0

    with pytest.raises(ArithmeticError):
        gradcheck(fails_on_the_second_call, [x])
    assert x.data is original and x.data.tolist() == [1.0, 2.0]


# --------------------------------------------------------------------------------------------------------------
# properties, generated by hypothesis
# --------------------------------------------------------------------------------------------------------------

REDUCTIONS = {
    "sum": (lambda x, axis, keep: x.sum(axis=axis, keepdims=keep), lambda t, dim, keep: t.sum(dim=dim, keepdim=keep)),
    "mean": (lambda x, axis, keep: x.mean(axis=axis, keepdims=keep),
             lambda t, dim, keep: t.mean(dim=dim, keepdim=keep)),
    "max": (lambda x, axis, keep: x.max(axis=axis, keepdims=keep), lambda t, dim, keep: t.amax(dim=dim, keepdim=keep)),
    "var": (lambda x, axis, keep: F.var(x, axis=axis, keepdims=keep, correction=0),
            lambda t, dim, keep: torch.var(t, dim=dim, keepdim=keep, correction=0)),
    "logsumexp": (lambda x, axis, keep: F.logsumexp(x, axis=axis, keepdims=keep),
                  lambda t, dim, keep: torch.logsumexp(t, dim=dim, keepdim=keep)),
}


@pytest.mark.parametrize("name", sorted(REDUCTIONS))
@settings(max_examples=25, deadline=None)
@given(shape=array_shapes(min_dims=1, max_dims=4, max_side=4), data=st.data(), keepdims=st.booleans(),
       seed=st.integers(0, 2 ** 16))
def test_reductions_over_random_axes_match_torch(name, shape, data, keepdims, seed):
    ndim = len(shape)
    axes = data.draw(st.lists(st.integers(-ndim, ndim - 1), min_size=1, max_size=ndim,
                              unique_by=lambda a: a % ndim), label="axes")
    axis = axes[0] if len(axes) == 1 else tuple(axes)
    mine, reference = REDUCTIONS[name]
    check_op(lambda x: mine(x, axis, keepdims), lambda t: reference(t, axis, keepdims),
             arrays=[np.random.default_rng(seed).uniform(-2, 2, shape)], gradcheck=False)


@settings(max_examples=40, deadline=None)
@given(shape=array_shapes(min_dims=1, max_dims=5, max_side=3), data=st.data())
def test_permute_and_reshape_round_trips(shape, data):
    order = data.draw(st.permutations(range(len(shape))), label="order")
    inverse = [order.index(i) for i in range(len(shape))]
    values = np.random.default_rng(len(shape)).normal(size=shape)
    x = leaf(values)
    there = x.permute(*order)
    assert there.shape == tuple(shape[i] for i in order)
    back = there.reshape(-1).reshape(there.shape).permute(*inverse)
    np.testing.assert_array_equal(to_numpy(back), values)
    upstream = np.random.default_rng(7).normal(size=there.shape)
    there.backward(upstream)
    np.testing.assert_array_equal(to_numpy(x.grad), np.transpose(upstream, inverse))
    check_op(lambda a: a.permute(*order).reshape(-1), lambda t: t.permute(*order).reshape(-1), arrays=[values],
             gradcheck=False)


# --------------------------------------------------------------------------------------------------------------
# looking inside: retain_grad, and the names a reader meets
# --------------------------------------------------------------------------------------------------------------

def test_retain_grad_keeps_an_intermediate_gradient(backend):
    x = leaf(np.array([1.0, -2.0, 3.0]))
    h = x * x  # dL/dh = 2 (from 2h) + 1 (from h) = 3 everywhere
    h.retain_grad()
    ((h * 2.0) + h).sum().backward()
    check_close(h.grad, np.full(3, 3.0), name="h.grad")
    check_close(x.grad, 3.0 * 2 * np.array([1.0, -2.0, 3.0]), name="x.grad")
    unretained = x * 3.0
    (unretained * 1.0).sum().backward()
    assert unretained.grad is None  # only asked-for intermediates keep a gradient


def test_retain_grad_needs_a_tensor_that_requires_grad():
    with pytest.raises(RuntimeError, match="does not require grad"):
        minimoe.tensor([1.0]).retain_grad()
    x = minimoe.tensor([1.0], requires_grad=True)
    x.retain_grad()  # a leaf: nothing to do
    (x * 2.0).sum().backward()
    assert x.grad.tolist() == [2.0]


def test_gradients_the_engine_owns_are_never_shared_with_a_backward():
    """Fan-out: y feeds three ops, two of which (Add) hand their g on unchanged; the sum the engine builds for y
    must be a new array, so adding into it never changes an upstream gradient."""
    x = minimoe.tensor([1.0, 2.0], requires_grad=True, dtype="float64")
    y = x * 1.0
    y.retain_grad()
    z = y + y
    w = z + y
    upstream = minimoe.tensor([1.0, 10.0], dtype="float64")
    (w * 1.0).backward(upstream)
    assert y.grad.tolist() == [3.0, 30.0] and x.grad.tolist() == [3.0, 30.0] and upstream.tolist() == [1.0, 10.0]


def test_device_rng_and_to_host_are_public():
    assert minimoe.device_rng is minimoe.backend.device_rng
    assert minimoe.to_host is minimoe.backend.to_host
    with minimoe.use_backend("fakegpu"):
        host = minimoe.to_host(minimoe.tensor([1.0, 2.0]).data)
    assert type(host) is np.ndarray and host.tolist() == [1.0, 2.0]
    assert minimoe.to_host([3, 4]) == [3, 4]
