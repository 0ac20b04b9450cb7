"""Solutions to the exercises of lessons/08_latent_attention.ipynb.

Each `# %% exercise: <name>` section replaces the notebook cell tagged `exercise:<name>`. The sections run inside
the notebook, so they use the names its earlier cells define (np, minimoe, F, split_wkv_b, ...).
tests/test_lessons.py runs the notebook with these solutions through the same check cells a student runs.
"""

# %% exercise: rope_matrix
def rope_matrix(position, head_dim, theta=10000.0):
    """R_position (head_dim, head_dim), a NumPy array: R @ v turns each pair (v[2i], v[2i+1]) by position · θ_i."""
    angles = position * theta ** (-np.arange(0, head_dim, 2) / head_dim)  # (D/2,)
    cos, sin = np.cos(angles), np.sin(angles)
    rotation = np.zeros((head_dim, head_dim))
    even, odd = np.arange(0, head_dim, 2), np.arange(1, head_dim, 2)
    rotation[even, even], rotation[even, odd] = cos, -sin  # y[2i]   = x[2i] cos - x[2i+1] sin
    rotation[odd, even], rotation[odd, odd] = sin, cos  # y[2i+1] = x[2i] sin + x[2i+1] cos
    return rotation


# %% exercise: mla_query_any
def mla_query_any(layer, x):
    """q_nope (B, H, T, dn) and the turned q_pe (B, H, T, dr) of any MLA layer: wq, or wq_a, q_norm, wq_b."""
    batch, tokens, _ = x.shape
    q = layer.wq(x) if layer.q_lora_rank == 0 else layer.wq_b(layer.q_norm(layer.wq_a(x)))  # (B, T, H·(dn + dr))
    q = q.reshape(batch, tokens, layer.n_heads, layer.qk_head_dim)
    q_nope, q_pe = F.split(q, [layer.qk_nope_head_dim, layer.qk_rope_head_dim], axis=-1)
    return q_nope.transpose(1, 2), layer.rope(q_pe).transpose(1, 2)


# %% exercise: fold_uv_into_wo
def fold_uv_into_wo(layer):
    """W (dim, H·C) with  layer(x) = merge_heads(attend_latent(layer, x, ...)) @ Wᵀ."""
    _, w_uv = split_wkv_b(layer)  # (H, dv, C)
    wo = layer.wo.weight.numpy().reshape(layer.dim, layer.n_heads, layer.v_head_dim)  # head h: columns h·dv..(h+1)·dv
    folded = np.einsum("ohv,hvc->ohc", wo, w_uv.numpy())  # (dim, H, C): W_o,h W_UV,h for each head
    return folded.reshape(layer.dim, layer.n_heads * layer.kv_lora_rank)
