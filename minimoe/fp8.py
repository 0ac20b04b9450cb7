"""FP8 training in miniature: DeepSeek-V3's fine-grained quantization (technical report §3.3), simulated exactly.

An FP8 number has 8 bits: E4M3 (4 exponent bits, 3 mantissa bits, largest value 448) for every GEMM input in V3,
E5M2 (largest 57344) for comparison. Eight bits cannot hold a tensor's range, so each group of values shares a
scale s, and the FP8 number stores x / s:

    s = amax(group) / 448,      q = round_E4M3(x / s),      x ≈ q · s     (an all-zero group gets s = 1)

V3 makes the groups small, so that one outlier spoils only its own group: activations per **1×128 tile** (one
token, 128 channels), weights per **128×128 block**. Its GEMMs take FP8 inputs, but the H800 tensor cores add
the products with only ~14 significant bits; every N_C = 128 elements of K the partial sum is **promoted** to an
FP32 accumulator on the CUDA cores, with the scales applied there. Forward (Fprop), input gradient (Dgrad) and
weight gradient (Wgrad) all run this way. Embedding, output head, MoE gate, normalisations and attention stay in
high precision; master weights and gradients are FP32.

This module simulates all of it on NumPy or CuPy:

    round_to_fp8(x, "e4m3")            x rounded to the nearest E4M3 value (ties to even, saturating at ±448)
    quantize(x, "tile")                an FP8 tensor: values on the E4M3 grid and their scales
    simulated_gemm(a, b, bits, n_c)    a bᵀ with a limited-precision accumulator and promotion every n_c
    fp8_matmul(x, w, recipe)           quantize, then simulated_gemm: one FP8 GEMM as V3 runs it
    FP8Linear / use_fp8(model)         a Linear whose three GEMMs run in FP8; the switch for a whole model

The rounding is exact: on NumPy it is ml_dtypes' cast to `float8_e4m3fn`; elsewhere (CuPy has no FP8 dtype) an
emulation with array ops, tested to agree bit for bit. Values are held in float32/float64 arrays whose entries
lie on the FP8 grid: we simulate the arithmetic, not the storage.

Simplified, against the report: `use_fp8` switches the feed-forward GEMMs only by default (V3 also runs the
attention projections in FP8; `strict=False` allows them); Wgrad re-quantizes x along the tokens from its FP32
copy instead of transposing a cached FP8 copy; scales are any float (not powers of two); the optimizer's moments
stay FP32 (V3: BF16); how the tensor core groups products before rounding (4 here) is an assumption, not a
published figure.
"""

import dataclasses
import functools
import itertools
import math
from dataclasses import dataclass

import ml_dtypes

from .autograd import Function, ShapeError
from .backend import NumpyBackend, get_array_module
from .nn.module import Linear, Module

__all__ = ["FP8Format", "FORMATS", "fp8_format", "round_to_fp8", "round_to_fp8_emulated", "round_significand",
           "Quantized", "quantize", "FP8Recipe", "RECIPES", "fp8_recipe", "simulated_gemm", "fp8_matmul",
           "FP8GroupedLinear", "fp8_linear", "FP8Linear", "use_fp8", "HIGH_PRECISION"]


# ==============================================================================================================
# formats and rounding
# ==============================================================================================================

@dataclass(frozen=True)
class FP8Format:
    """An 8-bit float: `mantissa_bits` fraction bits, normal numbers down to 2^min_exponent, largest `max`.

    Normal values are ±1.m × 2^e with e ≥ min_exponent; below that the subnormals ±0.m × 2^min_exponent share one
    spacing, 2^(min_exponent − mantissa_bits). `dtype` is ml_dtypes' NumPy type for the format."""

    name: str
    mantissa_bits: int
    min_exponent: int
    max: float
    dtype: type


FORMATS = {
    "e4m3": FP8Format("e4m3", 3, -6, 448.0, ml_dtypes.float8_e4m3fn),  # V3's only format: no inf, one NaN
    "e5m2": FP8Format("e5m2", 2, -14, 57344.0, ml_dtypes.float8_e5m2),  # more range, less precision
}


def fp8_format(name):
    """The FP8Format called `name` ("e4m3" or "e5m2"), or a ValueError naming the choices."""
    if isinstance(name, FP8Format):
        return name
    if name not in FORMATS:
        raise ValueError(f"fp8: unknown format {name!r}; choose one of {sorted(FORMATS)}")
    return FORMATS[name]


