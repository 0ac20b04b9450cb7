"""Every fused or in-place piece of minimoe against its plain version (the `_plain` beside it), torch-free, in
float64 on every backend: the same values and the same gradients, to rounding.

The plain versions are composed of ordinary ops (autograd writes their backward) or, for Adam, written as the
paper's algorithm box; the fused ones write the backward by hand or work in place for speed."""

import numpy as np
import pytest

import minimoe
import minimoe.functional as F
from minimoe.nn import MoE, RMSNorm, scaled_dot_product_attention_plain
from minimoe.optim import Adam, AdamW
from minimoe.testing import check_close, to_numpy

RTOL, ATOL = 1e-12, 1e-14


def host(*shape, seed=0, low=-1.5, high=1.5):
    return np.random.default_rng(seed).uniform(low, high, shape)


def value_and_grads(fn, arrays, upstream_seed=99):
    """fn's output and the gradient of Σ fn(inputs) ⊙ G (G random) for every input, as host arrays."""
    inputs = [minimoe.tensor(a, requires_grad=True, dtype="float64") for a in arrays]
    out = fn(*inputs)
    (out * minimoe.tensor(host(*out.shape, seed=upstream_seed, low=0.5), dtype="float64")).sum().backward()
    return to_numpy(out), [to_numpy(x.grad) for x in inputs]


def check_same(fused, plain, arrays, name):
    out, grads = value_and_grads(fused, arrays)
    out_plain, grads_plain = value_and_grads(plain, arrays)
    check_close(out, out_plain, ATOL, RTOL, name=f"{name}: value")
    for i, (g, g_plain) in enumerate(zip(grads, grads_plain)):
        check_close(g, g_plain, ATOL, RTOL, name=f"{name}: gradient of input {i}")


# ---- activations and softmax (functional.py) ------------------------------------------------------------------

ACTIVATIONS = {  # name: (fused, plain, input shapes, input range)
    "sigmoid": (F.sigmoid, F.sigmoid_plain, [(3, 5)], 8.0),
    "silu": (F.silu, F.silu_plain, [(3, 5)], 6.0),
    "swiglu": (F.swiglu, F.swiglu_plain, [(3, 5), (3, 5)], 6.0),
    "swiglu_0d": (F.swiglu, F.swiglu_plain, [(), ()], 6.0),
    "softmax": (F.softmax, F.softmax_plain, [(2, 3, 5)], 5.0),
    "softmax_axis0": (lambda x: F.softmax(x, axis=0), lambda x: F.softmax_plain(x, axis=0), [(4, 3)], 5.0),
    "softmax_large_logits": (F.softmax, F.softmax_plain, [(3, 5)], 700.0),
}


@pytest.mark.parametrize("name", list(ACTIVATIONS))
def test_activation_fused_equals_plain(backend, name):
    fused, plain, shapes, bound = ACTIVATIONS[name]
    arrays = [host(*shape, seed=i, low=-bound, high=bound) for i, shape in enumerate(shapes)]
    check_same(fused, plain, arrays, name)


def test_topk_indices_is_a_stable_descending_sort(backend):
    """The one top-k helper (F.topk and the MoE gate) against NumPy's stable argsort, -inf and ties included."""
    x = np.array([[0.5, 2.0, 2.0, -1.0, -np.inf], [-np.inf, -np.inf, 3.0, -np.inf, 1.0], [1.0, 1.0, 1.0, 1.0, 1.0]])
    for k in (1, 3, 5):
        indices = to_numpy(F.topk_indices(minimoe.tensor(x, dtype="float64").data, k))
        np.testing.assert_array_equal(indices, np.argsort(-x, axis=-1, kind="stable")[:, :k])


# ---- attention ---------------------------------------------------------------------------------------------------

ATTENTION = {  # name: (options, q, k, v shapes)
    "causal": (dict(), [(2, 3, 5, 4), (2, 3, 5, 4), (2, 3, 5, 6)]),
    "cached_keys": (dict(start_pos=3), [(2, 2, 4), (2, 5, 4), (2, 5, 3)]),
    "keys_shared_by_heads": (dict(start_pos=2, scale=0.3), [(2, 3, 2, 3), (2, 1, 4, 3), (2, 1, 4, 2)]),
    "not_causal": (dict(causal=False, scale=0.7), [(2, 3, 4), (2, 5, 4), (2, 5, 3)]),
}


