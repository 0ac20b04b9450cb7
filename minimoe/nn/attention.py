"""Attention: rotary position embeddings (RoPE), causal multi-head attention (MHA), DeepSeek's Multi-head Latent
Attention (MLA), and the key/value caches that let a model generate one token at a time.

    layer = MLA(dim=64, n_heads=4, max_seq_len=256, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8,
                v_head_dim=16, absorb=True)
    y = layer(x)                                        # training: whole sequences (B, T, dim), no cache
    with minimoe.no_grad():                             # decoding
        cache = layer.new_cache(batch_size)
        y = layer(prompt, start_pos=0, cache=cache)     # prefill positions 0..P-1
        y = layer(x_new, start_pos=P, cache=cache)      # then one token at a time: position P, P+1, ...

Shapes in comments: B batch, T new tokens, H heads, D a head's size, n = start_pos + T positions seen so far.
Parameter names follow DeepSeek-V3's reference code (inference/model.py): wq, wq_a, q_norm, wq_b, wkv_a, kv_norm,
wkv_b, wo; q_nope/q_pe and k_nope/k_pe are the parts of a query or key without and with position.
"""

import numbers

from .. import functional as F
from ..autograd import Function, ShapeError, Tensor, get_default_dtype, is_grad_enabled
from ..backend import get_array_module, get_backend
from .module import Linear, Module, RMSNorm

__all__ = ["precompute_rope_tables", "apply_rotary_emb", "RotaryEmbedding", "KVCache", "LatentCache", "MHA", "MLA",
           "compare_cache_sizes", "scaled_dot_product_attention_plain"]


# ==============================================================================================================
# rotary position embedding
# ==============================================================================================================

def precompute_rope_tables(head_dim, max_seq_len, theta=10000.0, xp=None, dtype=None):
    """cos and sin of the rotary angles, each (max_seq_len, head_dim // 2): position m turns pair i by the angle
    m·θᵢ, θᵢ = theta^(-2i / head_dim): pair 0 turns fully every 2π ≈ 6 positions, the last every ~2π·theta.
    The angles are computed in float64 and cast at the end: m·θᵢ in float32 loses digits for large m."""
    xp = xp or get_backend().xp
    frequencies = theta ** (-xp.arange(0, head_dim, 2, dtype="float64") / head_dim)  # (D/2,)
    angles = xp.outer(xp.arange(max_seq_len, dtype="float64"), frequencies)  # (max_seq_len, D/2)
    dtype = dtype or get_default_dtype()
    return xp.cos(angles).astype(dtype), xp.sin(angles).astype(dtype)


def _rotate_pairs(x, rotation):
    """Turn each pair (x[2i], x[2i+1]) of the last axis by its angle θᵢ. Read as a complex number
    z = x[2i] + i·x[2i+1], the turned pair is z·e^{iθᵢ}: one complex product per pair, as DeepSeek-V3's
    apply_rotary_emb computes it. `rotation` holds e^{iθᵢ} = cos θᵢ + i·sin θᵢ."""
    xp = get_array_module(x)
    z = xp.ascontiguousarray(x).view(xp.result_type(x.dtype, xp.complex64))  # (..., D/2): the pairs as complex
    return (z * rotation.astype(z.dtype, copy=False)).view(x.dtype)  # (..., D): pairs of reals, in x's dtype


class Rotate(Function):
    """y = R(θ) x: every interleaved pair of the last axis turned by its own angle,
        y[2i]   = x[2i] cos θᵢ - x[2i+1] sin θᵢ
        y[2i+1] = x[2i] sin θᵢ + x[2i+1] cos θᵢ,
    that is z ↦ z·e^{iθᵢ} for the pair as a complex number z = x[2i] + i·x[2i+1].
    A rotation is orthogonal, R(θ)ᵀ = R(-θ), so dL/dx = R(-θ) g: the gradient is turned back by the same angle,
    a product with the conjugate e^{-iθᵢ}."""

    def __init__(self, rotation):
        self.rotation = rotation

    def forward(self, x):
        return _rotate_pairs(x, self.rotation)

    def backward(self, g):
        return _rotate_pairs(g, self.rotation.conj())

    def release(self):
        super().release()
        self.rotation = None


