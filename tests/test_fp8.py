"""minimoe.fp8 against independent references: ml_dtypes' FP8 casts (bit for bit), a quantizer written with a
loop over groups, a scalar loop for the narrow accumulator, float64 GEMMs of the dequantized inputs, and the
straight-through gradients as documented; then the model switch and its errors."""

import dataclasses
import itertools

import ml_dtypes
import numpy as np
import pytest

import minimoe
from minimoe import fp8
from minimoe.autograd import ShapeError
from minimoe.model import ModelConfig, Transformer
from minimoe.testing import check_close, to_numpy
from parity import require_torch

E4M3 = ml_dtypes.float8_e4m3fn
EXACT = dataclasses.replace(fp8.RECIPES["v3"], accumulator_bits=None)  # V3's quantization, exact accumulation


def sweep_float32(fmt):
    """Every finite bfloat16-representable float32 (all exponents, subnormals included), every exact tie between
    neighbouring FP8 values and the float32 on either side of it, values around ±max, and random float32 bits."""
    bf16 = (np.arange(2 ** 16, dtype=np.uint32) << 16).view(np.float32)
    grid = np.unique(np.arange(256, dtype=np.uint8).view(fmt.dtype).astype(np.float32))
    grid = grid[np.isfinite(grid)]
    ties = (grid[:-1] + grid[1:]) / 2  # exact in float32: the midpoints need 5 significant bits
    around = [ties, np.nextafter(ties, np.float32(np.inf)), np.nextafter(ties, np.float32(-np.inf))]
    big = np.array([fmt.max, fmt.max * 1.03, fmt.max * 1.07, fmt.max * 2, 3e38, 1e-45, -1e-45], np.float32)
    bits = np.random.default_rng(0).integers(0, 2 ** 32, 300_000, dtype=np.uint64).astype(np.uint32)
    x = np.concatenate([bf16, *around, big, -big, bits.view(np.float32)])
    return x[np.isfinite(x)]


@pytest.mark.parametrize("name", ["e4m3", "e5m2"])
def test_emulated_rounding_matches_ml_dtypes_bit_for_bit(name):
    fmt = fp8.FORMATS[name]
    x = sweep_float32(fmt)
    expected = np.clip(x, -fmt.max, fmt.max).astype(fmt.dtype).astype(np.float32)  # saturate, then cast
    emulated = fp8.round_to_fp8_emulated(x, name)
    mismatched = np.flatnonzero(emulated.view(np.uint32) != expected.view(np.uint32))
    assert mismatched.size == 0, f"{name}: {mismatched.size} values differ, e.g. {x[mismatched[:5]]}"
    assert emulated.dtype == np.float32
    assert np.array_equal(fp8.round_to_fp8(x, name).view(np.uint32), expected.view(np.uint32))


def test_rounding_on_fakegpu_is_the_emulation():
    x = sweep_float32(fp8.FORMATS["e4m3"])[:50_000]
    with minimoe.use_backend("fakegpu") as device:
        on_device = fp8.round_to_fp8(device.asarray(x), "e4m3")
        assert type(on_device) is device.array_type
        host = device.to_numpy(on_device)
    assert np.array_equal(host.view(np.uint32), np.clip(x, -448, 448).astype(E4M3).astype(np.float32).view(np.uint32))


def test_round_significand_matches_frexp():
    x = np.random.default_rng(1).standard_normal(20_000) * np.exp(np.random.default_rng(2).uniform(-30, 30, 20_000))
    ties = np.array([1 + 2.0 ** -14, 1 + 3 * 2.0 ** -14, -(1 + 3 * 2.0 ** -14)])  # halfway at 14 bits
    x = np.concatenate([x, ties, [0.0]])
    for bits, mode in itertools.product([3, 14, 24], ["nearest", "truncate"]):
        fraction, exponent = np.frexp(x)
        kept = (np.rint if mode == "nearest" else np.trunc)(np.ldexp(fraction, bits))
        assert np.array_equal(fp8.round_significand(x, bits, mode), np.ldexp(kept, exponent - bits)), (bits, mode)
    assert list(fp8.round_significand(ties, 14, "nearest")) == [1.0, 1 + 4 * 2.0 ** -14, -(1 + 4 * 2.0 ** -14)]