def round_to_fp8(x, fmt="e4m3"):
    """x rounded to the nearest value of the FP8 format, ties to even, saturating: |x| > max gives ±max (a
    bare cast would give NaN). Same shape and dtype as x (float32 or float64), every value on the FP8 grid.

    NumPy arrays go through ml_dtypes' cast; other backends through `round_to_fp8_emulated`."""
    fmt = fp8_format(fmt)
    xp = get_array_module(x)
    clipped = xp.clip(x, -fmt.max, fmt.max)
    if xp is NumpyBackend.xp:
        return clipped.astype(fmt.dtype).astype(x.dtype)
    return round_to_fp8_emulated(clipped, fmt)


def round_to_fp8_emulated(x, fmt="e4m3"):
    """Round-to-nearest-even onto the FP8 grid with backend array ops only (for CuPy, which has no FP8 dtype).

    Write |x| = f × 2^e with f in [1, 2) (`frexp` gives e). Between 2^e and 2^(e+1) the FP8 values are spaced by
    the quantum q = 2^(e − mantissa_bits); below the smallest normal 2^min_exponent the subnormals keep the
    quantum of the first binade, so  q = 2^(max(e, min_exponent) − mantissa_bits). Then

        round(x) = sign(x) · rint(|x| / q) · q

    `rint` rounds halves to even, and an even multiple of q is exactly an FP8 value whose last mantissa bit is 0,
    so this is IEEE round-to-nearest-even. Dividing by a power of two is exact, and a value that rounds up to
    2^(e+1) lands on the next binade's first value, as it should. Values beyond ±max saturate to ±max."""
    fmt = fp8_format(fmt)
    xp = get_array_module(x)
    magnitude = xp.minimum(xp.abs(x), fmt.max)
    _, exponent = xp.frexp(magnitude)  # magnitude = m · 2^exponent with m in [0.5, 1): e = exponent − 1
    quantum_exponent = xp.maximum(exponent - 1, fmt.min_exponent) - fmt.mantissa_bits
    rounded = xp.ldexp(xp.rint(xp.ldexp(magnitude, -quantum_exponent)), quantum_exponent)
    return xp.copysign(rounded, x).astype(x.dtype)


def round_significand(x, bits, mode="nearest"):
    """x rounded to `bits` significant binary digits (the implicit leading 1 included), keeping its exponent:
    a model of an accumulator narrower than its dtype. mode "nearest" rounds ties to even, "truncate" drops the
    extra bits (towards zero). Works on the bits of float32/float64: with d = digits of the dtype − bits,

        truncate:  clear the last d bits        nearest:  add 2^(d−1) − 1 + (bit d), then clear the last d bits

    (the added 1 for an odd kept digit turns an exact tie upwards, to the even neighbour; a carry out of the
    fraction correctly increments the exponent)."""
    xp = get_array_module(x)
    if x.dtype == xp.float64:
        unsigned, digits = xp.uint64, 53
    elif x.dtype == xp.float32:
        unsigned, digits = xp.uint32, 24
    else:
        raise TypeError(f"round_significand: expected float32 or float64, got {x.dtype}")
    if not 1 <= bits <= digits:
        raise ValueError(f"round_significand: bits={bits} must be in 1..{digits} for {x.dtype}")
    dropped = digits - bits
    if dropped == 0:
        return x
    u = x.view(unsigned)
    if mode == "nearest":
        u = u + unsigned((1 << (dropped - 1)) - 1) + ((u >> unsigned(dropped)) & unsigned(1))
    elif mode != "truncate":
        raise ValueError(f"round_significand: unknown mode {mode!r}; choose 'nearest' or 'truncate'")
    return (u & unsigned(~((1 << dropped) - 1) & ((1 << (8 * u.itemsize)) - 1))).view(x.dtype)


# ==============================================================================================================
# quantization: values on the FP8 grid, and their scales
# ==============================================================================================================

GRANULARITIES = ("tensor", "tile", "block")


