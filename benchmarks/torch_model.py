"""The yardstick: minimoe's Transformer written as efficient eager PyTorch.

Same architecture, same parameter names, so it loads minimoe's state dict and computes the same numbers; but
written the way one would write it for speed in PyTorch, not for checking (tests/reference/ holds the float64
twins written for clarity):

- attention is `torch.nn.functional.scaled_dot_product_attention` (a fused kernel), RoPE a complex multiply
  (DeepSeek-V3's `apply_rotary_emb`), RMSNorm `torch.nn.functional.rms_norm`;
- the MoE layer dispatches as minimoe does: one stable sort of the (token, expert) assignments, each expert run
  on its own contiguous rows, one `index_add_` to combine (DeepSeek-V3's reference code instead runs a
  `torch.where` per expert over the whole index array, which costs more as the experts grow);
- absorbed MLA folds the heads into the queries (every head attends over the same latent: one attention of H·T
  queries instead of H expanded copies of the keys), as FlashMLA does;
- the dtype is the state dict's (float32 in the benchmarks), on the CPU or on CUDA.

Dropout, noisy routing, capacity dropping and the balance losses are left out: the benchmarked configurations do
not use them (`check_supported` says so when one does). The auxiliary-loss-free routing bias is kept, updated after
each optimizer step as minimoe does.
"""

import torch
import torch.nn.functional as TF
from torch import nn

__all__ = ["Transformer", "from_minimoe", "check_supported", "generate", "train_step"]


def check_supported(config):
    """Refuse the options this twin leaves out, naming them."""
    unsupported = {"dropout": 0.0, "gate_noise_std": 0.0, "aux_loss_alpha": 0.0, "seq_aux_alpha": 0.0,
                   "z_loss_coef": 0.0, "capacity_factor": None, "n_expert_groups": 1}
    used = {name: getattr(config, name) for name, off in unsupported.items() if getattr(config, name) != off}
    if used:
        raise ValueError(f"benchmarks.torch_model: options not implemented in the PyTorch twin: {used}")


def from_minimoe(config, state, device="cpu"):
    """A twin of a minimoe model with `config`, loaded strictly from its state dict ({name: host array}); it
    takes the state's dtype."""
    check_supported(config)
    dtype = torch.as_tensor(state["embed.weight"]).dtype
    model = Transformer(config).to(device=device, dtype=dtype)
    model.load_state_dict({name: torch.as_tensor(value) for name, value in state.items()}, strict=True)
    return model


def rope_table(head_dim, max_seq_len, theta):
    """cos and sin of m·θ_j for positions m and pairs j, θ_j = theta^(-2j/head_dim), stacked: (max_seq_len, D/2, 2).
    Real, so that `.to(dtype)` and `.to(device)` carry it along with the parameters."""
    frequencies = theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float64), frequencies)
    return torch.stack((angles.cos(), angles.sin()), dim=-1)


def apply_rotary_emb(x, table):
    """Turn the interleaved pairs of x (B, T, H, D) or (B, T, D) by their positions' angles (DeepSeek-V3's complex
    multiply); table (T, D/2, 2) holds those positions' cos and sin."""
    z = torch.view_as_complex(x.reshape(*x.shape[:-1], -1, 2))
    freqs = torch.view_as_complex(table).view(1, x.shape[1], *([1] * (x.ndim - 3)), x.shape[-1] // 2)
    return torch.view_as_real(z * freqs).flatten(-2)


def attention(q, k, v, start_pos, scale):
    """Causal attention of queries at positions start_pos.. over keys at 0..; q (B, H, T, D), k (B, H, n, D)."""
    queries, keys = q.shape[-2], k.shape[-2]
    if queries == 1:  # one new token sees every key: no mask
        return TF.scaled_dot_product_attention(q, k, v, scale=scale)
    if start_pos == 0 and queries == keys:
        return TF.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    positions = torch.arange(start_pos, start_pos + queries, device=q.device)
    visible = torch.arange(keys, device=q.device) <= positions[:, None]
    return TF.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=scale)