# ---- quantization ------------------------------------------------------------------------------------------------

def reference_quantize(x, granularity, tile):
    """(values, per-value scales) by a loop over the groups, ml_dtypes doing the rounding; x is 2-D float32."""
    m, k = x.shape
    if granularity == "tensor":
        groups = [(slice(None), slice(None))]
    elif granularity == "tile":
        groups = [(slice(i, i + 1), slice(j, j + tile)) for i in range(m) for j in range(0, k, tile)]
    else:
        groups = [(slice(i, i + tile), slice(j, j + tile)) for i in range(0, m, tile) for j in range(0, k, tile)]
    values, scales = np.zeros_like(x), np.zeros_like(x)
    for group in groups:
        amax = np.abs(x[group]).max()
        scale = amax / np.float32(448) if amax > 0 else np.float32(1)
        values[group] = np.clip(x[group] / scale, -448, 448).astype(E4M3).astype(np.float32)
        scales[group] = scale
    return values, scales


@pytest.mark.parametrize("granularity", ["tensor", "tile", "block"])
def test_quantize_matches_a_loop_over_groups(granularity):
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((8, 24)) * np.exp(rng.uniform(-3, 3, (8, 1)))).astype(np.float32)
    x[2, 5] = 300.0  # an outlier
    x[4:8, 16:24] = 0.0  # an all-zero tile and block
    q = fp8.quantize(x, granularity, tile=4 if granularity == "block" else 8)
    values, scales = reference_quantize(x, granularity, 4 if granularity == "block" else 8)
    assert np.array_equal(q.values, values) and np.array_equal(q.scale_per_value(), scales)
    assert np.all(np.abs(q.values) <= 448) and np.all(np.isfinite(q.scale))
    check_close(q.dequantize(np.float64), values.astype(np.float64) * scales, atol=0, rtol=0, name="dequantize")
    # every value within half an E4M3 step (2^-4 relative, for normals) of x, given its group's scale
    assert np.all(np.abs(q.dequantize(np.float64) - x) <= np.maximum(np.abs(x) / 16, scales * 2.0 ** -10) * 1.0001)


def test_zero_groups_get_scale_one_and_padding_crops_back():
    x = np.zeros((3, 10), np.float32)
    x[0, :3] = [1.0, -2.0, 0.5]
    q = fp8.quantize(x, "tile", tile=4, pad=True)
    assert q.values.shape == (3, 12) and q.scale.shape == (3, 3)
    assert np.array_equal(q.scale[1:], np.ones((2, 3), np.float32)) and np.all(q.values[1:] == 0)
    assert q.scale[0, 0] == np.float32(2.0) / np.float32(448)
    assert q.dequantize().shape == (3, 10)
    padded, _ = reference_quantize(np.pad(x, ((0, 0), (0, 2))), "tile", 4)
    assert np.array_equal(q.values, padded)


@pytest.mark.parametrize("granularity, shape", [("tile", (3, 10)), ("block", (5, 40)), ("block", (40, 7))])
def test_an_axis_shorter_than_a_tile_is_one_group_as_if_zero_padded(granularity, shape):
    x = np.random.default_rng(10).standard_normal(shape).astype(np.float32)
    rows, cols = shape
    padded = np.pad(x, ((0, -rows % 16 if granularity == "block" else 0), (0, -cols % 16)))
    values, scales = reference_quantize(padded, granularity, 16)
    expected = (values.astype(np.float64) * scales)[:rows, :cols]
    assert np.array_equal(fp8.quantize(x, granularity, tile=16, pad=True).dequantize(np.float64), expected)