@dataclass
class Quantized:
    """An FP8 tensor: `values` (on the FP8 grid, padded to whole groups) times `scale`, broadcast per group.

    granularity "tensor": scale is 0-d;  "tile": values (..., K'), scale (..., K'/t), one per 1×t group along
    the last axis;  "block": values (..., M', K'), scale (..., M'/r, K'/t), one per r×t block. `group` is the
    group's size along the grouped axes, (t,) or (r, t); `shape` the original (unpadded) shape."""

    values: object
    scale: object
    granularity: str
    group: tuple
    fmt: FP8Format
    shape: tuple

    def scale_per_value(self):
        """The scale of every entry of `values` (same shape)."""
        xp = get_array_module(self.values)
        grouped = _groups(self.values, self.granularity, self.group)
        return xp.broadcast_to(_scale_view(self.scale, self.granularity), grouped.shape).reshape(self.values.shape)

    def dequantize(self, dtype=None):
        """values · scale, cropped to the original shape, in `dtype` (default: the values' dtype). In float64 the
        product is exact (a 4-bit times a 24-bit significand)."""
        dtype = dtype or self.values.dtype
        grouped = _groups(self.values.astype(dtype), self.granularity, self.group)
        full = (grouped * _scale_view(self.scale.astype(dtype), self.granularity)).reshape(self.values.shape)
        return full[tuple(slice(0, n) for n in self.shape)]