def apply_rotary_emb(x, cos, sin):
    """Rotate x (B, T, H, D) or (B, T, D) at its T positions; cos and sin (T, D/2) are those positions' rows of
    `precompute_rope_tables`."""
    if x.ndim not in (3, 4) or x.shape[-1] != 2 * cos.shape[-1] or x.shape[1] != cos.shape[0]:
        raise ShapeError(f"apply_rotary_emb: x must be (B, T, H, D) or (B, T, D) with T = {cos.shape[0]} positions "
                         f"and D = {2 * cos.shape[-1]} (twice the table's width), got shape {x.shape}")
    rotation = cos + 1j * sin  # (T, D/2): e^{iθ} for each position and pair
    if x.ndim == 4:  # the same angle for every head
        rotation = rotation[:, None]  # (T, 1, D/2)
    return Rotate(rotation)(x)


class RotaryEmbedding(Module):
    """Rotary position embedding (RoFormer, Su et al. 2021): turn the pairs of a query or key by angles
    proportional to its position m. Then R(mθ)q · R(nθ)k = q · R((n-m)θ)k: a score depends on the positions only
    through their difference, and the rotation changes no length.

    Pairing: like DeepSeek's reference code (and the paper), pairs are interleaved: (x0, x1), (x2, x3), ...
    Llama and Hugging Face's `rotate_half` pair the halves instead: (x_i, x_{i+D/2}). The two are one rotation
    written in two coordinate orders: with perm = [0, 2, 4, ..., D-2, 1, 3, ..., D-1],
        rope_rotate_half(x[perm]) = rope_interleaved(x)[perm].
    So a rotate-half checkpoint runs here after reordering each head's rows of the q and k projections by
    argsort(perm) (in MLA: the q_pe rows of each head in wq / wq_b, and the k_pe rows of wkv_a), and one of ours
    runs there after reordering them by perm.
    Scores do not change, since q and k move together. (Hugging Face's DeepSeek-V3 port does this reordering at run
    time on q_pe and k_pe.)

    The cos/sin tables are precomputed up to max_seq_len, for each backend and dtype the layer meets. They are
    not parameters or buffers, so they stay out of the state dict.
    """

    def __init__(self, head_dim, max_seq_len, theta=10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"RotaryEmbedding: head_dim must be even (RoPE turns pairs), got {head_dim}")
        self.head_dim, self.max_seq_len, self.theta = head_dim, max_seq_len, theta
        self._tables = {}  # (backend name, dtype name) -> (cos, sin)
        self.tables(get_backend(), get_default_dtype())

    def tables(self, backend, dtype):
        """The (cos, sin) tables on `backend` in `dtype`, computed on first use."""
        key = (backend.name, str(dtype))
        if key not in self._tables:
            self._tables[key] = precompute_rope_tables(self.head_dim, self.max_seq_len, self.theta, backend.xp, dtype)
        return self._tables[key]

    def forward(self, x, start_pos=0):  # (B, T, H, D) or (B, T, D), positions start_pos..start_pos+T-1
        end = start_pos + x.shape[1]
        if not 0 <= start_pos <= end <= self.max_seq_len:
            raise ValueError(f"RotaryEmbedding: positions {start_pos}..{end - 1} are outside the table's "
                             f"0..{self.max_seq_len - 1} (max_seq_len={self.max_seq_len})")
        cos, sin = self.tables(x.backend, x.dtype)
        return apply_rotary_emb(x, cos[start_pos:end], sin[start_pos:end])

    def extra_repr(self):
        return f"head_dim={self.head_dim}, max_seq_len={self.max_seq_len}, theta={self.theta:g}"


# ==============================================================================================================
# key/value caches
# ==============================================================================================================

