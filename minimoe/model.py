"""The language model: a DeepSeek-style decoder whose feed-forward blocks are Mixtures of Experts.

    ids (B, T) ─ embed ─┬─ Block 0 ─ Block 1 ─ … ─ norm ─ head ─ logits (B, T, V)
                        │
    Block:  x = x + attn(attn_norm(x))        MHA, or DeepSeek's Multi-head Latent Attention
            x = x + ffn(ffn_norm(x))          a dense SwiGLU MLP, or an MoE layer (shared + routed experts)

Pre-normalisation with RMSNorm, rotary positions inside attention, no biases: the shape of DeepSeek-V3's
reference `Transformer`, whose parameter names we keep (`embed`, `layers.{i}.attn_norm/attn/ffn_norm/ffn`,
`norm`, `head`). V3 keeps its first few layers dense (`n_dense_layers`); so can we.

With `n_mtp_modules` = D > 0 the model also carries DeepSeek-V3's multi-token prediction modules (`mtp.{k}`,
minimoe/mtp.py): trained through `model(ids, mtp=True)` and `mtp_loss`, never used by a plain forward.
"""

import json
from dataclasses import dataclass

from . import functional as F
from .autograd import Tensor
from .backend import backend_of
from .mtp import MTPModule, mtp_loss_weight_at
from .fp8 import RECIPES, use_fp8
from .nn import MHA, MLA, MLP, Dropout, Embedding, Linear, Module, ModuleList, MoE, RMSNorm
from .validation import Checks, Config

__all__ = ["ModelConfig", "Block", "Transformer"]