def _groups(x, granularity, group):
    """A view of x with each group on axes of its own: (..., K/t, t) for tiles, (..., M/r, r, K/t, t) for blocks."""
    if granularity == "tile":
        return x.reshape(*x.shape[:-1], x.shape[-1] // group[-1], group[-1])
    if granularity == "block":
        *lead, m, k = x.shape
        return x.reshape(*lead, m // group[0], group[0], k // group[1], group[1])
    return x


def _scale_view(scale, granularity):
    """The group scales shaped to broadcast against `_groups`."""
    if granularity == "tile":
        return scale[..., None]
    if granularity == "block":
        return scale[..., :, None, :, None]
    return scale


def quantize(x, granularity="tile", fmt="e4m3", tile=128, pad=False, check_finite=True):
    """Quantize x to FP8 with one scale per group: s = amax(|group|) / fmt.max, values = round(x / s).

    granularity  "tensor" one scale for everything; "tile" one per 1×tile along the last axis (V3's activations:
                 per token, per 128 channels); "block" one per tile×tile block of the last two axes (V3's weights)
    pad          pad the grouped axes with zeros up to a multiple of `tile` (a group then covers fewer real
                 values; an axis shorter than `tile` is one group); without it a `tile` that does not divide them
                 is an error
    check_finite NaN or ±inf in x raise FloatingPointError (this reads one number back to the host)

    An all-zero group gets s = 1 (its values are 0), not 0/0. Returns a `Quantized`."""
    fmt = fp8_format(fmt)
    if granularity not in GRANULARITIES:
        raise ValueError(f"fp8.quantize: unknown granularity {granularity!r}; choose one of {list(GRANULARITIES)}")
    xp = get_array_module(x)
    if x.dtype.kind != "f":
        raise TypeError(f"fp8.quantize: expected a floating-point array, got {x.dtype}")
    grouped_axes = {"tensor": 0, "tile": 1, "block": 2}[granularity]
    if x.ndim < grouped_axes:
        raise ShapeError(f"fp8.quantize: {granularity}-wise scaling needs at least {grouped_axes} axes, got shape "
                         f"{tuple(x.shape)}")
    shape = tuple(x.shape)
    # with padding, an axis shorter than a tile is one group: the same scales as zero-padding it, for less work
    group = tuple(n if pad and 0 < n < tile else tile for n in shape[x.ndim - grouped_axes:])
    short = [0] * (x.ndim - grouped_axes) + [-n % size for n, size in zip(shape[x.ndim - grouped_axes:], group)]
    if any(short):
        if not pad:
            raise ShapeError(f"fp8.quantize: tile {tile} does not divide the {granularity}-grouped axes of shape "
                             f"{shape}; pass pad=True to pad them with zeros, or choose a tile that divides them")
        x = xp.pad(x, [(0, n) for n in short])
    groups = _groups(x, granularity, group)
    group_axes = {"tensor": None, "tile": -1, "block": (-3, -1)}[granularity]
    amax = xp.abs(groups).max(axis=group_axes) if x.size else xp.zeros((), dtype=x.dtype)  # one per group
    if check_finite and not bool(xp.isfinite(amax).all()):
        raise FloatingPointError(f"fp8.quantize: the input of shape {shape} holds NaN or ±inf; an FP8 scale "
                                 "cannot be computed from it (look for the overflow upstream)")
    tiny = xp.finfo(x.dtype).tiny
    scale = xp.where(amax > 0, xp.maximum(amax / fmt.max, tiny), 1).astype(x.dtype)
    values = round_to_fp8(groups / _scale_view(scale, granularity), fmt).reshape(x.shape)  # |x/s| ≤ max, ± rounding
    return Quantized(values, scale, granularity, group, fmt, shape)


# ==============================================================================================================
# the FP8 GEMM
# ==============================================================================================================

@dataclass(frozen=True)
class FP8Recipe:
    """How the FP8 GEMMs are done; the defaults are DeepSeek-V3's.

    fmt               the FP8 format of every GEMM input ("e4m3")
    activations       "tile": 1×tile scales along K (per token); or "tensor": one scale
    weights           "block": tile×tile scales; or "tensor": one scale
    tile              128 (the width of a tile, the side of a block)
    pad               pad dimensions that `tile` does not divide (the demo's width is 64: one tile per row)
    accumulator_bits  significant bits the tensor cores keep while adding products (≈ 14 on H800); None: exact
    promote_every     N_C: add the partial sum into an FP32 accumulator every N_C elements of K (128); None: never
    group_k           products the tensor core adds exactly before rounding them into its accumulator (4, as
                      Fasi et al. 2021 measured for V100 tensor cores; the H800's is not published)
    accumulator_rounding  "truncate" or "nearest" (how the narrow accumulator drops bits)
    quantize_gradients    Dgrad and Wgrad in FP8 as well (V3); False: only the forward GEMM
    check_finite      refuse NaN/inf inputs to a GEMM (one host read per quantization)
    """

    fmt: str = "e4m3"
    activations: str = "tile"
    weights: str = "block"
    tile: int = 128
    pad: bool = True
    accumulator_bits: int = 14
    promote_every: int = 128
    group_k: int = 4
    accumulator_rounding: str = "truncate"
    quantize_gradients: bool = True
    check_finite: bool = True

    def __post_init__(self):
        problems = []
        if self.fmt not in FORMATS:
            problems.append(f"fmt={self.fmt!r} must be one of {sorted(FORMATS)}")
        if self.activations not in ("tile", "tensor"):
            problems.append(f"activations={self.activations!r} must be 'tile' or 'tensor'")
        if self.weights not in ("block", "tensor"):
            problems.append(f"weights={self.weights!r} must be 'block' or 'tensor'")
        for name in ("tile", "group_k"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} must be ≥ 1")
        if self.accumulator_bits is not None and not 2 <= self.accumulator_bits <= 53:
            problems.append(f"accumulator_bits={self.accumulator_bits} must be in 2..53 (or None: exact)")
        if self.promote_every is not None and (self.promote_every < 1 or self.promote_every % max(self.group_k, 1)):
            problems.append(f"promote_every={self.promote_every} must be a positive multiple of group_k="
                            f"{self.group_k} (or None: never)")
        if self.accumulator_rounding not in ("truncate", "nearest"):
            problems.append(f"accumulator_rounding={self.accumulator_rounding!r} must be 'truncate' or 'nearest'")
        if problems:
            raise ValueError("FP8Recipe: " + "; ".join(problems))

    def quantize_along_k(self, x, scaling):
        """Dequantized x (float64) after quantizing it with `scaling` ("tile"/"block"/"tensor") over its last axis K."""
        q = quantize(x, scaling, self.fmt, self.tile, pad=self.pad, check_finite=self.check_finite)
        return q.dequantize(get_array_module(x).float64)

    def gemm(self, a, b):
        """a bᵀ from already-dequantized inputs a (M, K), b (N, K), accumulated as this recipe says."""
        return simulated_gemm(a, b, self.accumulator_bits, self.promote_every, self.group_k,
                              self.accumulator_rounding)


RECIPES = {
    "v3": FP8Recipe(),  # tile-wise activations, block-wise weights, 14-bit accumulator promoted every 128
    "per_tensor": FP8Recipe(activations="tensor", weights="tensor"),  # one scale per tensor, else the same
}


def fp8_recipe(recipe):
    """An FP8Recipe from itself or a name in RECIPES."""
    if isinstance(recipe, FP8Recipe):
        return recipe
    if recipe not in RECIPES:
        raise ValueError(f"fp8: unknown recipe {recipe!r}; choose one of {sorted(RECIPES)} or pass an FP8Recipe")
    return RECIPES[recipe]


def simulated_gemm(a, b, accumulator_bits=14, promote_every=128, group_k=4, rounding="truncate"):
    """C = a bᵀ (a (M, K), b (N, K)) as an FP8 tensor core adds it up, computed in float64 arrays:

        for each interval of N_C = promote_every elements of K:          (all of K when promote_every is None)
            partial = 0                                                  the tensor core's narrow accumulator
            for each group of group_k elements:  partial = round_bits(partial + Σ_group a_k b_k)
            C = round_fp32(C + partial)                                  promotion to the FP32 accumulator

    The group_k products of a group are added exactly, then the sum is rounded to `accumulator_bits`
    significant bits. Inputs are the dequantized FP8 values (q · s): the scales are applied before the products
    rather than at promotion, which moves no rounding but by a constant factor. accumulator_bits None: plain
    float64 `a @ b.T`, the exact reference.

    Vectorised: every group's exact sum in one batched matmul (K/group_k × M × N numbers), then a loop over the
    groups of one interval (all intervals at once), then a loop over the intervals for the FP32 additions."""
    xp = get_array_module(a)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ShapeError(f"simulated_gemm: expected a (M, K) and b (N, K), got {tuple(a.shape)} and {tuple(b.shape)}")
    if promote_every is not None and promote_every % group_k:
        raise ValueError(f"simulated_gemm: promote_every={promote_every} must be a multiple of group_k={group_k}")
    a, b = a.astype(xp.float64, copy=False), b.astype(xp.float64, copy=False)
    if accumulator_bits is None:
        return a @ b.T
    (m, k), n = a.shape, b.shape[0]
    interval = promote_every or max(-(-k // group_k) * group_k, group_k)
    padded = -(-k // interval) * interval  # zeros add nothing, and rounding an unchanged sum changes nothing
    a = xp.pad(a, ((0, 0), (0, padded - k)))
    b = xp.pad(b, ((0, 0), (0, padded - k)))
    intervals, groups = padded // interval, interval // group_k
    a_groups = a.reshape(m, intervals * groups, group_k).transpose(1, 0, 2)  # (G, M, group_k)
    b_groups = b.reshape(n, intervals * groups, group_k).transpose(1, 2, 0)  # (G, group_k, N)
    sums = (a_groups @ b_groups).reshape(intervals, groups, m, n)  # exact sum of each group's products
    partial = xp.zeros((intervals, m, n), dtype=xp.float64)  # one narrow accumulator per interval
    for group in range(groups):
        partial = round_significand(partial + sums[:, group], accumulator_bits, rounding)
    total = xp.zeros((m, n), dtype=xp.float64)  # (M, N) the FP32 accumulator, its values held in float64
    for i in range(intervals):
        total = (total + partial[i]).astype(xp.float32).astype(xp.float64)
    return total


def fp8_matmul(x, w, recipe="v3"):
    """y = x wᵀ as one FP8 GEMM of V3: x (M, K) quantized per activation scaling (1×128 tiles), w (N, K) per
    weight scaling (128×128 blocks), then `simulated_gemm`. Returns float64 (M, N)."""
    recipe = fp8_recipe(recipe)
    return recipe.gemm(recipe.quantize_along_k(x, recipe.activations), recipe.quantize_along_k(w, recipe.weights))


# ==============================================================================================================
# the FP8 linear layer: Fprop, Dgrad and Wgrad in FP8
# ==============================================================================================================

class FP8GroupedLinear(Function):
    """Rows of x in consecutive groups of the given sizes, group e multiplied by its own weight W_e (out, in),
    every GEMM in simulated FP8 as DeepSeek-V3 runs it (one group: an ordinary linear layer):

        Fprop   y_e  = GEMM( Q_act(x_e),   Q_w(W_e) )          K = in_features
        Dgrad   dx_e = GEMM( Q_act(g_e),   Q_w(W_e)ᵀ )         K = out_features
        Wgrad   dW_e = GEMM( Q_act(g_eᵀ),  Q_act(x_eᵀ) )       K = the group's rows (tokens)

    Q_act quantizes along the GEMM's K axis with 1×128 tiles, Q_w with 128×128 blocks (the same blocks serve W
    and Wᵀ, so the weight is quantized once). GEMM accumulates as `simulated_gemm`.

    The gradient is **straight-through**: rounding has derivative 0 almost everywhere, so the chain rule is applied
    as if quantization were the identity. The backward computes exactly

        dx = deq(Q_act(g)) · deq(Q_w(W)),      dW = deq(Q_act(gᵀ)) · deq(Q_act(xᵀ))ᵀ

    with the recipe's accumulator: with quantize_gradients=False and an exact accumulator these are the true
    gradients of x ↦ x · deq(Q_w(W))ᵀ and of W ↦ deq(Q_act(x)) · Wᵀ, the function of the forward pass with
    one operand's quantization frozen. Output and gradients take the input's dtype (master weights stay FP32)."""

    def __init__(self, sizes, recipe="v3"):
        self.recipe = fp8_recipe(recipe)
        starts = [0, *itertools.accumulate(sizes)]
        self.bounds = list(zip(starts[:-1], starts[1:]))

    def forward(self, x, *weights):
        if x.ndim != 2 or len(weights) != len(self.bounds) or x.shape[0] != self.bounds[-1][1]:
            raise ShapeError(f"FP8GroupedLinear: {tuple(x.shape)} input and {len(weights)} weights for groups "
                             f"{[end - start for start, end in self.bounds]} (expected a 2-D input)")
        xp = get_array_module(x)
        r = self.recipe
        x_q = r.quantize_along_k(x, r.activations)  # (rows, in) tiles are per row, so one pass serves all groups
        w_q = [r.quantize_along_k(w, r.weights) for w in weights]  # (out, in) each
        y = xp.empty((x.shape[0], weights[0].shape[0]), dtype=x.dtype)  # (rows, out)
        for (start, end), w in zip(self.bounds, w_q):
            y[start:end] = r.gemm(x_q[start:end], w)
        self.save(x, x_q, w_q)
        return y

    def backward(self, g):
        x, x_q, w_q = self.saved
        xp = get_array_module(g)
        r = self.recipe
        quantized = r.quantize_gradients

        def along_k(a):  # a GEMM operand (rows, K): quantized per tile along K as V3 does, or kept exact
            a = xp.ascontiguousarray(a)
            return r.quantize_along_k(a, r.activations) if quantized else a.astype(xp.float64)

        # without gradient quantization: exact GEMMs on the forward's quantized operands (the frozen function)
        gemm = r.gemm if quantized else dataclasses.replace(r, accumulator_bits=None).gemm
        gx = xp.empty(x.shape, dtype=g.dtype) if self.needs_grad[0] else None  # (rows, in)
        g_rows = along_k(g) if gx is not None else None  # (rows, out)
        gws = []
        for (start, end), w, needs in zip(self.bounds, w_q, self.needs_grad[1:]):
            if gx is not None:
                gx[start:end] = gemm(g_rows[start:end], w.T)  # Dgrad: K = out
            if needs and end > start:  # Wgrad: (out, in), K = the group's rows (tokens)
                x_cols = along_k(x[start:end].T) if quantized else x_q[start:end].T
                gws.append(gemm(along_k(g[start:end].T), x_cols).astype(g.dtype))
            else:
                gws.append(None)
        return (gx, *gws)


def fp8_linear(x, weight, bias=None, recipe="v3"):
    """x (..., in) @ weightᵀ (+ bias, added in high precision), the GEMMs in simulated FP8 (FP8GroupedLinear)."""
    if x.shape[-1] != weight.shape[1]:
        raise ShapeError(f"fp8_linear: input (..., {x.shape[-1]}) does not match weight {tuple(weight.shape)}")
    rows = math.prod(x.shape[:-1])
    y = FP8GroupedLinear([rows], recipe)(x.reshape(rows, x.shape[-1]), weight)  # (rows, out)
    y = y.reshape(*x.shape[:-1], weight.shape[0])
    return y if bias is None else y + bias


class FP8Linear(Linear):
    """A Linear whose forward and backward GEMMs run in simulated FP8 (`fp8_linear`). Same parameters and names
    as Linear, so checkpoints move freely between the two; the master weight stays FP32."""

    def __init__(self, in_features, out_features, bias=True, recipe="v3"):
        super().__init__(in_features, out_features, bias)
        self.recipe = fp8_recipe(recipe)

    @classmethod
    def from_linear(cls, linear, recipe="v3"):
        """An FP8Linear sharing `linear`'s Parameters (no copy)."""
        layer = cls.__new__(cls)
        Module.__init__(layer)
        layer.in_features, layer.out_features = linear.in_features, linear.out_features
        layer.weight, layer.bias = linear.weight, linear.bias
        layer.recipe = fp8_recipe(recipe)
        layer.training = linear.training
        return layer

    def forward(self, x):  # (..., in) -> (..., out)
        return fp8_linear(x, self.weight, self.bias, self.recipe)

    def extra_repr(self):
        name = next((n for n, r in RECIPES.items() if r == self.recipe), "custom")
        return super().extra_repr() + f", fp8={name}"


# ==============================================================================================================
# switching a model to FP8
# ==============================================================================================================

# What DeepSeek-V3 keeps in BF16/FP32 (report §3.3.1), by our parameter names.
HIGH_PRECISION = {
    "embed": "the embedding", "head": "the output head", "gate": "the MoE gate", "norm": "a normalisation",
    "attn": "attention",
}


def _high_precision_part(name):
    """Which part of HIGH_PRECISION the dotted module name belongs to, or None."""
    for part in name.split("."):
        if part in HIGH_PRECISION or part.endswith("_norm"):
            return HIGH_PRECISION.get(part, "a normalisation")
    return None


def use_fp8(model, recipe="v3", modules=None, strict=True):
    """Run the GEMMs of `model`'s feed-forward layers in simulated FP8, in place; returns the model.

    modules  dotted names of sub-modules to switch (every Linear under them, and the routed experts of an MoE
             layer under them); default: every `ffn` (dense MLPs, shared and routed experts), V3's choice
    strict   refuse a module V3 keeps in high precision: the embedding, the head, the MoE gate, the norms and
             attention. (V3 keeps the attention *operators* — scores, softmax, weighted sum — in BF16; its
             projections wq … wo do run in FP8. strict=False lets you quantize those projections, or the head.)

    Parameters are shared, not copied: the state dict, the optimizer and checkpoints are unchanged. An MoE layer
    gives up its sync-free decode path (it would run the routed experts in float32): decoding then reads the
    expert sizes back to the host, as training does."""
    from .nn.moe import MoE  # here, not at the top: nn.moe is above this module's basic needs

    recipe = fp8_recipe(recipe)
    named = dict(model.named_modules())
    targets = modules if modules is not None else [n for n in named if n.split(".")[-1] == "ffn"]
    if isinstance(targets, str):
        targets = [targets]
    switched = []
    for target in targets:
        if target not in named:
            raise ValueError(f"use_fp8: {type(model).__name__} has no module {target!r}")
        part = _high_precision_part(target)
        if strict and part:
            raise ValueError(f"use_fp8: {target!r} is {part}, which DeepSeek-V3 keeps in high precision (report "
                             "§3.3.1); pass strict=False to quantize it anyway")
        found = False
        for name, module in list(named.items()):
            if not (name == target or name.startswith(target + ".") or not target):
                continue
            if isinstance(module, MoE):
                module.grouped_linear = functools.partial(FP8GroupedLinear, recipe=recipe)
                # MoE's sync-free decode path (few tokens, no_grad) multiplies by the expert weights directly,
                # in float32: turned off, every forward (generation included) runs the experts in FP8
                module.sync_free_tokens = 0
                switched.append(name + ".experts")
                found = True
            elif type(module) is Linear:
                if strict and _high_precision_part(name):  # e.g. the gate's projection inside an ffn
                    continue
                parent_name, _, attribute = name.rpartition(".")
                setattr(named[parent_name], attribute, FP8Linear.from_linear(module, recipe))
                switched.append(name)
                found = True
        if not found:
            raise ValueError(f"use_fp8: {target!r} holds no Linear layer or MoE experts to run in FP8")
    model.fp8_modules = switched
    return model