class _Cache:
    """Arrays preallocated for max_len positions of a batch, filled as decoding goes: positions 0..length-1 hold
    data. Writing at start_pos < length rewinds (later positions are forgotten)."""

    def __init__(self, dims, max_len, arrays):
        self.dims, self.max_len, self.length = dims, max_len, 0
        self._arrays = arrays

    @property
    def batch_size(self):
        return self._arrays[0].shape[0]

    @property
    def dtype(self):
        return self._arrays[0].dtype

    @property
    def bytes_per_token(self):
        """Bytes one token of one sequence takes in this cache."""
        return sum(a.nbytes for a in self._arrays) // (self.batch_size * self.max_len)

    def __repr__(self):
        return (f"{type(self).__name__}(batch_size={self.batch_size}, max_len={self.max_len}, length={self.length}, "
                f"dims={self.dims}, dtype={self.dtype}, {self.bytes_per_token:,} bytes per token)")


class KVCache(_Cache):
    """Per-head keys and values of one layer (MHA, and MLA's plain path):
        keys (B, H, max_len, D_k),   values (B, H, max_len, D_v).
    Heads come before positions, so keys[:, :, :n] is already the operand attention multiplies with."""

    def __init__(self, batch_size, max_len, dims, xp, dtype):
        heads, key_dim, value_dim = dims
        self.keys = xp.zeros((batch_size, heads, max_len, key_dim), dtype=dtype)
        self.values = xp.zeros((batch_size, heads, max_len, value_dim), dtype=dtype)
        super().__init__(dims, max_len, (self.keys, self.values))

    def write(self, start_pos, keys, values):
        """Store keys (B, H, T, D_k) and values (B, H, T, D_v) of positions start_pos..start_pos+T-1; return the
        keys (B, H, n, D_k) and values (B, H, n, D_v) of positions 0..n-1, n = start_pos + T."""
        end = self.length = start_pos + keys.shape[-2]
        self.keys[:, :, start_pos:end] = keys.data
        self.values[:, :, start_pos:end] = values.data
        return Tensor(self.keys[:, :, :end]), Tensor(self.values[:, :, :end])


class LatentCache(_Cache):
    """MLA's absorbed cache: per token only the normalised latent kv_norm(c_kv) (kv_lora_rank numbers) and the
    RoPE key k_pe (qk_rope_head_dim numbers), both shared by every head. They sit side by side in one array,
        kv (B, max_len, kv_lora_rank + qk_rope_head_dim) = [latent | k_pe],
    because [latent | k_pe] is exactly the key the absorbed query meets, and the latent alone is the value:
    attention reads both straight from the cache, with no copy."""

    def __init__(self, batch_size, max_len, dims, xp, dtype):
        latent_dim, rope_dim = dims
        self.kv = xp.zeros((batch_size, max_len, latent_dim + rope_dim), dtype=dtype)
        super().__init__(dims, max_len, (self.kv,))

    @property
    def latent(self):  # (B, max_len, kv_lora_rank)
        return self.kv[..., :self.dims[0]]

    @property
    def k_pe(self):  # (B, max_len, qk_rope_head_dim)
        return self.kv[..., self.dims[0]:]

    def write(self, start_pos, latent, k_pe):
        """Store latent (B, T, C) and k_pe (B, T, R) of positions start_pos..start_pos+T-1; return the keys
        (B, 1, n, C + R) and values (B, 1, n, C) of positions 0..n-1, with a head axis of 1 for every head."""
        end = self.length = start_pos + latent.shape[1]
        self.latent[:, start_pos:end] = latent.data
        self.k_pe[:, start_pos:end] = k_pe.data
        return Tensor(self.kv[:, None, :end]), Tensor(self.latent[:, None, :end])


def compare_cache_sizes(n_heads, qk_nope_head_dim, qk_rope_head_dim, v_head_dim, kv_lora_rank, dtype=None):
    """Cache per token per layer with MLA's head shapes: standard multi-head attention keeps every head's key and
    value, n_heads·(qk_nope + qk_rope + v) numbers; absorbed MLA keeps the latent and the shared RoPE key,
    kv_lora_rank + qk_rope. DeepSeek-V3: 128·(128 + 64 + 128) = 40,960 numbers against 512 + 64 = 576, 71× fewer.
    Returns {"mha_numbers", "mla_numbers", "mha_bytes", "mla_bytes", "ratio"} (bytes in `dtype`, default: the
    default dtype; bfloat16 has float16's 2 bytes)."""
    itemsize = get_backend().xp.dtype(dtype or get_default_dtype()).itemsize
    mha = n_heads * (qk_nope_head_dim + qk_rope_head_dim + v_head_dim)
    mla = kv_lora_rank + qk_rope_head_dim
    return {"mha_numbers": mha, "mla_numbers": mla, "mha_bytes": mha * itemsize, "mla_bytes": mla * itemsize,
            "ratio": mha / mla}


