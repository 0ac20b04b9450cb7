"""Solutions to the exercises of lessons/04_attention.ipynb.

Each `# %% exercise: <name>` section replaces the notebook cell tagged `exercise:<name>`. The sections run inside
the notebook, so they use the names its earlier cells define (np, math, minimoe, F, my_attention, ...).
tests/test_lessons.py runs the notebook with these solutions through the same check cells a student runs.
"""

# %% exercise: sliding_window_attention
def sliding_window_attention(q, k, v, window):
    """Causal attention in which query i sees keys i - window + 1 .. i only (those that exist).
    q, k (..., T, D), v (..., T, Dv) -> (..., T, Dv). Tensors in and out, differentiable."""
    tokens = q.shape[-2]
    with minimoe.use_backend(q.backend.name):  # the mask lives where the inputs do
        distance = minimoe.arange(tokens)[:, None] - minimoe.arange(tokens)[None, :]  # i - j, (T, T)
    visible = (distance >= 0) & (distance < window)
    return my_attention(q, k, v, visible)[0]


# %% exercise: rope_rotate_half
def rope_rotate_half(x, cos, sin):
    """Turn the pairs (x[..., i], x[..., i + D/2]) by the angles of cos, sin (T, D/2).
    x (B, T, D) or (B, T, H, D), a Tensor -> a Tensor of the same shape."""
    if x.ndim == 4:  # the same angle for every head
        cos, sin = cos[:, None], sin[:, None]  # (T, 1, D/2)
    first, second = F.split(x, x.shape[-1] // 2, axis=-1)  # (..., D/2) each: the two halves
    return F.concatenate([first * cos - second * sin, first * sin + second * cos], axis=-1)


# %% exercise: grouped_query_attention
def grouped_query_attention(q, k, v):
    """Causal attention with shared key/value heads: q (B, H, T, D), k (B, G, T, D), v (B, G, T, Dv), G divides H;
    query head h uses key/value head h // (H // G). Returns (B, H, T, Dv)."""
    batch, heads, tokens, dim = q.shape
    groups = k.shape[1]
    grouped = q.reshape(batch, groups, heads // groups, tokens, dim)  # head h = group h // (H/G), member h % (H/G)
    out = F.scaled_dot_product_attention(grouped, k.unsqueeze(2), v.unsqueeze(2))  # keys broadcast over members
    return out.reshape(batch, heads, tokens, v.shape[-1])