def test_quantize_errors_are_clear():
    x = np.ones((4, 6), np.float32)
    with pytest.raises(ShapeError, match=r"tile 4 does not divide .*\(4, 6\).*pad=True"):
        fp8.quantize(x, "tile", tile=4)
    with pytest.raises(ValueError, match=r"unknown format 'e3m4'.*e4m3"):
        fp8.quantize(x, "tile", fmt="e3m4", tile=2)
    with pytest.raises(ValueError, match="unknown granularity 'row'"):
        fp8.quantize(x, "row")
    for bad in (np.nan, np.inf):
        x[1, 2] = bad
        with pytest.raises(FloatingPointError, match="NaN or ±inf"):
            fp8.quantize(x, "tensor")
    with pytest.raises(ValueError, match="unknown recipe 'fp4'"):
        fp8.fp8_recipe("fp4")
    with pytest.raises(ValueError, match="promote_every=100 must be a positive multiple of group_k=32"):
        fp8.FP8Recipe(promote_every=100, group_k=32)


# ---- the GEMM ----------------------------------------------------------------------------------------------------

def test_exact_accumulation_is_a_float64_gemm_of_the_dequantized_inputs():
    rng = np.random.default_rng(4)
    x, w = rng.standard_normal((40, 256)).astype(np.float32), rng.standard_normal((136, 256)).astype(np.float32)
    x[3, 7] = 80.0
    x_values, x_scales = reference_quantize(x, "tile", 128)
    w_values, w_scales = reference_quantize(np.pad(w, ((0, 120), (0, 0))), "block", 128)
    expected = (x_values.astype(np.float64) * x_scales) @ (w_values.astype(np.float64) * w_scales)[:136].T
    check_close(fp8.fp8_matmul(x, w, EXACT), expected, atol=1e-12, rtol=1e-12, name="exact fp8 gemm")


def scalar_accumulation(a, b, bits, promote_every, group_k):
    """C[i, j] by explicit loops: a narrow truncating accumulator per interval, an FP32 running total."""
    def narrow(value):
        fraction, exponent = np.frexp(value)
        return float(np.ldexp(np.trunc(np.ldexp(fraction, bits)), exponent - bits))

    out = np.zeros((a.shape[0], b.shape[0]))
    for i, j in itertools.product(range(a.shape[0]), range(b.shape[0])):
        total = np.float32(0)
        for start in range(0, a.shape[1], promote_every):
            partial = 0.0
            for step in range(start, min(start + promote_every, a.shape[1]), group_k):
                partial = narrow(partial + sum(a[i, k] * b[j, k] for k in range(step, min(step + group_k,
                                                                                         a.shape[1]))))
            total = np.float32(total + partial)
        out[i, j] = total
    return out


def test_narrow_accumulator_matches_a_scalar_loop():
    rng = np.random.default_rng(5)
    a, b = rng.standard_normal((3, 70)), rng.standard_normal((2, 70))
    a, b = np.clip(a * 30, -448, 448).astype(E4M3).astype(np.float64), b.astype(np.float32).astype(np.float64)
    for promote_every in (16, None):
        mine = fp8.simulated_gemm(a, b, accumulator_bits=8, promote_every=promote_every, group_k=4)
        expected = scalar_accumulation(a, b, 8, promote_every or 72, 4)
        check_close(mine, expected, atol=0, rtol=0, name=f"accumulator, promote_every={promote_every}")
    exact = a @ b.T
    assert np.abs(fp8.simulated_gemm(a, b, 8, None, 4) - exact).max() > 1e-3 * np.abs(exact).max()  # it does bite


def test_promotion_cuts_the_accumulation_error():
    rng = np.random.default_rng(6)
    a, b = rng.random((16, 4096)), rng.random((16, 4096))
    exact = a @ b.T
    never = np.abs(fp8.simulated_gemm(a, b, 14, None) - exact).max() / np.abs(exact).max()
    every_128 = np.abs(fp8.simulated_gemm(a, b, 14, 128) - exact).max() / np.abs(exact).max()
    assert 5e-3 < never < 5e-2 and every_128 < 2e-3  # the report: ~2% at K = 4096 without promotion


# ---- the FP8 linear layer ----------------------------------------------------------------------------------------

def deq(x, granularity, tile=128):
    """Dequantized x (float64) by the reference quantizer, padding the grouped axes to whole tiles."""
    m, k = x.shape
    pad_m = -m % tile if granularity == "block" else 0
    values, scales = reference_quantize(np.pad(x, ((0, pad_m), (0, -k % tile))), granularity, tile)
    return (values.astype(np.float64) * scales)[:m, :k]