# ==============================================================================================================
# attention layers
# ==============================================================================================================

class _CausalSelfAttention(Module):
    """What MHA and MLA share: the checks on inputs, positions and caches, and the attention call itself.
    A subclass sets dim, max_seq_len and softmax_scale, and says what its cache holds in _cache_spec()."""

    def _cache_spec(self):
        """(cache class, dims) of this layer's cache."""
        raise NotImplementedError

    def _cache_numbers_per_token(self):
        """How many numbers one token adds to this layer's cache."""
        raise NotImplementedError

    def new_cache(self, batch_size, max_len=None, dtype=None):
        """An empty cache for decoding `batch_size` sequences of up to max_len (default max_seq_len) positions,
        on the parameters' backend, in their dtype unless `dtype` says otherwise."""
        max_len = self.max_seq_len if max_len is None else max_len
        if not 0 < max_len <= self.max_seq_len:
            raise ValueError(f"{type(self).__name__}.new_cache: max_len={max_len} must be in 1..max_seq_len="
                             f"{self.max_seq_len}")
        weight = self.wo.weight.data
        cache_class, dims = self._cache_spec()
        return cache_class(batch_size, max_len, dims, get_array_module(weight), dtype or weight.dtype)

    def cache_bytes_per_token(self, dtype=None):
        """Bytes one token adds to this layer's cache (dtype: the parameters' unless given)."""
        itemsize = get_array_module(self.wo.weight.data).dtype(dtype or self.wo.weight.dtype).itemsize
        return self._cache_numbers_per_token() * itemsize

    def _check(self, x, start_pos, cache):
        """Validate a forward call; returns (B, T)."""
        name = type(self).__name__
        if x.ndim != 3 or x.shape[-1] != self.dim:
            raise ShapeError(f"{name}: expected input (batch, tokens, dim={self.dim}), got shape {x.shape}")
        if not isinstance(start_pos, numbers.Integral) or start_pos < 0:
            raise ValueError(f"{name}: start_pos must be a non-negative Python int, got {start_pos!r}")
        batch, tokens = x.shape[:2]
        end = start_pos + tokens
        if end > self.max_seq_len:
            raise ValueError(f"{name}: positions {start_pos}..{end - 1} do not fit max_seq_len={self.max_seq_len} "
                             f"(start_pos={start_pos} + {tokens} tokens = {end} > {self.max_seq_len})")
        if cache is not None:
            self._check_cache(cache, x, batch, start_pos, end)
        return batch, tokens

    def _check_cache(self, cache, x, batch, start_pos, end):
        name = type(self).__name__
        cache_class, dims = self._cache_spec()
        if type(cache) is not cache_class or cache.dims != dims:
            raise ValueError(f"{name}: this layer needs a {cache_class.__name__} with dims {dims}, got {cache!r}; "
                             "make one with layer.new_cache(batch_size)")
        if cache.batch_size != batch:
            raise ValueError(f"{name}: the cache holds {cache.batch_size} sequences but the input has {batch}")
        if start_pos > cache.length:
            raise ValueError(f"{name}: start_pos={start_pos}, but the cache holds only {cache.length} positions; "
                             f"decoding goes on where it stopped (start_pos ≤ {cache.length})")
        if end > cache.max_len:
            raise ValueError(f"{name}: positions up to {end - 1} do not fit the cache's max_len={cache.max_len}")
        if is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters())):
            raise RuntimeError(f"{name}: a key/value cache keeps plain arrays outside the autograd graph, so no "
                               "gradient could reach the cached keys and values. Decode under "
                               "`with minimoe.no_grad():`, and train on whole sequences without a cache.")

    def _attend(self, q, k, v, start_pos, cache):
        """Causal attention of the T new queries over the keys: with a cache, the keys of positions
        0..start_pos+T-1 (query i at start_pos + i); without, just the T new ones (query i at i)."""
        # plain: softmax(q kᵀ · scale + causal mask) v, see scaled_dot_product_attention_plain
        return F.scaled_dot_product_attention(q, k, v, scale=self.softmax_scale,
                                              start_pos=start_pos if cache is not None else 0)


