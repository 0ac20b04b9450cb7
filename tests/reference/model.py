"""PyTorch twin of minimoe's Transformer, assembled from the layer twins (tests/reference/attention.py and
moe.py) the way DeepSeek-V3's reference `Transformer` assembles its blocks: pre-norm RMSNorm, attention and a
dense or MoE feed-forward on residual connections, final norm, output head. It takes a minimoe ModelConfig
(plain data) and loads minimoe's state dict, buffers included."""

import torch
from torch import nn

from reference.attention import MHA, MLA, RMSNorm
from reference.moe import MLP, MoE

__all__ = ["Transformer", "from_minimoe"]


def from_minimoe(config, state):
    """A float64 twin of a minimoe model with config `config`, loaded strictly from its state dict (host arrays).
    `.double()` converts only floating-point tensors, so RoPE's complex table stays complex."""
    reference = Transformer(config).double()
    reference.load_state_dict({name: torch.as_tensor(value) for name, value in state.items()}, strict=True)
    return reference


class Block(nn.Module):
    def __init__(self, layer_id, c):
        super().__init__()
        self.attn_norm = RMSNorm(c.dim)
        if c.attention == "mha":
            self.attn = MHA(c.dim, c.n_heads, c.max_seq_len, c.rope_theta)
        else:
            self.attn = MLA(c.dim, c.n_heads, c.max_seq_len, c.q_lora_rank, c.kv_lora_rank, c.qk_nope_head_dim,
                            c.qk_rope_head_dim, c.v_head_dim, c.rope_theta, absorb=c.mla_absorb)
        self.ffn_norm = RMSNorm(c.dim)
        if c.ffn == "moe" and layer_id >= c.n_dense_layers:
            self.ffn = MoE(c.dim, c.n_routed_experts, c.n_activated_experts, c.moe_inter_dim, c.n_shared_experts,
                           c.capacity_factor, score_func=c.score_func, route_scale=c.route_scale,
                           n_groups=c.n_expert_groups, topk_groups=c.n_limited_groups,
                           aux_loss_alpha=c.aux_loss_alpha, seq_aux_alpha=c.seq_aux_alpha,
                           z_loss_coef=c.z_loss_coef, bias_update_speed=c.bias_update_speed)
        else:
            self.ffn = MLP(c.dim, c.inter_dim)

    def forward(self, x, start_pos=0, use_cache=False):
        x = x + self.attn(self.attn_norm(x), start_pos, use_cache)
        return x + self.ffn(self.ffn_norm(x))


class Transformer(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList([Block(i, config) for i in range(config.n_layers)])
        self.norm = RMSNorm(config.dim)
        self.head = nn.Linear(config.dim, config.vocab_size, bias=False)

    def forward(self, ids, start_pos=0, use_cache=False):
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x, start_pos, use_cache)
        return self.head(self.norm(x))

    def new_caches(self, batch_size, max_len):
        for layer in self.layers:
            layer.attn.new_cache(batch_size, max_len)

    def balance_loss(self):
        losses = [layer.ffn.balance_loss for layer in self.layers
                  if isinstance(layer.ffn, MoE) and layer.ffn.balance_loss is not None]
        return sum(losses) if losses else None