def run_linear(recipe, x, w, g):
    x_t, w_t = minimoe.Tensor(x, requires_grad=True), minimoe.Tensor(w, requires_grad=True)
    y = fp8.fp8_linear(x_t, w_t, recipe=recipe)
    (y * minimoe.Tensor(g)).sum().backward()
    return to_numpy(y), to_numpy(x_t.grad), to_numpy(w_t.grad)


@pytest.fixture
def linear_case():
    rng = np.random.default_rng(7)
    x = rng.standard_normal((2, 100, 136)).astype(np.float32)  # (B, T, in): 200 tokens, in = 136 (padded to 256)
    x[0, 5, :3] = [60.0, -40.0, 90.0]
    w = (rng.standard_normal((72, 136)) / 12).astype(np.float32)  # (out, in)
    g = rng.standard_normal((2, 100, 72)).astype(np.float32)  # dL/dy
    return x, w, g


def test_fp8_linear_gradients_are_the_documented_straight_through_ones(linear_case):
    x, w, g = linear_case
    x2, g2 = x.reshape(200, 136), g.reshape(200, 72)
    y, gx, gw = run_linear(EXACT, x, w, g)
    check_close(y.reshape(200, 72), deq(x2, "tile") @ deq(w, "block").T, atol=1e-5, rtol=1e-6, name="Fprop")
    check_close(gx.reshape(200, 136), deq(g2, "tile") @ deq(w, "block"), atol=1e-5, rtol=1e-6, name="Dgrad")
    check_close(gw, deq(g2.T.copy(), "tile") @ deq(x2.T.copy(), "tile").T, atol=1e-4, rtol=1e-6, name="Wgrad")


def test_without_gradient_quantization_the_gradient_is_that_of_the_dequantized_function(linear_case):
    """quantize_gradients=False: dL/dx is the true gradient of L(x) = Σ g ⊙ (x · deq(Q(W))ᵀ), checked by central
    differences on that (linear, hence smooth) function."""
    x, w, g = linear_case
    recipe = dataclasses.replace(EXACT, quantize_gradients=False)
    _, gx, gw = run_linear(recipe, x, w, g)
    w_q = deq(w, "block")
    loss = lambda xs: float(np.sum(g.astype(np.float64) * (xs @ w_q.T)))  # noqa: E731
    rng = np.random.default_rng(8)
    for _ in range(5):
        index = tuple(rng.integers(0, n) for n in x.shape)
        step = np.zeros(x.shape)
        step[index] = 1e-3
        numeric = (loss(x + step) - loss(x - step)) / 2e-3
        assert abs(numeric - gx[index]) <= 1e-6 * (1 + abs(numeric)), (index, numeric, gx[index])
    check_close(gw, g.reshape(200, 72).T.astype(np.float64) @ deq(x.reshape(200, 136), "tile"), atol=1e-4,
                rtol=1e-6, name="Wgrad of W ↦ deq(Q(x)) Wᵀ")


def test_v3_recipe_stays_close_to_float32(linear_case):
    x, w, g = linear_case
    y, gx, gw = run_linear("v3", x, w, g)
    exact_dw = g.reshape(200, 72).T @ x.reshape(200, 136)
    for name, mine, exact in [("y", y, x @ w.T), ("dx", gx, g @ w), ("dW", gw, exact_dw)]:
        error = np.linalg.norm(mine - exact) / np.linalg.norm(exact)
        assert 1e-3 < error < 0.08, (name, error)  # FP8's ~3% per value, averaged down, but never zero


def test_fp8_linear_runs_the_same_on_fakegpu(linear_case):
    x, w, g = linear_case
    host = run_linear("v3", x, w, g)
    with minimoe.use_backend("fakegpu") as device:
        on_device = run_linear("v3", device.asarray(x), device.asarray(w), device.asarray(g))
    for mine, expected in zip(on_device, host):
        assert np.array_equal(mine, expected)


# ---- the model switch --------------------------------------------------------------------------------------------

