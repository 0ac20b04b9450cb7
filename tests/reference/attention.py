"""PyTorch twins of minimoe's attention layers, written from the papers and DeepSeek-V3's reference code:
RoPE as a complex multiplication (RoFormer §3.4; DeepSeek-V3's apply_rotary_emb), RoPE in the rotate-half
convention (Llama / Hugging Face), causal MHA, and MLA (DeepSeek-V2 §2.1) in its naive and absorbed forms, each
with its own key/value cache, laid out as DeepSeek's code lays it out: (batch, position, head, dim).

They load minimoe's state dict: `twin.load_state_dict({name: torch.tensor(to_numpy(v)) for ...})`. All float64.
"""

import torch
from torch import nn

DTYPE = torch.float64


def precompute_freqs_cis(head_dim, max_seq_len, theta=10000.0):
    """e^{i·m·θ_j} for positions m < max_seq_len and pairs j < head_dim/2, θ_j = theta^(-2j/head_dim)."""
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=DTYPE) / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, dtype=DTYPE), freqs)
    return torch.polar(torch.ones_like(angles), angles)  # (max_seq_len, head_dim/2), complex128


def apply_rotary_emb(x, freqs_cis):
    """x (B, T, H, D) or (B, T, D): read each interleaved pair (x[2j], x[2j+1]) as the complex number
    x[2j] + i·x[2j+1] and multiply it by e^{i·m·θ_j}. freqs_cis: (T, D/2), the rows of x's positions."""
    z = torch.view_as_complex(x.contiguous().reshape(*x.shape[:-1], -1, 2))
    shape = (1, x.shape[1]) + (1,) * (x.ndim - 3) + (x.shape[-1] // 2,)
    return torch.view_as_real(z * freqs_cis.reshape(shape)).flatten(-2)


def apply_rotary_emb_rotate_half(x, freqs_cis):
    """The Llama / Hugging Face convention: pair x[j] with x[j + D/2]; y = x·cos + rotate_half(x)·sin with
    rotate_half(x) = [-x2, x1] and cos, sin repeated over both halves."""
    shape = (1, x.shape[1]) + (1,) * (x.ndim - 3) + (x.shape[-1] // 2,)
    angles = freqs_cis.angle().reshape(shape)
    cos, sin = torch.cat([angles.cos()] * 2, dim=-1), torch.cat([angles.sin()] * 2, dim=-1)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


def causal_mask(queries, keys, start_pos):
    """(queries, keys): 0 where query i (at position start_pos + i) may look at key j (j ≤ start_pos + i),
    -inf elsewhere."""
    return torch.full((queries, keys), float("-inf"), dtype=DTYPE).triu(start_pos + 1)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=DTYPE))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def _linear(n_in, n_out):
    return nn.Linear(n_in, n_out, bias=False, dtype=DTYPE)


class MHA(nn.Module):
    """softmax(RoPE(q) RoPE(k)ᵀ/√D + mask) v per head, heads concatenated, then wo (Vaswani et al. 2017; RoPE).
    rotate_half=True uses the Llama / Hugging Face pairing instead of the interleaved one."""

    def __init__(self, dim, n_heads, max_seq_len, rope_theta=10000.0, rotate_half=False):
        super().__init__()
        self.n_heads, self.head_dim = n_heads, dim // n_heads
        self.rope = apply_rotary_emb_rotate_half if rotate_half else apply_rotary_emb
        self.wq, self.wk, self.wv, self.wo = (_linear(dim, dim) for _ in range(4))
        self.register_buffer("freqs_cis", precompute_freqs_cis(self.head_dim, max_seq_len, rope_theta),
                             persistent=False)
        self.k_cache = self.v_cache = None

    def new_cache(self, batch_size, max_len):
        self.k_cache = torch.zeros(batch_size, max_len, self.n_heads, self.head_dim, dtype=DTYPE)
        self.v_cache = torch.zeros(batch_size, max_len, self.n_heads, self.head_dim, dtype=DTYPE)

    def forward(self, x, start_pos=0, use_cache=False):
        bsz, seqlen, _ = x.shape
        end_pos = start_pos + seqlen
        freqs_cis = self.freqs_cis[start_pos:end_pos]
        q = self.rope(self.wq(x).view(bsz, seqlen, self.n_heads, self.head_dim), freqs_cis)
        k = self.rope(self.wk(x).view(bsz, seqlen, self.n_heads, self.head_dim), freqs_cis)
        v = self.wv(x).view(bsz, seqlen, self.n_heads, self.head_dim)
        offset = 0
        if use_cache:
            self.k_cache[:, start_pos:end_pos], self.v_cache[:, start_pos:end_pos] = k, v
            k, v, offset = self.k_cache[:, :end_pos], self.v_cache[:, :end_pos], start_pos
        scores = torch.einsum("bshd,bthd->bsht", q, k) / self.head_dim ** 0.5
        scores = scores + causal_mask(seqlen, k.shape[1], offset)[None, :, None, :]
        y = torch.einsum("bsht,bthd->bshd", scores.softmax(dim=-1), v)
        return self.wo(y.flatten(2))


