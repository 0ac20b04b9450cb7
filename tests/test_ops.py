"""Every op against PyTorch (float64, forward and gradients under a random upstream gradient) and against finite
differences, on every backend. One table row per op case: name, minimoe lambda, torch lambda, input shapes.
Without torch the finite-difference and dtype tests still run; the torch comparisons skip."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra.numpy import mutually_broadcastable_shapes

import minimoe
import minimoe.functional as F
from parity import TF, check_finite_differences, check_op, random_inputs, torch

IDS = [[1, 3, 3, 0], [2, 2, 4, 1]]  # repeated ids: backward must scatter-add
ROWS = [2, 0, 2, 1]  # repeated row index


def T(values):
    return torch.tensor(values)


def positive(low=0.2, high=3.0):
    return {"low": low, "high": high}


# name, minimoe, torch, shapes[, input range]
CASES = [
    # arithmetic, with broadcasting against (1, n), (n,) and 0-d
    ("add", lambda a, b: a + b, lambda a, b: a + b, [(3, 4), (3, 4)]),
    ("add_row", lambda a, b: a + b, lambda a, b: a + b, [(3, 4), (1, 4)]),
    ("add_vector", lambda a, b: a + b, lambda a, b: a + b, [(3, 4), (4,)]),
    ("add_scalar_tensor", lambda a, b: a + b, lambda a, b: a + b, [(3, 4), ()]),
    ("add_python_number", lambda a: 2.5 + a, lambda a: 2.5 + a, [(3, 4)]),
    ("sub", lambda a, b: a - b, lambda a, b: a - b, [(2, 3, 4), (3, 1)]),
    ("rsub", lambda a: 1.0 - a, lambda a: 1.0 - a, [(3,)]),
    ("mul", lambda a, b: a * b, lambda a, b: a * b, [(2, 3, 4), (4,)]),
    ("mul_0d", lambda a, b: a * b, lambda a, b: a * b, [(), ()]),
    ("div", lambda a, b: a / b, lambda a, b: a / b, [(3, 4), (1, 4)], positive()),
    ("rdiv", lambda a: 1.0 / a, lambda a: 1.0 / a, [(5,)], positive()),
    ("neg", lambda a: -a, lambda a: -a, [(3, 4)]),
    ("pow_number", lambda a: a ** 3, lambda a: a ** 3, [(3, 4)]),
    ("pow_tensor", lambda a, b: a ** b, lambda a, b: a ** b, [(3, 4), (4,)], positive()),
    ("rpow", lambda a: 2.0 ** a, lambda a: 2.0 ** a, [(3, 4)]),
    ("maximum", F.maximum, lambda a, b: torch.maximum(a, b), [(3, 4), (4,)]),
    ("minimum", F.minimum, lambda a, b: torch.minimum(a, b), [(3, 4), (3, 1)]),
    ("clip", lambda a: F.clip(a, -0.5, 0.7), lambda a: torch.clamp(a, -0.5, 0.7), [(4, 5)]),
    ("clip_low_only", lambda a: F.clip(a, low=0.1), lambda a: torch.clamp(a, min=0.1), [(4, 5)]),
    # elementwise functions
    ("exp", F.exp, lambda a: torch.exp(a), [(3, 4)]),
    ("log", F.log, lambda a: torch.log(a), [(3, 4)], positive()),
    ("sqrt", F.sqrt, lambda a: torch.sqrt(a), [(3, 4)], positive()),
    ("tanh", F.tanh, lambda a: torch.tanh(a), [(3, 4)]),
    ("sigmoid", F.sigmoid, lambda a: torch.sigmoid(a), [(3, 4)], {"low": -30, "high": 30}),
    ("relu", F.relu, lambda a: torch.relu(a), [(3, 4)]),
    ("silu", F.silu, lambda a: TF.silu(a), [(3, 4)], {"low": -6, "high": 6}),
    ("swiglu", F.swiglu, lambda a, b: TF.silu(a) * b, [(3, 4), (3, 4)], {"low": -6, "high": 6}),
    ("swiglu_0d", F.swiglu, lambda a, b: TF.silu(a) * b, [(), ()], {"low": -6, "high": 6}),
    ("gelu_exact", F.gelu, lambda a: TF.gelu(a), [(3, 4)], {"low": -4, "high": 4}),
    ("gelu_tanh", lambda a: F.gelu(a, approximate="tanh"), lambda a: TF.gelu(a, approximate="tanh"), [(3, 4)],
     {"low": -4, "high": 4}),
    # matrix products: batched, broadcast, 1-D operands
    ("matmul", lambda a, b: a @ b, lambda a, b: a @ b, [(3, 4), (4, 5)]),
    ("matmul_batched", lambda a, b: a @ b, lambda a, b: a @ b, [(2, 3, 4), (2, 4, 5)]),
    ("matmul_shared_weight", lambda a, b: a @ b, lambda a, b: a @ b, [(2, 3, 4), (4, 5)]),
    ("matmul_broadcast_batch", lambda a, b: a @ b, lambda a, b: a @ b, [(2, 1, 3, 4), (5, 4, 2)]),
    ("matmul_2d_by_batched", lambda a, b: a @ b, lambda a, b: a @ b, [(3, 4), (2, 4, 5)]),
    ("matmul_vector_matrix", lambda a, b: a @ b, lambda a, b: a @ b, [(4,), (2, 4, 5)]),
    ("matmul_matrix_vector", lambda a, b: a @ b, lambda a, b: a @ b, [(2, 3, 4), (4,)]),
    ("matmul_vector_vector", lambda a, b: a @ b, lambda a, b: a @ b, [(4,), (4,)]),
    ("linear", F.linear, lambda *a: TF.linear(*a), [(2, 3, 4), (5, 4), (5,)]),
    ("linear_no_bias", F.linear, lambda *a: TF.linear(*a), [(6, 4), (5, 4)]),
    # reductions
    ("sum_all", lambda a: a.sum(), lambda a: a.sum(), [(3, 4)]),
    ("sum_axis", lambda a: a.sum(axis=1), lambda a: a.sum(dim=1), [(2, 3, 4)]),
    ("sum_axes_keepdims", lambda a: a.sum(axis=(0, 2), keepdims=True), lambda a: a.sum(dim=(0, 2), keepdim=True),
     [(2, 3, 4)]),
    ("sum_0d", lambda a: a.sum(), lambda a: a.sum(), [()]),
    ("mean_negative_axis", lambda a: a.mean(axis=-1), lambda a: a.mean(dim=-1), [(2, 3, 4)]),
    ("mean_keepdims", lambda a: a.mean(axis=(0, 1), keepdims=True), lambda a: a.mean(dim=(0, 1), keepdim=True),
     [(2, 3, 4)]),
    ("max_axis", lambda a: a.max(axis=1), lambda a: a.amax(dim=1), [(3, 5)]),
    ("max_all", lambda a: a.max(), lambda a: a.amax(), [(3, 5)]),
    ("max_keepdims", lambda a: a.max(axis=0, keepdims=True), lambda a: a.amax(dim=0, keepdim=True), [(3, 5)]),
    ("var_unbiased", lambda a: a.var(axis=-1), lambda a: a.var(dim=-1), [(3, 5)]),
    ("var_population_keepdims", lambda a: F.var(a, axis=0, keepdims=True, correction=0),
     lambda a: torch.var(a, dim=0, keepdim=True, correction=0), [(3, 5)]),
    ("logsumexp", lambda a: F.logsumexp(a, axis=-1), lambda a: torch.logsumexp(a, dim=-1), [(3, 5)],
     {"low": -50, "high": 50}),
    # shapes
    ("reshape", lambda a: a.reshape(4, 3) * 1.0, lambda a: a.reshape(4, 3), [(3, 4)]),
    ("reshape_minus_one", lambda a: a.reshape(-1), lambda a: a.reshape(-1), [(2, 3, 2)]),
    ("transpose", lambda a: a.transpose(0, 2), lambda a: a.transpose(0, 2), [(2, 3, 4)]),
    ("transpose_last_two", lambda a: F.transpose(a), lambda a: a.transpose(-1, -2), [(2, 3, 4)]),
    ("permute", lambda a: a.permute(2, 0, 1), lambda a: a.permute(2, 0, 1), [(2, 3, 4)]),
    ("broadcast_to", lambda a: F.broadcast_to(a, (2, 3, 4)), lambda a: a.expand(2, 3, 4), [(3, 1)]),
    ("unsqueeze_squeeze", lambda a: a.unsqueeze(1).squeeze(1), lambda a: a.unsqueeze(1).squeeze(1), [(3, 4)]),
    # indexing: basic, advanced with repeats, boolean
    ("getitem_slice", lambda a: a[1:, ::2], lambda a: a[1:, ::2], [(3, 5)]),
    ("getitem_int_none_ellipsis", lambda a: a[..., 1, None], lambda a: a[..., 1, None], [(2, 3, 4)]),
    ("getitem_repeated_rows", lambda a: a[ROWS], lambda a: a[ROWS], [(3, 4)]),
    ("getitem_negative_rows_of_3d", lambda a: a[[-1, 0, -1, 2]], lambda a: a[[-1, 0, -1, 2]], [(3, 2, 4)]),
    ("getitem_repeated_elements", lambda a: a[ROWS], lambda a: a[ROWS], [(3,)]),
    ("getitem_pairs", lambda a: a[[0, 0, 2], [1, 1, 3]], lambda a: a[[0, 0, 2], [1, 1, 3]], [(3, 4)]),
    ("getitem_tensor_index", lambda a: a[minimoe.tensor(ROWS), 1:], lambda a: a[T(ROWS), 1:], [(3, 4)]),
    ("getitem_bool_mask", lambda a: a[a > 0], lambda a: a[a > 0], [(3, 4)]),
    ("take_along_axis", lambda a: F.take_along_axis(a, minimoe.tensor([[0, 0], [2, 1], [1, 1]]), axis=1),
     lambda a: torch.take_along_dim(a, T([[0, 0], [2, 1], [1, 1]]), dim=1), [(3, 4)]),
    ("gather_axis0", lambda a: F.gather(a, 0, minimoe.tensor([[2, 0, 2, 2]])),
     lambda a: torch.gather(a, 0, T([[2, 0, 2, 2]])), [(3, 4)]),
    ("index_add", lambda a, s: F.index_add(a, minimoe.tensor(ROWS), s),
     lambda a, s: a.index_add(0, T(ROWS), s), [(3, 4), (4, 4)]),
    ("index_add_no_rows", lambda a, s: F.index_add(a, minimoe.tensor(np.zeros(0, dtype=np.int64)), s),
     lambda a, s: a.index_add(0, T(np.zeros(0, dtype=np.int64)), s), [(3, 4), (0, 4)]),
    ("concatenate", lambda a, b: F.concatenate([a, b, a], axis=1), lambda a, b: torch.cat([a, b, a], dim=1),
     [(2, 3), (2, 5)]),
    ("stack", lambda a, b: F.stack([a, b], axis=1), lambda a, b: torch.stack([a, b], dim=1), [(2, 3), (2, 3)]),
    ("split", lambda a: F.split(a, [1, 3], axis=1)[1] * F.split(a, 2, axis=1)[0].sum(),
     lambda a: a.split([1, 3], dim=1)[1] * a.split(2, dim=1)[0].sum(), [(3, 4)]),
    ("where", lambda a, b: F.where(a > b, a, b), lambda a, b: torch.where(a > b, a, b), [(3, 4), (4,)]),
    ("where_number", lambda a: F.where(a > 0, a, 0.0), lambda a: torch.where(a > 0, a, 0.0), [(3, 4)]),
    ("masked_fill", lambda a: a.masked_fill(a < 0, -1.5), lambda a: a.masked_fill(a < 0, -1.5), [(3, 4)]),
    ("topk_values", lambda a: F.topk(a, 2)[0], lambda a: torch.topk(a, 2).values, [(3, 5)]),
    ("topk_axis0", lambda a: F.topk(a, 2, axis=0)[0], lambda a: torch.topk(a, 2, dim=0).values, [(3, 5)]),
    # neural-network ops
    ("softmax", F.softmax, lambda a: torch.softmax(a, dim=-1), [(3, 5)]),
    ("softmax_axis0", lambda a: F.softmax(a, axis=0), lambda a: torch.softmax(a, dim=0), [(3, 5)]),
    ("softmax_large_logits", F.softmax, lambda a: torch.softmax(a, dim=-1), [(3, 5)], {"low": 500, "high": 900}),
    ("log_softmax", F.log_softmax, lambda a: torch.log_softmax(a, dim=-1), [(2, 3, 5)], {"low": -80, "high": 80}),
    ("cross_entropy", lambda a: F.cross_entropy(a, IDS), lambda a: TF.cross_entropy(a.permute(0, 2, 1), T(IDS)),
     [(2, 4, 5)]),
    ("cross_entropy_ignore_index", lambda a: F.cross_entropy(a, [[1, -100, 3, 0]]),
     lambda a: TF.cross_entropy(a.permute(0, 2, 1), T([[1, -100, 3, 0]])), [(1, 4, 5)]),
    ("cross_entropy_sum", lambda a: F.cross_entropy(a, [1, 4, 3], reduction="sum"),
     lambda a: TF.cross_entropy(a, T([1, 4, 3]), reduction="sum"), [(3, 5)]),
    ("cross_entropy_none", lambda a: F.cross_entropy(a, [1, 4, 3], reduction="none", ignore_index=4),
     lambda a: TF.cross_entropy(a, T([1, 4, 3]), reduction="none", ignore_index=4), [(3, 5)]),
    ("embedding", lambda w: F.embedding(IDS, w), lambda w: TF.embedding(T(IDS), w), [(5, 3)]),
    ("rms_norm", lambda x, w: F.rms_norm(x, w, eps=1e-6), lambda x, w: TF.rms_norm(x, (4,), w, eps=1e-6),
     [(2, 3, 4), (4,)]),
    ("layer_norm", lambda x, w, b: F.layer_norm(x, w, b), lambda x, w, b: TF.layer_norm(x, (4,), w, b),
     [(2, 3, 4), (4,), (4,)]),
    # attention: causal; more keys than queries (cached decoding: query i at start_pos + i sees keys 0..start_pos + i);
    # keys shared by every head (a head axis of 1, as MLA's absorbed latent); no mask with a given scale
    ("sdpa_causal", F.scaled_dot_product_attention, lambda q, k, v: TF.scaled_dot_product_attention(q, k, v,
     is_causal=True), [(1, 2, 4, 3), (1, 2, 4, 3), (1, 2, 4, 2)]),
    ("sdpa_cached_keys", lambda q, k, v: F.scaled_dot_product_attention(q, k, v, start_pos=3),
     lambda q, k, v: TF.scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(2, 5, dtype=torch.bool).tril(3)),
     [(2, 2, 3), (2, 5, 3), (2, 5, 2)]),
    ("sdpa_keys_shared_by_heads", lambda q, k, v: F.scaled_dot_product_attention(q, k, v, start_pos=2, scale=0.3),
     lambda q, k, v: TF.scaled_dot_product_attention(q, k, v, scale=0.3,
                                                     attn_mask=torch.ones(2, 4, dtype=torch.bool).tril(2)),
     [(2, 3, 2, 3), (2, 1, 4, 3), (2, 1, 4, 2)]),
    ("sdpa_not_causal", lambda q, k, v: F.scaled_dot_product_attention(q, k, v, causal=False, scale=0.7),
     lambda q, k, v: TF.scaled_dot_product_attention(q, k, v, scale=0.7), [(2, 3, 4), (2, 5, 4), (2, 5, 3)]),
]


def _case(row):
    name, mine, reference, shapes, *rest = row
    return pytest.param(mine, reference, shapes, rest[0] if rest else {}, id=name)


@pytest.mark.parametrize("mine, reference, shapes, domain", [_case(row) for row in CASES])
def test_op_matches_torch(backend, mine, reference, shapes, domain):
    check_op(mine, reference, arrays=random_inputs(shapes, **domain), gradcheck=False)


@pytest.mark.parametrize("mine, reference, shapes, domain", [_case(row) for row in CASES])
def test_op_matches_finite_differences(backend, mine, reference, shapes, domain):
    check_finite_differences(mine, random_inputs(shapes, **domain))


@pytest.mark.parametrize("mine, reference, shapes, domain", [_case(row) for row in CASES])
def test_op_keeps_float32(mine, reference, shapes, domain):
    """float32 in, float32 out, float32 gradients: no silent upcast to float64 anywhere."""
    inputs = [minimoe.tensor(a, dtype="float32", requires_grad=True) for a in random_inputs(shapes, **domain)]
    out = mine(*inputs)
    assert out.dtype == np.float32
    out.sum().backward()
    assert all(x.grad.dtype == np.float32 for x in inputs)


def test_non_contiguous_inputs(backend):
    """Transposed (Fortran-ordered) and strided views go through reshape, matmul and reductions correctly."""
    base = random_inputs([(6, 8)])[0]
    arrays = [base.T, base[::2, ::2]]
    assert not arrays[0].flags.c_contiguous and not arrays[1].flags.c_contiguous
    check_op(lambda a, b: (a.reshape(4, 12) @ b.reshape(12, 1)).sum(axis=0) + b.mean(),
             lambda a, b: (a.reshape(4, 12) @ b.reshape(12, 1)).sum(dim=0) + b.mean(), arrays=arrays)


def test_cast_changes_dtype_and_casts_the_gradient_back(backend):
    x = minimoe.tensor([1.5, -2.25], dtype="float64", requires_grad=True)
    y = x.astype("float32")
    assert y.dtype == np.float32
    (y * minimoe.tensor([2.0, 3.0], dtype="float32")).sum().backward()
    assert x.grad.dtype == np.float64 and x.grad.tolist() == [2.0, 3.0]


def test_topk_indices_and_tie_rule(backend):
    x = minimoe.tensor([[0.5, 2.0, 2.0, -1.0]])
    values, indices = F.topk(x, 3)
    assert indices.tolist() == [[1, 2, 0]]  # the tie 2.0 = 2.0 keeps the lower index first
    assert values.tolist() == [[2.0, 2.0, 0.5]]
    assert indices.dtype.kind == "i" and not indices.requires_grad


def test_dropout_train_eval_and_seed(backend):
    x = minimoe.ones(200, 50, requires_grad=True)
    assert F.dropout(x, 0.3, training=False) is x
    minimoe.manual_seed(7)
    y = F.dropout(x, 0.3)
    minimoe.manual_seed(7)
    y_again = F.dropout(x, 0.3)
    kept = y.numpy() != 0
    np.testing.assert_array_equal(y.numpy(), y_again.numpy())
    np.testing.assert_allclose(y.numpy()[kept], 1 / 0.7, rtol=1e-6)
    assert abs(kept.mean() - 0.7) < 0.02
    upstream = np.random.default_rng(0).uniform(size=x.shape).astype(np.float32)
    y.backward(minimoe.tensor(upstream))
    np.testing.assert_allclose(x.grad.get() if hasattr(x.grad, "get") else x.grad, upstream * kept / 0.7,
                               rtol=1e-6)


# --------------------------------------------------------------------------------------------------------------
# broadcasting, generated by hypothesis
# --------------------------------------------------------------------------------------------------------------

BINARY = {
    "add": (lambda a, b: a + b, lambda a, b: a + b),
    "sub": (lambda a, b: a - b, lambda a, b: a - b),
    "mul": (lambda a, b: a * b, lambda a, b: a * b),
    "div": (lambda a, b: a / (b * b + 1), lambda a, b: a / (b * b + 1)),
    "maximum": (F.maximum, lambda a, b: torch.maximum(a, b)),
    "where": (lambda a, b: F.where(a > b, a, b), lambda a, b: torch.where(a > b, a, b)),
}


@pytest.mark.parametrize("name", sorted(BINARY))
@settings(max_examples=25, deadline=None)
@given(shapes=mutually_broadcastable_shapes(num_shapes=2, min_dims=0, max_dims=4, max_side=3),
       seed=st.integers(0, 2 ** 16))
def test_broadcasting_binary_ops(name, shapes, seed):
    mine, reference = BINARY[name]
    check_op(mine, reference, arrays=random_inputs(shapes.input_shapes, seed), gradcheck=False)


@settings(max_examples=25, deadline=None)
@given(shapes=mutually_broadcastable_shapes(signature="(m,n),(n,p)->(m,p)", max_dims=4,
                                            max_side=3), seed=st.integers(0, 2 ** 16))
def test_broadcasting_matmul(shapes, seed):
    check_op(lambda a, b: a @ b, lambda a, b: a @ b, arrays=random_inputs(shapes.input_shapes, seed),
             gradcheck=False)