SMALL = dict(vocab_size=20, dim=32, n_layers=2, n_heads=4, max_seq_len=16, n_routed_experts=4,
             n_activated_experts=2, moe_inter_dim=24, inter_dim=48, n_dense_layers=1)


def test_model_switch_quantizes_only_the_ffn_and_keeps_the_state_dict():
    plain = Transformer(ModelConfig(**SMALL))
    minimoe.manual_seed(0)
    model = Transformer(ModelConfig(**SMALL, fp8="v3"))
    assert set(model.state_dict()) == set(plain.state_dict())
    kinds = {name: type(m).__name__ for name, m in model.named_modules()}
    assert kinds["layers.0.ffn.w1"] == "FP8Linear" and kinds["layers.1.ffn.shared_experts.w2"] == "FP8Linear"
    assert kinds["layers.1.attn.wq"] == kinds["head"] == "Linear" and kinds["layers.1.ffn.gate"] == "Gate"
    assert isinstance(model.layers[1].ffn.grouped_linear.func, type) and "layers.1.ffn.experts" in model.fp8_modules

    model.load_state_dict(plain.state_dict())
    ids = np.random.default_rng(9).integers(0, 20, (4, 16))
    targets = minimoe.get_backend().asarray(np.roll(ids, -1, axis=1))
    losses = []
    for m in (plain, model):
        loss = minimoe.functional.cross_entropy(m(ids), targets)
        loss.backward()
        losses.append(loss.item())
    assert losses[0] != losses[1] and abs(losses[1] - losses[0]) < 0.02 * losses[0]
    expert = model.layers[1].ffn.experts[0].w1.weight
    plain_expert = plain.layers[1].ffn.experts[0].w1.weight
    assert expert.grad is not None
    assert np.linalg.norm(expert.grad - plain_expert.grad) < 0.1 * np.linalg.norm(plain_expert.grad)


def test_old_configs_load_and_bad_fp8_options_are_refused():
    old = ModelConfig(**SMALL).to_dict()
    del old["fp8"]  # a checkpoint written before the field existed
    assert ModelConfig.from_dict(old).fp8 is None
    with pytest.raises(ValueError, match=r"fp8='fp4' must be None or one of \['per_tensor', 'v3'\]"):
        ModelConfig(fp8="fp4")
    model = Transformer(ModelConfig(**SMALL))
    for name, part in [("head", "the output head"), ("embed", "the embedding"), ("layers.0.attn", "attention"),
                       ("layers.1.ffn.gate", "the MoE gate"), ("layers.0.ffn_norm", "a normalisation")]:
        with pytest.raises(ValueError, match=f"'{name}' is {part}, which DeepSeek-V3 keeps in high precision"):
            fp8.use_fp8(model, modules=[name])
    fp8.use_fp8(model, modules=["layers.0.attn"], strict=False)  # the projections, on request
    assert type(model.layers[0].attn.wq).__name__ == "FP8Linear"
    with pytest.raises(ValueError, match="has no module 'layers.9.ffn'"):
        fp8.use_fp8(model, modules=["layers.9.ffn"])


def test_fp8_linear_layer_and_the_v3_parameter_count():
    from benchmarks import fp8 as measurements

    layer = fp8.FP8Linear(20, 6, recipe="per_tensor")
    y = layer(minimoe.randn(3, 4, 20))
    assert y.shape == (3, 4, 6) and "fp8=per_tensor" in repr(layer)
    total = sum(measurements.v3_parameters().values())
    assert abs(total - 671e9) < 0.5e9, total  # the report: 671B parameters (the MTP module not included)


def test_an_fp8_model_trains_the_same_on_fakegpu():
    """The whole model, routed experts included, on CuPy's rules: no host array sneaks in, same numbers."""
    ids = np.random.default_rng(11).integers(0, 20, (3, 16))
    results = []
    for where in ("numpy", "fakegpu"):
        with minimoe.use_backend(where) as device:
            minimoe.manual_seed(0)
            model = Transformer(ModelConfig(**SMALL, fp8="v3"))
            targets = device.asarray(np.roll(ids, -1, axis=1))
            loss = minimoe.functional.cross_entropy(model(device.asarray(ids)), targets)
            loss.backward()
            results.append((loss.item(), to_numpy(model.layers[1].ffn.experts[2].w2.weight.grad)))
    assert results[0][0] == results[1][0] and np.array_equal(results[0][1], results[1][1])