class MLA(nn.Module):
    """Multi-head Latent Attention as in DeepSeek-V3's inference/model.py: the naive form builds every head's
    k = [k_nope | k_pe] and v from the latent; the absorbed form folds W_UK into the query and W_UV after the
    attention over the latent, and caches only kv_norm(c_kv) and k_pe."""

    def __init__(self, dim, n_heads, max_seq_len, q_lora_rank=0, kv_lora_rank=512, qk_nope_head_dim=128,
                 qk_rope_head_dim=64, v_head_dim=128, rope_theta=10000.0, absorb=False):
        super().__init__()
        self.n_heads, self.q_lora_rank, self.kv_lora_rank = n_heads, q_lora_rank, kv_lora_rank
        self.qk_nope_head_dim, self.qk_rope_head_dim, self.v_head_dim = qk_nope_head_dim, qk_rope_head_dim, v_head_dim
        self.qk_head_dim = qk_nope_head_dim + qk_rope_head_dim
        self.softmax_scale = self.qk_head_dim ** -0.5
        self.absorb = absorb
        if q_lora_rank == 0:
            self.wq = _linear(dim, n_heads * self.qk_head_dim)
        else:
            self.wq_a = _linear(dim, q_lora_rank)
            self.q_norm = RMSNorm(q_lora_rank)
            self.wq_b = _linear(q_lora_rank, n_heads * self.qk_head_dim)
        self.wkv_a = _linear(dim, kv_lora_rank + qk_rope_head_dim)
        self.kv_norm = RMSNorm(kv_lora_rank)
        self.wkv_b = _linear(kv_lora_rank, n_heads * (qk_nope_head_dim + v_head_dim))
        self.wo = _linear(n_heads * v_head_dim, dim)
        self.register_buffer("freqs_cis", precompute_freqs_cis(qk_rope_head_dim, max_seq_len, rope_theta),
                             persistent=False)
        self.caches = None

    def new_cache(self, batch_size, max_len):
        if self.absorb:
            self.caches = (torch.zeros(batch_size, max_len, self.kv_lora_rank, dtype=DTYPE),
                           torch.zeros(batch_size, max_len, self.qk_rope_head_dim, dtype=DTYPE))
        else:
            self.caches = (torch.zeros(batch_size, max_len, self.n_heads, self.qk_head_dim, dtype=DTYPE),
                           torch.zeros(batch_size, max_len, self.n_heads, self.v_head_dim, dtype=DTYPE))

    def forward(self, x, start_pos=0, use_cache=False):
        bsz, seqlen, _ = x.shape
        end_pos = start_pos + seqlen
        freqs_cis = self.freqs_cis[start_pos:end_pos]
        q = self.wq(x) if self.q_lora_rank == 0 else self.wq_b(self.q_norm(self.wq_a(x)))
        q = q.view(bsz, seqlen, self.n_heads, self.qk_head_dim)
        q_nope, q_pe = torch.split(q, [self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        q_pe = apply_rotary_emb(q_pe, freqs_cis)
        kv, k_pe = torch.split(self.wkv_a(x), [self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        k_pe = apply_rotary_emb(k_pe, freqs_cis)  # (B, T, dr): one for all heads
        offset = start_pos if use_cache else 0
        if not self.absorb:
            q = torch.cat([q_nope, q_pe], dim=-1)
            kv = self.wkv_b(self.kv_norm(kv)).view(bsz, seqlen, self.n_heads, self.qk_nope_head_dim + self.v_head_dim)
            k_nope, v = torch.split(kv, [self.qk_nope_head_dim, self.v_head_dim], dim=-1)
            k = torch.cat([k_nope, k_pe.unsqueeze(2).expand(-1, -1, self.n_heads, -1)], dim=-1)
            if use_cache:
                k_cache, v_cache = self.caches
                k_cache[:, start_pos:end_pos], v_cache[:, start_pos:end_pos] = k, v
                k, v = k_cache[:, :end_pos], v_cache[:, :end_pos]
            scores = torch.einsum("bshd,bthd->bsht", q, k) * self.softmax_scale
        else:
            wkv_b = self.wkv_b.weight.view(self.n_heads, -1, self.kv_lora_rank)
            q_nope = torch.einsum("bshd,hdc->bshc", q_nope, wkv_b[:, :self.qk_nope_head_dim])
            latent = self.kv_norm(kv)
            if use_cache:
                kv_cache, pe_cache = self.caches
                kv_cache[:, start_pos:end_pos], pe_cache[:, start_pos:end_pos] = latent, k_pe
                latent, k_pe = kv_cache[:, :end_pos], pe_cache[:, :end_pos]
            scores = (torch.einsum("bshc,btc->bsht", q_nope, latent) +
                      torch.einsum("bshr,btr->bsht", q_pe, k_pe)) * self.softmax_scale
        scores = (scores + causal_mask(seqlen, scores.shape[-1], offset)[None, :, None, :]).softmax(dim=-1)
        if not self.absorb:
            y = torch.einsum("bsht,bthd->bshd", scores, v)
        else:
            y = torch.einsum("bsht,btc->bshc", scores, latent)
            y = torch.einsum("bshc,hdc->bshd", y, wkv_b[:, -self.v_head_dim:])
        return self.wo(y.flatten(2))