def _linear(n_in, n_out):
    return nn.Linear(n_in, n_out, bias=False)


class RMSNorm(nn.Module):
    def __init__(self, dim, eps=1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return TF.rms_norm(x, self.weight.shape, self.weight, self.eps)


class MHA(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.n_heads, self.head_dim = c.n_heads, c.dim // c.n_heads
        self.wq, self.wk, self.wv, self.wo = (_linear(c.dim, c.dim) for _ in range(4))
        self.register_buffer("freqs", rope_table(self.head_dim, c.max_seq_len, c.rope_theta), persistent=False)
        self.cache = None

    def new_cache(self, batch_size, max_len):
        p = self.wo.weight
        shape = (batch_size, self.n_heads, max_len, self.head_dim)
        self.cache = tuple(torch.zeros(shape, dtype=p.dtype, device=p.device) for _ in range(2))

    def forward(self, x, start_pos=0, use_cache=False):
        batch, tokens, _ = x.shape
        end = start_pos + tokens
        freqs = self.freqs[start_pos:end]
        heads = (batch, tokens, self.n_heads, self.head_dim)
        q = apply_rotary_emb(self.wq(x).view(heads), freqs).transpose(1, 2)  # (B, H, T, D)
        k = apply_rotary_emb(self.wk(x).view(heads), freqs).transpose(1, 2)
        v = self.wv(x).view(heads).transpose(1, 2)
        if use_cache:
            k_cache, v_cache = self.cache
            k_cache[:, :, start_pos:end], v_cache[:, :, start_pos:end] = k, v
            k, v = k_cache[:, :, :end], v_cache[:, :, :end]
        y = attention(q, k, v, start_pos if use_cache else 0, self.head_dim ** -0.5)
        return self.wo(y.transpose(1, 2).reshape(batch, tokens, -1))


class MLA(nn.Module):
    """Multi-head Latent Attention; the absorbed path attends over the cached latent [kv_norm(c_kv) | k_pe]."""

    def __init__(self, c):
        super().__init__()
        self.n_heads, self.q_lora_rank, self.kv_lora_rank = c.n_heads, c.q_lora_rank, c.kv_lora_rank
        self.dn, self.dr, self.dv = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
        self.scale = (self.dn + self.dr) ** -0.5
        self.absorb = c.mla_absorb
        if c.q_lora_rank == 0:
            self.wq = _linear(c.dim, c.n_heads * (self.dn + self.dr))
        else:
            self.wq_a = _linear(c.dim, c.q_lora_rank)
            self.q_norm = RMSNorm(c.q_lora_rank)
            self.wq_b = _linear(c.q_lora_rank, c.n_heads * (self.dn + self.dr))
        self.wkv_a = _linear(c.dim, c.kv_lora_rank + self.dr)
        self.kv_norm = RMSNorm(c.kv_lora_rank)
        self.wkv_b = _linear(c.kv_lora_rank, c.n_heads * (self.dn + self.dv))
        self.wo = _linear(c.n_heads * self.dv, c.dim)
        self.register_buffer("freqs", rope_table(self.dr, c.max_seq_len, c.rope_theta), persistent=False)
        self.cache = None

    def new_cache(self, batch_size, max_len):
        like = {"dtype": self.wo.weight.dtype, "device": self.wo.weight.device}
        if self.absorb:
            self.cache = torch.zeros(batch_size, 1, max_len, self.kv_lora_rank + self.dr, **like)
        else:
            self.cache = (torch.zeros(batch_size, self.n_heads, max_len, self.dn + self.dr, **like),
                          torch.zeros(batch_size, self.n_heads, max_len, self.dv, **like))

    def forward(self, x, start_pos=0, use_cache=False):
        batch, tokens, _ = x.shape
        end = start_pos + tokens
        freqs = self.freqs[start_pos:end]
        q = self.wq(x) if self.q_lora_rank == 0 else self.wq_b(self.q_norm(self.wq_a(x)))
        q_nope, q_pe = torch.split(q.view(batch, tokens, self.n_heads, -1), [self.dn, self.dr], dim=-1)
        q_pe = apply_rotary_emb(q_pe, freqs)
        c_kv, k_pe = torch.split(self.wkv_a(x), [self.kv_lora_rank, self.dr], dim=-1)
        k_pe = apply_rotary_emb(k_pe, freqs)  # (B, T, dr), shared by the heads
        latent = self.kv_norm(c_kv)
        offset = start_pos if use_cache else 0
        if self.absorb:
            w = self.wkv_b.weight.view(self.n_heads, self.dn + self.dv, self.kv_lora_rank)
            q = torch.cat([torch.einsum("bthd,hdc->bhtc", q_nope, w[:, :self.dn]), q_pe.transpose(1, 2)], dim=-1)
            keys = torch.cat([latent, k_pe], dim=-1).unsqueeze(1)  # (B, 1, T, C + dr)
            if use_cache:
                self.cache[:, :, start_pos:end] = keys
                keys = self.cache[:, :, :end]
            # every head meets the same latent: fold the heads into the queries, one attention of H·T queries
            queries = q.reshape(batch, 1, self.n_heads * tokens, -1)
            mask = None
            if tokens > 1:  # query h·T + t sits at position offset + t
                n = keys.shape[-2]
                positions = torch.arange(offset, offset + tokens, device=x.device)
                mask = (torch.arange(n, device=x.device) <= positions[:, None]).repeat(self.n_heads, 1)
            y = TF.scaled_dot_product_attention(queries, keys, keys[..., :self.kv_lora_rank], attn_mask=mask,
                                                scale=self.scale).view(batch, self.n_heads, tokens, -1)  # (B, H, T, C)
            y = torch.einsum("bhtc,hdc->bhtd", y, w[:, self.dn:])
        else:
            kv = self.wkv_b(latent).view(batch, tokens, self.n_heads, self.dn + self.dv).transpose(1, 2)
            k_nope, v = torch.split(kv, [self.dn, self.dv], dim=-1)
            q = torch.cat([q_nope, q_pe], dim=-1).transpose(1, 2)
            k = torch.cat([k_nope, k_pe.unsqueeze(1).expand(-1, self.n_heads, -1, -1)], dim=-1)
            if use_cache:
                k_cache, v_cache = self.cache
                k_cache[:, :, start_pos:end], v_cache[:, :, start_pos:end] = k, v
                k, v = k_cache[:, :, :end], v_cache[:, :, :end]
            y = attention(q, k, v, offset, self.scale)  # (B, H, T, dv)
        return self.wo(y.transpose(1, 2).reshape(batch, tokens, -1))


class Expert(nn.Module):
    def __init__(self, dim, inter_dim):
        super().__init__()
        self.w1, self.w2, self.w3 = _linear(dim, inter_dim), _linear(inter_dim, dim), _linear(dim, inter_dim)

    def forward(self, x):
        return self.w2(TF.silu(self.w1(x)) * self.w3(x))


class Gate(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.top_k, self.score_func, self.route_scale = c.n_activated_experts, c.score_func, c.route_scale
        self.bias_update_speed = c.bias_update_speed
        self.weight = nn.Parameter(torch.empty(c.n_routed_experts, c.dim))
        self.register_buffer("bias", torch.zeros(c.n_routed_experts) if c.bias_update_speed > 0 else None)
        self.load = None

    def forward(self, x):  # (N, dim) -> weights (N, K), indices (N, K)
        logits = TF.linear(x, self.weight)
        scores = logits.softmax(dim=-1) if self.score_func == "softmax" else logits.sigmoid()
        choice = scores.detach() if self.bias is None else scores.detach() + self.bias
        indices = choice.topk(self.top_k, dim=-1).indices
        weights = scores.gather(1, indices)
        if self.score_func == "sigmoid":
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights * self.route_scale, indices

    def update_bias(self):
        if self.bias is not None and self.load is not None:
            self.bias += self.bias_update_speed * torch.sign(self.load.mean() - self.load)
            self.load = None


class MoE(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.top_k = c.n_activated_experts
        self.gate = Gate(c)
        self.experts = nn.ModuleList([Expert(c.dim, c.moe_inter_dim) for _ in range(c.n_routed_experts)])
        self.shared_experts = Expert(c.dim, c.n_shared_experts * c.moe_inter_dim) if c.n_shared_experts else None

    def forward(self, x):
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])  # (N, dim)
        weights, indices = self.gate(tokens)
        counts = torch.bincount(indices.flatten(), minlength=len(self.experts))
        if self.training and self.gate.bias is not None:
            load = counts.to(tokens.dtype)
            self.gate.load = load if self.gate.load is None else self.gate.load + load
        order = torch.argsort(indices.flatten(), stable=True)  # assignments grouped by expert
        token_of = order // self.top_k
        routed = tokens[token_of]
        outputs = [expert(rows) for expert, rows in zip(self.experts, routed.split(counts.tolist())) if len(rows)]
        expert_out = torch.cat(outputs) * weights.flatten()[order, None]
        y = self.shared_experts(tokens) if self.shared_experts is not None else torch.zeros_like(tokens)
        return y.index_add(0, token_of, expert_out).reshape(shape)


class Block(nn.Module):
    def __init__(self, layer_id, c):
        super().__init__()
        self.attn_norm, self.ffn_norm = RMSNorm(c.dim), RMSNorm(c.dim)
        self.attn = MHA(c) if c.attention == "mha" else MLA(c)
        dense = c.ffn == "dense" or layer_id < c.n_dense_layers
        self.ffn = Expert(c.dim, c.inter_dim) if dense else MoE(c)

    def forward(self, x, start_pos=0, use_cache=False):
        x = x + self.attn(self.attn_norm(x), start_pos, use_cache)
        return x + self.ffn(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.config = c
        self.embed = nn.Embedding(c.vocab_size, c.dim)
        self.layers = nn.ModuleList([Block(i, c) for i in range(c.n_layers)])
        self.norm = RMSNorm(c.dim)
        self.head = _linear(c.dim, c.vocab_size)

    def forward(self, ids, start_pos=0, use_cache=False):
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x, start_pos, use_cache)
        return self.head(self.norm(x))

    def new_caches(self, batch_size, max_len):
        for layer in self.layers:
            layer.attn.new_cache(batch_size, max_len)

    def update_routing_bias(self):
        for layer in self.layers:
            if isinstance(layer.ffn, MoE):
                layer.ffn.gate.update_bias()


def train_step(model, optimizer, inputs, targets, grad_clip=1.0, ignore_index=-100):
    """Forward, cross-entropy on the completion tokens, backward, clip, AdamW step, routing bias; returns the loss
    as a Python float (one host read per step, as minimoe's training loop does)."""
    logits = model(inputs)
    loss = TF.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=ignore_index)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    model.update_routing_bias()
    return loss.item()


@torch.no_grad()
def generate(model, prompt_ids, max_new_tokens):
    """Greedy decoding with the key/value caches: prompt_ids (B, P) -> (B, P + max_new_tokens)."""
    model.eval()
    batch, prompt_length = prompt_ids.shape
    tokens = torch.empty(batch, prompt_length + max_new_tokens, dtype=prompt_ids.dtype, device=prompt_ids.device)
    tokens[:, :prompt_length] = prompt_ids
    model.new_caches(batch, prompt_length + max_new_tokens)
    logits = model(prompt_ids, 0, use_cache=True)[:, -1]
    for position in range(prompt_length, prompt_length + max_new_tokens):
        tokens[:, position] = logits.argmax(dim=-1)
        if position + 1 < tokens.shape[1]:
            logits = model(tokens[:, position:position + 1], position, use_cache=True)[:, -1]
    return tokens