def test_generation_runs_the_routed_experts_in_fp8_too():
    """A few tokens under no_grad take MoE's sync-free decode path, which multiplies by the expert weights
    directly: an FP8 model must give there what its training path gives (else sampling runs in float32)."""
    minimoe.manual_seed(0)
    model = Transformer(ModelConfig(**SMALL, fp8="v3"))
    minimoe.manual_seed(0)
    plain = Transformer(ModelConfig(**SMALL))
    model.eval()
    plain.eval()
    ids = np.random.default_rng(5).integers(0, 20, (2, 8))  # 16 tokens: fewer than MoE.sync_free_tokens
    assert ids.size <= type(model.layers[1].ffn).sync_free_tokens
    training_path = model(ids).numpy()  # gradients on: the grouped FP8 GEMMs
    with minimoe.no_grad():
        decoding, reference = model(ids).numpy(), plain(ids).numpy()
    check_close(decoding, training_path, atol=0, rtol=0, name="FP8 model, decode path vs grouped path")
    assert np.abs(decoding - reference).max() > 1e-4  # and it is FP8, not float32


def test_the_bf16_control_rounds_as_torch_does():
    """The benchmark's bf16 control (ml_dtypes' bfloat16) rounds as torch's bfloat16 does, over six decades."""
    torch = require_torch()
    from benchmarks import fp8 as measurements

    x = (np.random.default_rng(3).standard_normal((5, 70)) * 10.0 ** np.arange(-4, 6, 2)[:, None]).astype(np.float32)
    expected = torch.from_numpy(x).to(torch.bfloat16).to(torch.float64).numpy()
    check_close(measurements.BF16Inputs().quantize_along_k(x, "tile"), expected, atol=0, rtol=0, name="bf16 control")


def test_training_table_nudge_and_summary():
    """The benchmark's nudge leaves the random state alone, and its summary computes what its docstring says on a
    hand-made table."""
    from benchmarks import fp8 as measurements

    minimoe.manual_seed(0)
    model = Transformer(ModelConfig(**SMALL))
    before = {name: p.numpy().copy() for name, p in model.named_parameters()}
    measurements.perturb_weights(model, 1e-6, seed=0)
    next_draw = minimoe.randn(3).numpy()
    minimoe.manual_seed(0)
    Transformer(ModelConfig(**SMALL))
    assert np.array_equal(minimoe.randn(3).numpy(), next_draw)  # the nudge drew nothing from the global state
    moved = [np.abs(p.numpy() / before[name] - 1).max() for name, p in model.named_parameters() if before[name].any()]
    assert 1e-7 < max(moved) < 1e-5

    def row(seed, variant, late_losses, final):
        return {"seed": seed, "variant": variant, "steps": 10, "heldout_loss": final,
                "evals": [(4, 9.0), *[(step, loss) for step, loss in zip((6, 8), late_losses)], (10, final)]}

    rows = measurements.compare_with_float32([row(0, "float32", [2.5], 2.0), row(0, "fp8", [2.3], 2.2),
                                              row(1, "float32", [1.5], 1.0), row(1, "fp8", [1.6], 0.9)])
    fp8_rows = [r for r in rows if r["variant"] == "fp8"]
    check_close([r["signed_error"] for r in fp8_rows], [0.1, -0.1], name="final errors")
    check_close([r["late_error"] for r in fp8_rows], [0.0, 0.0], atol=1e-12, name="late errors (steps > 5)")
    reference, summary = measurements.summarise(rows)
    check_close(reference["seed_std"], np.sqrt(0.5), name="float32's seed-to-seed spread")
    check_close([summary["mean_abs_final"], summary["max_abs_final"], summary["error_of_seed_mean"]],
                [0.1, 0.1, 3.1 / 3 - 1], name="summary")