@dataclass
class ModelConfig(Config):
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
    # multi-token prediction (DeepSeek-V3 §2.2)
    n_mtp_modules: int = 0  # D: 0 = no MTP modules
    mtp_loss_weight: float = 0.3  # λ
    mtp_loss_weight_final: float = None  # λ after the first 10/14.8 of pretraining (V3: 0.1); None: constant
    # numerics
    fp8: str = None  # None: float32 throughout; "v3" | "per_tensor": the FFN GEMMs in simulated FP8 (minimoe.fp8)

    def validate(self):
        """Raise a ConfigError naming every field that cannot work (its type, its range, or a disagreement)."""
        c, check = self, Checks("ModelConfig", self)
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "max_seq_len", "kv_lora_rank", "v_head_dim",
                     "inter_dim", "n_routed_experts", "n_activated_experts", "moe_inter_dim", "n_expert_groups",
                     "n_limited_groups"):
            check.integer(name, minimum=1)
        for name in ("q_lora_rank", "qk_nope_head_dim", "n_dense_layers", "n_shared_experts"):
            check.integer(name, minimum=0)
        check.integer("qk_rope_head_dim", minimum=2)
        check.real("dropout", minimum=0, below=1)
        check.real("rope_theta", above=0)
        check.real("route_scale", above=0)
        for name in ("gate_noise_std", "bias_update_speed", "aux_loss_alpha", "seq_aux_alpha", "z_loss_coef"):
            check.real(name, minimum=0)
        check.real("capacity_factor", above=0, optional=True)
        check.flag("mla_absorb")
        check.choice("attention", ("mha", "mla"))
        check.choice("ffn", ("dense", "moe"))
        check.choice("score_func", ("softmax", "sigmoid"))
        if c.attention == "mha" and check.ok("dim", "n_heads"):
            if c.dim % c.n_heads:
                check.fail("n_heads", f"n_heads={c.n_heads} must divide dim={c.dim}")
            elif c.dim // c.n_heads % 2:
                check.fail("n_heads", f"the head size dim / n_heads = {c.dim // c.n_heads} must be even "
                                      "(RoPE rotates pairs)")
        if c.attention == "mla" and check.ok("qk_rope_head_dim") and c.qk_rope_head_dim % 2:
            check.fail("qk_rope_head_dim", f"qk_rope_head_dim={c.qk_rope_head_dim} must be even (RoPE rotates pairs)")
        if check.ok("n_layers", "n_dense_layers") and c.n_dense_layers > c.n_layers:
            check.fail("n_dense_layers", f"n_dense_layers={c.n_dense_layers} must be between 0 and "
                                         f"n_layers={c.n_layers}")
        groups = ("n_routed_experts", "n_activated_experts", "n_expert_groups", "n_limited_groups")
        if c.ffn == "moe" and check.ok(*groups):
            if c.n_activated_experts > c.n_routed_experts:
                check.fail("n_activated_experts", f"n_activated_experts={c.n_activated_experts} (top-k) must be "
                                                  f"between 1 and n_routed_experts={c.n_routed_experts}")
            elif c.n_routed_experts % c.n_expert_groups:
                check.fail("n_expert_groups", f"n_expert_groups={c.n_expert_groups} must divide "
                                              f"n_routed_experts={c.n_routed_experts}")
            elif c.n_limited_groups > c.n_expert_groups:
                check.fail("n_limited_groups", f"n_limited_groups={c.n_limited_groups} must be between 1 and "
                                               f"n_expert_groups={c.n_expert_groups}")
            elif c.n_activated_experts > c.n_limited_groups * (c.n_routed_experts // c.n_expert_groups):
                check.fail("n_activated_experts", f"n_activated_experts={c.n_activated_experts} experts cannot "
                                                  f"be found in n_limited_groups={c.n_limited_groups} groups of "
                                                  f"{c.n_routed_experts // c.n_expert_groups} experts")
        check.integer("n_mtp_modules", minimum=0)  # D, the number of MTP modules
        check.real("mtp_loss_weight", minimum=0)  # λ
        check.real("mtp_loss_weight_final", minimum=0, optional=True)
        if c.fp8 is not None and not (isinstance(c.fp8, str) and c.fp8 in RECIPES):
            check.fail("fp8", f"fp8={c.fp8!r} must be None or one of {sorted(RECIPES)}")
        check.done()

    def to_json(self):
        return json.dumps(self.to_dict(), indent=2)


class Block(Module):
    """One pre-norm transformer layer: attention, then a dense or Mixture-of-Experts feed-forward."""

    def __init__(self, layer_id, config):
        super().__init__()
        self.attn_norm = RMSNorm(config.dim)
        if config.attention == "mha":
            self.attn = MHA(config.dim, config.n_heads, config.max_seq_len, rope_theta=config.rope_theta)
        else:
            self.attn = MLA(config.dim, config.n_heads, config.max_seq_len, q_lora_rank=config.q_lora_rank,
                            kv_lora_rank=config.kv_lora_rank, qk_nope_head_dim=config.qk_nope_head_dim,
                            qk_rope_head_dim=config.qk_rope_head_dim, v_head_dim=config.v_head_dim,
                            rope_theta=config.rope_theta, absorb=config.mla_absorb)
        self.ffn_norm = RMSNorm(config.dim)
        if config.ffn == "moe" and layer_id >= config.n_dense_layers:
            self.ffn = MoE(config.dim, config.n_routed_experts, config.n_activated_experts, config.moe_inter_dim,
                           n_shared_experts=config.n_shared_experts, capacity_factor=config.capacity_factor,
                           score_func=config.score_func, route_scale=config.route_scale,
                           n_groups=config.n_expert_groups, topk_groups=config.n_limited_groups,
                           noise_std=config.gate_noise_std, aux_loss_alpha=config.aux_loss_alpha,
                           seq_aux_alpha=config.seq_aux_alpha, z_loss_coef=config.z_loss_coef,
                           bias_update_speed=config.bias_update_speed)
        else:
            self.ffn = MLP(config.dim, config.inter_dim)
        self.dropout = Dropout(config.dropout)

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
        config.validate()  # again: a field may have been changed since the config was built
        self.config = config
        self.embed = Embedding(config.vocab_size, config.dim)
        self.layers = ModuleList([Block(i, config) for i in range(config.n_layers)])
        self.norm = RMSNorm(config.dim)
        self.head = Linear(config.dim, config.vocab_size, bias=False)
        # V3's MTP module is its layer 61, after the 61 main ones (so an MoE block); none when D = 0
        self.mtp = ModuleList([MTPModule(k, config, Block(config.n_layers + k - 1, config))
                               for k in range(1, config.n_mtp_modules + 1)]) if config.n_mtp_modules else None
        self.mtp_weight = config.mtp_loss_weight  # λ now; set_training_progress follows the schedule
        self.mtp_logits = None  # [P¹, …, P^D] of the last forward with mtp=True
        self.last_mtp_loss = None  # (1/D) Σ_k L^k of the last mtp_loss call, for logs
        if config.fp8:
            use_fp8(self, config.fp8)  # V3's choice: FFN GEMMs in FP8; embedding, attention, gate, head not

    def forward(self, ids, start_pos=0, caches=None, mtp=False):
        """Next-token logits (B, T, vocab_size). With mtp=True (training, whole sequences) the MTP modules run too
        and keep their logits for `mtp_loss`."""
        ids = ids.data if isinstance(ids, Tensor) else ids
        hidden = self.hidden_states(ids, start_pos, caches)  # (B, T, dim)
        self.mtp_logits = self.mtp_forward(hidden, ids) if mtp else None
        return self.output(hidden)

    def output(self, hidden):  # (B, T, dim) -> (B, T, vocab)
        return self.head(self.norm(hidden))

    def hidden_states(self, ids, start_pos=0, caches=None):
        """The last layer's output h⁰ (B, T, dim), before the final norm and the head."""
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
        return x

    # ---- multi-token prediction (DeepSeek-V3 §2.2, minimoe/mtp.py) ------------------------------------------------
    def mtp_forward(self, hidden, ids):
        """[P¹, …, P^D]: module k's logits (B, T−k, vocab), P^k at position i predicting token i + k + 1, from the
        main hidden states h⁰ (B, T, dim) of the token ids (B, T). The causal chain: module k reads h^{k−1} and
        the embeddings of the tokens k ahead."""
        if not self.config.n_mtp_modules:
            raise ValueError("Transformer: this model has no MTP modules (n_mtp_modules=0); build it with "
                             "ModelConfig(n_mtp_modules=D) to train multi-token prediction")
        if ids.shape[1] <= self.config.n_mtp_modules:
            raise ValueError(f"Transformer: {ids.shape[1]} tokens leave nothing for MTP depth "
                             f"{self.config.n_mtp_modules}: module k needs more than k tokens")
        logits = []
        for module in self.mtp:
            k, length = module.depth, ids.shape[1] - module.depth
            hidden = module(hidden[:, :length], self.embed(ids[:, k:]))  # (B, T−k, dim)
            logits.append(self.head(module.norm(hidden)))  # (B, T−k, vocab)
        return logits

    def mtp_loss(self, targets, ignore_index=-100):
        """L_MTP = (λ / D) Σ_k CE(P^k, targets shifted by k) of the last forward with mtp=True, where targets
        (B, T) are the main model's next-token targets (target i = token i + 1, so token i + k + 1 is
        targets[:, i + k]). Also keeps the unweighted mean (1/D) Σ_k L^k in `last_mtp_loss` for logs.
        None when the model has no MTP modules."""
        if not self.config.n_mtp_modules:
            return None
        if self.mtp_logits is None:
            raise RuntimeError("Transformer.mtp_loss: run the model with mtp=True first")
        per_depth = [F.cross_entropy(logits, targets[:, k:], ignore_index=ignore_index)
                     for k, logits in enumerate(self.mtp_logits, start=1)]
        mean = per_depth[0]
        for loss in per_depth[1:]:
            mean = mean + loss
        mean = mean * (1.0 / len(per_depth))
        self.last_mtp_loss = mean
        return mean * self.mtp_weight

    def set_training_progress(self, progress):
        """Follow the λ schedule at `progress` ∈ [0, 1] of pretraining (a no-op without MTP modules)."""
        self.mtp_weight = mtp_loss_weight_at(self.config, progress)

    def new_mtp_caches(self, batch_size, max_len=None):
        """One key/value cache per MTP module's block, for drafting (speculative decoding)."""
        max_len = max_len or self.config.max_seq_len
        return [module.block.attn.new_cache(batch_size, max_len) for module in self.mtp]

    def new_caches(self, batch_size, max_len=None):
        """One key/value cache per layer for incremental decoding of up to `max_len` positions."""
        max_len = max_len or self.config.max_seq_len
        return [layer.attn.new_cache(batch_size, max_len) for layer in self.layers]

    def moe_layers(self, mtp=False):
        """The main model's MoE layers (and the MTP modules' after them, with mtp=True)."""
        blocks = list(self.layers) + ([module.block for module in self.mtp] if mtp else [])
        return [block.ffn for block in blocks if isinstance(block.ffn, MoE)]

    def balance_loss(self):
        """Sum of the load-balancing losses of the last forward pass, the MTP modules' included when they ran
        (None if no term is switched on)."""
        moe_layers = self.moe_layers(mtp=self.mtp_logits is not None)
        losses = [moe.balance_loss for moe in moe_layers if moe.balance_loss is not None]
        if not losses:
            return None
        total = losses[0]
        for loss in losses[1:]:
            total = total + loss
        return total

    def update_routing_bias(self):
        """DeepSeek-V3's auxiliary-loss-free step, after the optimizer step: nudge each gate's bias towards
        even load (a no-op where bias_update_speed is 0)."""
        for moe in self.moe_layers(mtp=self.mtp_logits is not None):
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
        """{"total": all parameters, "activated": those one token passes through at inference (routed experts
        it is not sent to excluded, and the MTP modules, which inference drops), "embedding": the embedding table
        and the output head, "mtp": the MTP modules' own parameters (they share the embedding and the head)}."""
        total = self.num_parameters()
        mtp = self.mtp.num_parameters() if self.mtp is not None else 0
        inactive = mtp
        for moe in self.moe_layers():
            per_expert = moe.experts[0].num_parameters()
            inactive += (len(moe.experts) - self.config.n_activated_experts) * per_expert
        embedding = self.embed.weight.size + self.head.weight.size
        return {"total": total, "activated": total - inactive, "embedding": embedding, "mtp": mtp}