def scaled_dot_product_attention_plain(q, k, v, causal=True, scale=None, start_pos=0):
    """F.scaled_dot_product_attention composed of ordinary ops, as nanoGPT's manual attention: the same arguments
    and result, but every step is a node of the graph and autograd writes the backward. It keeps the scores, the
    masked scores and the weights (each (..., Tq, Tk)) for backward, where the fused op keeps only the weights."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q @ F.transpose(k)) * scale  # (..., Tq, Tk)
    if causal:
        xp = get_array_module(q.data)
        queries, keys = q.shape[-2], k.shape[-2]
        future = xp.arange(keys) > xp.arange(start_pos, start_pos + queries)[:, None]  # (Tq, Tk) key after query
        scores = scores.masked_fill(future, -float("inf"))
    return F.softmax(scores, axis=-1) @ v  # (..., Tq, Dv)


class MHA(_CausalSelfAttention):
    """Causal multi-head self-attention with rotary positions (the Llama-style layer MLA is measured against):
        q, k, v = x W_qᵀ, x W_kᵀ, x W_vᵀ, each split into n_heads heads of size D = dim / n_heads
        head_h  = softmax(RoPE(q_h) RoPE(k_h)ᵀ / √D + causal mask) v_h
        y       = concat_h(head_h) W_oᵀ
    forward(x (B, T, dim), start_pos=0, cache=None) -> (B, T, dim): the tokens sit at positions
    start_pos..start_pos+T-1; with a cache (decoding, under no_grad) they also attend to the cached positions."""

    def __init__(self, dim, n_heads, max_seq_len, rope_theta=10000.0):
        super().__init__()
        if n_heads <= 0 or dim % n_heads:
            raise ValueError(f"MHA: n_heads={n_heads} must divide dim={dim} (each head gets dim / n_heads features)")
        self.dim, self.n_heads, self.head_dim, self.max_seq_len = dim, n_heads, dim // n_heads, max_seq_len
        self.softmax_scale = self.head_dim ** -0.5
        self.wq = Linear(dim, dim, bias=False)
        self.wk = Linear(dim, dim, bias=False)
        self.wv = Linear(dim, dim, bias=False)
        self.wo = Linear(dim, dim, bias=False)
        self.rope = RotaryEmbedding(self.head_dim, max_seq_len, rope_theta)

    def forward(self, x, start_pos=0, cache=None):
        batch, tokens = self._check(x, start_pos, cache)
        heads = (batch, tokens, self.n_heads, self.head_dim)
        q = self.rope(self.wq(x).reshape(heads), start_pos).transpose(1, 2)  # (B, H, T, D)
        k = self.rope(self.wk(x).reshape(heads), start_pos).transpose(1, 2)  # (B, H, T, D)
        v = self.wv(x).reshape(heads).transpose(1, 2)  # (B, H, T, D)
        if cache is not None:
            k, v = cache.write(start_pos, k, v)  # (B, H, n, D): the past and these T
        y = self._attend(q, k, v, start_pos, cache)  # (B, H, T, D)
        return self.wo(y.transpose(1, 2).reshape(batch, tokens, self.dim))

    def _cache_spec(self):
        return KVCache, (self.n_heads, self.head_dim, self.head_dim)

    def _cache_numbers_per_token(self):
        return 2 * self.n_heads * self.head_dim  # a key and a value per head

    def extra_repr(self):
        return f"dim={self.dim}, n_heads={self.n_heads}, max_seq_len={self.max_seq_len}"


class MLA(_CausalSelfAttention):
    """Multi-head Latent Attention (DeepSeek-V2 §2.1, V3): keys and values come out of one small latent per token.

        c_kv, k_pe   = split(x W_kv_aᵀ, [kv_lora_rank, qk_rope_head_dim]);   k_pe = RoPE(k_pe), shared by all heads
        c            = kv_norm(c_kv)                                         the latent, (B, T, kv_lora_rank)
        [k_nope | v] = c W_kv_bᵀ, per head                                   W_kv_b = [W_UK; W_UV] per head
        q            = x W_qᵀ   or   q_norm(x W_q_aᵀ) W_q_bᵀ (q_lora_rank > 0), per head [q_nope | q_pe],
                       q_pe = RoPE(q_pe)
        score        = (q_nope · k_nope + q_pe · k_pe) / √(qk_nope_head_dim + qk_rope_head_dim)
        y            = concat_h(softmax(score + causal mask) v) W_oᵀ

    Two paths compute the same thing (absorb=False/True; DeepSeek-V3's attn_impl "naive" and "absorb"):
      plain     materialises every head's k = [k_nope | k_pe] and v; its cache holds them (a KVCache).
      absorbed  never does: q_nope·k_nope = (W_UKᵀ q_nope)·c, so W_UK folds into the query, and Σₜ pₜ vₜ =
                W_UV Σₜ pₜ cₜ, so W_UV is applied once after attending over the latent. Its cache (a LatentCache)
                holds only c and k_pe: 576 numbers per token per layer with V3's shapes instead of 40,960. It costs
                more arithmetic per score (kv_lora_rank + rope dims instead of qk dims), which pays when decoding.
    The two share their parameters; `absorb` may be switched on a trained layer.
    """

    def __init__(self, dim, n_heads, max_seq_len, q_lora_rank=0, kv_lora_rank=512, qk_nope_head_dim=128,
                 qk_rope_head_dim=64, v_head_dim=128, rope_theta=10000.0, absorb=False):
        super().__init__()
        sizes = {"dim": dim, "n_heads": n_heads, "kv_lora_rank": kv_lora_rank, "qk_nope_head_dim": qk_nope_head_dim,
                 "qk_rope_head_dim": qk_rope_head_dim, "v_head_dim": v_head_dim, "max_seq_len": max_seq_len}
        bad = {name: size for name, size in sizes.items() if not (isinstance(size, numbers.Integral) and size > 0)}
        if q_lora_rank < 0:
            bad["q_lora_rank"] = q_lora_rank
        if bad:
            raise ValueError(f"MLA: sizes must be positive integers (q_lora_rank may be 0), got {bad}")
        if qk_rope_head_dim % 2:
            raise ValueError(f"MLA: qk_rope_head_dim must be even (RoPE turns pairs), got {qk_rope_head_dim}")
        self.dim, self.n_heads, self.max_seq_len = dim, n_heads, max_seq_len
        self.q_lora_rank, self.kv_lora_rank = q_lora_rank, kv_lora_rank
        self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim = qk_nope_head_dim, qk_rope_head_dim, v_head_dim
        self.qk_head_dim = qk_nope_head_dim + qk_rope_head_dim
        self.softmax_scale = self.qk_head_dim ** -0.5
        self.absorb = absorb
        if q_lora_rank == 0:
            self.wq = Linear(dim, n_heads * self.qk_head_dim, bias=False)
        else:
            self.wq_a = Linear(dim, q_lora_rank, bias=False)
            self.q_norm = RMSNorm(q_lora_rank)
            self.wq_b = Linear(q_lora_rank, n_heads * self.qk_head_dim, bias=False)
        self.wkv_a = Linear(dim, kv_lora_rank + qk_rope_head_dim, bias=False)
        self.kv_norm = RMSNorm(kv_lora_rank)
        self.wkv_b = Linear(kv_lora_rank, n_heads * (qk_nope_head_dim + v_head_dim), bias=False)
        self.wo = Linear(n_heads * v_head_dim, dim, bias=False)
        self.rope = RotaryEmbedding(qk_rope_head_dim, max_seq_len, rope_theta)

    def forward(self, x, start_pos=0, cache=None):
        batch, tokens = self._check(x, start_pos, cache)
        q = self.wq(x) if self.q_lora_rank == 0 else self.wq_b(self.q_norm(self.wq_a(x)))  # (B, T, H·(dn + dr))
        q_nope, q_pe = F.split(q.reshape(batch, tokens, self.n_heads, self.qk_head_dim),
                               [self.qk_nope_head_dim, self.qk_rope_head_dim], axis=-1)  # (B, T, H, dn), (…, dr)
        q_pe = self.rope(q_pe, start_pos)
        c_kv, k_pe = F.split(self.wkv_a(x), [self.kv_lora_rank, self.qk_rope_head_dim], axis=-1)  # (B, T, C), (…, dr)
        k_pe = self.rope(k_pe, start_pos)  # one position key per token, shared by every head
        latent = self.kv_norm(c_kv)  # (B, T, C)
        attend = self._attend_absorbed if self.absorb else self._attend_plain
        y = attend(q_nope.transpose(1, 2), q_pe.transpose(1, 2), latent, k_pe, start_pos, cache)  # (B, H, T, dv)
        return self.wo(y.transpose(1, 2).reshape(batch, tokens, self.n_heads * self.v_head_dim))

    def _attend_plain(self, q_nope, q_pe, latent, k_pe, start_pos, cache):
        """Per-head keys and values from the latent, then ordinary attention. q_nope, q_pe: (B, H, T, ·)."""
        batch, tokens, _ = latent.shape
        heads = self.n_heads
        kv = self.wkv_b(latent).reshape(batch, tokens, heads, self.qk_nope_head_dim + self.v_head_dim)
        k_nope, v = F.split(kv.transpose(1, 2), [self.qk_nope_head_dim, self.v_head_dim], axis=-1)  # (B, H, T, ·)
        k_pe = F.broadcast_to(k_pe.unsqueeze(1), (batch, heads, tokens, self.qk_rope_head_dim))  # (B, H, T, dr)
        q = F.concatenate([q_nope, q_pe], axis=-1)  # (B, H, T, dn + dr)
        k = F.concatenate([k_nope, k_pe], axis=-1)  # (B, H, T, dn + dr)
        if cache is not None:
            k, v = cache.write(start_pos, k, v)  # (B, H, n, ·)
        return self._attend(q, k, v, start_pos, cache)  # (B, H, T, dv)

    def _attend_absorbed(self, q_nope, q_pe, latent, k_pe, start_pos, cache):
        """Attention over the latent itself, shared by every head; W_UK goes into the query, W_UV after."""
        w_kv_b = self.wkv_b.weight.reshape(self.n_heads, self.qk_nope_head_dim + self.v_head_dim, self.kv_lora_rank)
        w_uk, w_uv = F.split(w_kv_b, [self.qk_nope_head_dim, self.v_head_dim], axis=1)  # (H, dn, C), (H, dv, C)
        q = F.concatenate([q_nope @ w_uk, q_pe], axis=-1)  # (B, H, T, C + dr): the query in latent space
        if cache is None:
            keys = F.concatenate([latent, k_pe], axis=-1).unsqueeze(1)  # (B, 1, T, C + dr)
            values = latent.unsqueeze(1)  # (B, 1, T, C)
        else:
            keys, values = cache.write(start_pos, latent, k_pe)  # (B, 1, n, C + dr), (B, 1, n, C)
        y_latent = self._attend(q, keys, values, start_pos, cache)  # (B, H, T, C)
        return y_latent @ w_uv.transpose(1, 2)  # (B, H, T, dv)

    def _cache_spec(self):
        if self.absorb:
            return LatentCache, (self.kv_lora_rank, self.qk_rope_head_dim)
        return KVCache, (self.n_heads, self.qk_head_dim, self.v_head_dim)

    def _cache_numbers_per_token(self):
        sizes = compare_cache_sizes(self.n_heads, self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim,
                                    self.kv_lora_rank)
        return sizes["mla_numbers"] if self.absorb else sizes["mha_numbers"]

    def extra_repr(self):
        return (f"dim={self.dim}, n_heads={self.n_heads}, q_lora_rank={self.q_lora_rank}, "
                f"kv_lora_rank={self.kv_lora_rank}, qk_nope_head_dim={self.qk_nope_head_dim}, "
                f"qk_rope_head_dim={self.qk_rope_head_dim}, v_head_dim={self.v_head_dim}, absorb={self.absorb}")
