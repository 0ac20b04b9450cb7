"""The language model: a DeepSeek-style decoder whose feed-forward blocks are Mixtures of Experts.

    ids (B, T) ─ embed ─┬─ Block 0 ─ Block 1 ─ … ─ norm ─ head ─ logits (B, T, V)
                        │
    Block:  x = x + attn(attn_norm(x))        MHA, or DeepSeek's Multi-head Latent Attention
            x = x + ffn(ffn_norm(x))          a dense SwiGLU MLP, or an MoE layer (shared + routed experts)

Pre-normalisation with RMSNorm, rotary positions inside attention, no biases: the shape of DeepSeek-V3's
reference `Transformer`, whose parameter names we keep (`embed`, `layers.{i}.attn_norm/attn/ffn_norm/ffn`,
`norm`, `head`). V3 keeps its first few layers dense (`n_dense_layers`); so can we.
"""

import dataclasses
import json
from dataclasses import dataclass

from .autograd import Tensor
from .backend import backend_of
from .fp8 import RECIPES, use_fp8
from .nn import MHA, MLA, MLP, Dropout, Embedding, Linear, Module, ModuleList, MoE, RMSNorm

__all__ = ["ModelConfig", "Block", "Transformer"]


@dataclass
class ModelConfig:
    """Everything that defines a model's shape. The defaults are the demo's tiny model (~0.26M parameters).

    Load balancing: each method is switched on by its coefficient (0 = off), so they can be combined:
    `bias_update_speed` (γ of DeepSeek-V3's auxiliary-loss-free bias), `aux_loss_alpha` (Switch/GShard loss),
    `seq_aux_alpha` (V3's sequence-wise loss), `z_loss_coef` (router z-loss).
    """

    vocab_size: int = 32
    dim: int = 64  # d_model
    n_layers: int = 2
    n_heads: int = 4
    max_seq_len: int = 64
    dropout: float = 0.0
    # attention
    attention: str = "mha"  # "mha" | "mla"
    rope_theta: float = 10000.0
    q_lora_rank: int = 0  # MLA: 0 projects queries directly with `wq`
    kv_lora_rank: int = 32  # MLA: width of the compressed key/value latent
    qk_nope_head_dim: int = 16
    qk_rope_head_dim: int = 8
    v_head_dim: int = 16
    mla_absorb: bool = False  # MLA: attend over the latent (the inference-time path)
    # feed-forward
    ffn: str = "moe"  # "dense" | "moe"
    inter_dim: int = 256  # hidden width of dense MLP layers
    n_dense_layers: int = 0  # the first k layers use a dense MLP even when ffn == "moe"
    n_routed_experts: int = 8
    n_shared_experts: int = 1
    n_activated_experts: int = 2  # top-k
    moe_inter_dim: int = 64  # hidden width of one expert
    score_func: str = "softmax"  # "softmax" (V2, Mixtral) | "sigmoid" (V3)
    route_scale: float = 1.0
    n_expert_groups: int = 1
    n_limited_groups: int = 1
    gate_noise_std: float = 0.0
    bias_update_speed: float = 1e-3
    aux_loss_alpha: float = 0.0
    seq_aux_alpha: float = 0.0
    z_loss_coef: float = 0.0
    capacity_factor: float = None  # None: dropless
    # numerics
    fp8: str = None  # None: float32 throughout; "v3" | "per_tensor": the FFN GEMMs in simulated FP8 (minimoe.fp8)

    def __post_init__(self):
        self.validate()

    def validate(self):
        """Raise a ValueError naming every field that cannot work."""
        problems = []
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "max_seq_len"):
            if getattr(self, name) < 1:
                problems.append(f"{name}={getattr(self, name)} must be ≥ 1")
        if self.attention not in ("mha", "mla"):
            problems.append(f"attention={self.attention!r} must be 'mha' or 'mla'")
        if self.attention == "mha" and self.n_heads and self.dim % self.n_heads:
            problems.append(f"n_heads={self.n_heads} must divide dim={self.dim}")
        if self.attention == "mla" and self.qk_rope_head_dim % 2:
            problems.append(f"qk_rope_head_dim={self.qk_rope_head_dim} must be even (RoPE rotates pairs)")
        if self.ffn not in ("dense", "moe"):
            problems.append(f"ffn={self.ffn!r} must be 'dense' or 'moe'")
        if self.ffn == "moe":
            if not 1 <= self.n_activated_experts <= self.n_routed_experts:
                problems.append(f"n_activated_experts={self.n_activated_experts} (top-k) must be between 1 and "
                                f"n_routed_experts={self.n_routed_experts}")
            if self.n_expert_groups < 1 or self.n_routed_experts % self.n_expert_groups:
                problems.append(f"n_expert_groups={self.n_expert_groups} must divide n_routed_experts="
                                f"{self.n_routed_experts}")
            if not 1 <= self.n_limited_groups <= self.n_expert_groups:
                problems.append(f"n_limited_groups={self.n_limited_groups} must be between 1 and "
                                f"n_expert_groups={self.n_expert_groups}")
            if self.score_func not in ("softmax", "sigmoid"):
                problems.append(f"score_func={self.score_func!r} must be 'softmax' or 'sigmoid'")
        if not 0 <= self.n_dense_layers <= self.n_layers:
            problems.append(f"n_dense_layers={self.n_dense_layers} must be between 0 and n_layers={self.n_layers}")
        if not 0 <= self.dropout < 1:
            problems.append(f"dropout={self.dropout} must be in [0, 1)")
        if self.fp8 is not None and self.fp8 not in RECIPES:
            problems.append(f"fp8={self.fp8!r} must be None or one of {sorted(RECIPES)}")
        if problems:
            raise ValueError("ModelConfig: " + "; ".join(problems))

    def to_dict(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values):
        """Build from a dict (e.g. a checkpoint's JSON), refusing unknown keys."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"ModelConfig: unknown field(s) {unknown}; known fields are {sorted(known)}")
        return cls(**values)

    def to_json(self):
        return json.dumps(self.to_dict(), indent=2)


class Block(Module):
    """One pre-norm transformer layer: attention, then a dense or Mixture-of-Experts feed-forward."""

    def __init__(self, layer_id, config):
        super().__init__()
        c = config
        self.attn_norm = RMSNorm(c.dim)
        if c.attention == "mha":
            self.attn = MHA(c.dim, c.n_heads, c.max_seq_len, rope_theta=c.rope_theta)
        else:
            self.attn = MLA(c.dim, c.n_heads, c.max_seq_len, q_lora_rank=c.q_lora_rank,
                            kv_lora_rank=c.kv_lora_rank, qk_nope_head_dim=c.qk_nope_head_dim,
                            qk_rope_head_dim=c.qk_rope_head_dim, v_head_dim=c.v_head_dim,
                            rope_theta=c.rope_theta, absorb=c.mla_absorb)
        self.ffn_norm = RMSNorm(c.dim)
        if c.ffn == "moe" and layer_id >= c.n_dense_layers:
            self.ffn = MoE(c.dim, c.n_routed_experts, c.n_activated_experts, c.moe_inter_dim,
                           n_shared_experts=c.n_shared_experts, capacity_factor=c.capacity_factor,
                           score_func=c.score_func, route_scale=c.route_scale, n_groups=c.n_expert_groups,
                           topk_groups=c.n_limited_groups, noise_std=c.gate_noise_std,
                           aux_loss_alpha=c.aux_loss_alpha, seq_aux_alpha=c.seq_aux_alpha,
                           z_loss_coef=c.z_loss_coef, bias_update_speed=c.bias_update_speed)
        else:
            self.ffn = MLP(c.dim, c.inter_dim)
        self.dropout = Dropout(c.dropout)

    def forward(self, x, start_pos=0, cache=None):  # (B, T, dim) -> (B, T, dim)
        x = x + self.dropout(self.attn(self.attn_norm(x), start_pos=start_pos, cache=cache))
        return x + self.dropout(self.ffn(self.ffn_norm(x)))


class Transformer(Module):
    """The whole model: token ids (B, T) -> next-token logits (B, T, vocab_size).

    After a forward pass in training mode, `balance_loss()` is the sum of the MoE layers' load-balancing
    terms (add it to the language-model loss), and `moe_layers()` give access to each layer's routing stats.
    """

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embed = Embedding(config.vocab_size, config.dim)
        self.layers = ModuleList([Block(i, config) for i in range(config.n_layers)])
        self.norm = RMSNorm(config.dim)
        self.head = Linear(config.dim, config.vocab_size, bias=False)
        if config.fp8:
            use_fp8(self, config.fp8)  # V3's choice: FFN GEMMs in FP8; embedding, attention, gate, head not

    def forward(self, ids, start_pos=0, caches=None):
        ids = ids.data if isinstance(ids, Tensor) else ids
        if ids.ndim != 2:
            raise ValueError(f"Transformer: expected token ids of shape (batch, time), got {tuple(ids.shape)}")
        length = ids.shape[1]
        if start_pos + length > self.config.max_seq_len:
            raise ValueError(f"Transformer: positions {start_pos}..{start_pos + length - 1} exceed "
                             f"max_seq_len={self.config.max_seq_len} (sequence of {length} tokens starting at "
                             f"position {start_pos})")
        if caches is not None and len(caches) != len(self.layers):
            raise ValueError(f"Transformer: got {len(caches)} caches for {len(self.layers)} layers")
        x = self.embed(ids)  # (B, T, dim)
        for i, layer in enumerate(self.layers):
            x = layer(x, start_pos=start_pos, cache=None if caches is None else caches[i])
        return self.head(self.norm(x))  # (B, T, vocab)

    def new_caches(self, batch_size, max_len=None):
        """One key/value cache per layer for incremental decoding of up to `max_len` positions."""
        max_len = max_len or self.config.max_seq_len
        return [layer.attn.new_cache(batch_size, max_len) for layer in self.layers]

    def moe_layers(self):
        return [layer.ffn for layer in self.layers if isinstance(layer.ffn, MoE)]

    def balance_loss(self):
        """Sum of the load-balancing losses of the last forward pass (None if no term is switched on)."""
        losses = [moe.balance_loss for moe in self.moe_layers() if moe.balance_loss is not None]
        if not losses:
            return None
        total = losses[0]
        for loss in losses[1:]:
            total = total + loss
        return total

    def update_routing_bias(self):
        """DeepSeek-V3's auxiliary-loss-free step, after the optimizer step: nudge each gate's bias towards
        even load (a no-op where bias_update_speed is 0)."""
        for moe in self.moe_layers():
            moe.update_bias()

    def routing_summary(self):
        """Host values for logs and plots, from the last forward: per MoE layer, the share of routed tokens each
        expert received, and the router entropy, rounded to 4 decimals. (This copies a few numbers per layer to
        the host: call it when you want them, not inside a step.)"""
        loads, entropies = [], []
        for moe in self.moe_layers():
            counts = moe.stats["tokens_per_expert"]
            backend = backend_of(counts)
            counts = backend.to_numpy(counts).astype(float)
            loads.append([round(share, 4) for share in (counts / max(counts.sum(), 1.0)).tolist()])
            entropies.append(round(float(backend.to_numpy(moe.stats["router_entropy"])), 4))
        return {"expert_load": loads, "router_entropy": entropies}

    def parameter_counts(self):
        """{"total": all parameters, "activated": those one token passes through (routed experts it is not
        sent to excluded), "embedding": the embedding table and the output head}."""
        total = self.num_parameters()
        inactive = 0
        for moe in self.moe_layers():
            per_expert = moe.experts[0].num_parameters()
            inactive += (len(moe.experts) - self.config.n_activated_experts) * per_expert
        embedding = self.embed.weight.size + self.head.weight.size
        return {"total": total, "activated": total - inactive, "embedding": embedding}
