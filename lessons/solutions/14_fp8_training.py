"""Solutions to the exercises of lessons/14_fp8_training.ipynb.

Each `# %% exercise: <name>` section replaces the notebook cell tagged `exercise:<name>`. The sections run inside
the notebook, so they use the names its earlier cells define (np, minimoe, fp8, ...).
tests/test_lessons.py runs the notebook with these solutions through the same check cells a student runs.
"""

# %% exercise: round_e5m2
def round_e5m2(x):
    # x: a float64 array of any backend -> the same shape, every value on the E5M2 grid
    xp = minimoe.get_array_module(x)
    magnitude = xp.minimum(xp.abs(x), 57344.0)  # saturate first
    _, exponent = xp.frexp(magnitude)  # magnitude = m · 2^exponent, m in [0.5, 1): e = exponent − 1
    quantum = xp.ldexp(xp.ones_like(magnitude), xp.maximum(exponent - 1, -14) - 2)  # 2 mantissa bits
    return xp.sign(x) * xp.rint(magnitude / quantum) * quantum  # rint: ties to even


# %% exercise: quantize_blocks
def quantize_blocks(w, block):
    # w (M, N) float32 -> values (M, N) on the E4M3 grid, scales (M // block, N // block)
    rows, cols = w.shape
    blocks = w.reshape(rows // block, block, cols // block, block)  # (M/b, b, N/b, b)
    amax = np.abs(blocks).max(axis=(1, 3))  # (M/b, N/b)
    scales = np.where(amax > 0, amax / np.float32(448), np.float32(1)).astype(np.float32)
    values = fp8.round_to_fp8(blocks / scales[:, None, :, None], "e4m3").reshape(rows, cols)
    return values, scales


# %% exercise: dot_with_promotion
def dot_with_promotion(a, b, bits, promote_every):
    # a, b (K,) float64 -> float: the sum of a[k] * b[k] through a narrow register and a float32 total
    total, register = np.float32(0), np.float64(0)
    for k in range(len(a)):
        register = fp8.round_significand(np.float64(register + a[k] * b[k]), bits, "nearest")
        if promote_every and (k + 1) % promote_every == 0:
            total, register = np.float32(total + register), np.float64(0)
    return float(np.float32(total + register))