@pytest.mark.parametrize("name", list(ATTENTION))
def test_attention_fused_equals_plain(backend, name):
    options, shapes = ATTENTION[name]
    arrays = [host(*shape, seed=i) for i, shape in enumerate(shapes)]
    check_same(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, **options),
               lambda q, k, v: scaled_dot_product_attention_plain(q, k, v, **options), arrays, name)


# ---- RMSNorm -------------------------------------------------------------------------------------------------------

def test_rms_norm_fused_equals_plain(backend, float64):
    norm = RMSNorm(6)
    weight = host(6, seed=1, low=0.5)

    def run(forward):
        def fn(x, w):
            norm.weight = w  # the weight as an input, so that its gradient is compared too
            return forward(x)
        return fn

    check_same(run(norm.forward), run(norm.forward_plain), [host(2, 3, 6), weight], "rms_norm")


# ---- Adam and AdamW ------------------------------------------------------------------------------------------------

OPTIMIZERS = {
    "adam": lambda p: Adam(p, lr=0.05),
    "adam_l2": lambda p: Adam(p, lr=0.05, betas=(0.8, 0.95), eps=1e-6, weight_decay=0.1),
    "adamw": lambda p: AdamW(p, lr=0.05, weight_decay=0.1),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_adam_update_in_place_equals_plain(backend, float64, name):
    param = minimoe.tensor(host(4, 3), requires_grad=True)
    optimizer = OPTIMIZERS[name]([param])
    fused, fused_state = param.data.copy(), {}
    plain, plain_state = param.data.copy(), {}
    for step in range(5):
        grad = minimoe.tensor(host(4, 3, seed=step + 1)).data
        optimizer.update(fused, grad.copy(), fused_state)
        plain = optimizer.update_plain(plain, grad.copy(), plain_state)
        check_close(fused, plain, ATOL, RTOL, name=f"{name}, step {step}: parameter")
        for buffer in ("m", "v"):
            check_close(fused_state[buffer], plain_state[buffer], ATOL, RTOL, name=f"{name}, step {step}: {buffer}")
        assert fused_state["step"] == plain_state["step"] == step + 1


# ---- the MoE dispatch ----------------------------------------------------------------------------------------------

MOE = {
    "softmax": dict(score_func="softmax"),
    "sigmoid_shared_route_scale": dict(score_func="sigmoid", route_scale=2.5, n_shared_experts=2),
    "groups_bias_aux_losses": dict(n_routed_experts=8, n_activated_experts=3, score_func="sigmoid", n_groups=4,
                                   topk_groups=2, bias_update_speed=1e-3, aux_loss_alpha=0.01, seq_aux_alpha=1e-3,
                                   z_loss_coef=1e-3),
    "capacity_in_eval": dict(score_func="softmax", capacity_factor=0.5),
}


@pytest.mark.parametrize("name", list(MOE))
def test_moe_dispatch_equals_plain_loop_over_experts(backend, float64, name):
    options = {"n_routed_experts": 6, "n_activated_experts": 2, **MOE[name]}
    layer = MoE(8, moe_inter_dim=5, **options)
    if layer.gate.bias is not None:  # a non-zero routing bias, so that it is really used
        layer.gate.bias = minimoe.tensor(host(layer.n_routed_experts, seed=5, low=-0.1, high=0.1)).data
    if name == "capacity_in_eval":
        layer.eval()
    x_host = host(2, 7, 8, seed=3)
    results = {}
    for forward in (layer.forward, layer.forward_plain):
        layer.zero_grad()
        x = minimoe.tensor(x_host, requires_grad=True)
        y = forward(x)
        loss = (y * minimoe.tensor(host(*y.shape, seed=4))).sum()
        if layer.balance_loss is not None:
            loss = loss + layer.balance_loss
        loss.backward()
        results[forward.__name__] = [to_numpy(y), to_numpy(x.grad)] + [
            to_numpy(p.grad) if p.grad is not None else np.zeros(p.shape) for p in layer.parameters()]
    names = ["output", "input gradient"] + [f"gradient of {n}" for n, _ in layer.named_parameters()]
    for label, fused, plain in zip(names, results["forward"], results["forward_plain"]):
        check_close(fused, plain, ATOL, RTOL, name=f"{name}: {label}", quiet=True)


def test_moe_plain_loop_refuses_capacity_drops_in_training(float64):
    layer = MoE(8, 4, 2, 5, capacity_factor=1.0)
    with pytest.raises(ValueError, match="forward_plain.*capacity_factor=1.0"):
        layer.forward_plain(minimoe.randn(1, 3, 8))
