"""PyTorch twin of DeepSeek-V3's multi-token prediction (technical report §2.2), written from the report's
equations on top of the whole-model twin (tests/reference/model.py). For depth k = 1..D, with the main model's
embedding and output head shared:

    h′ᵢᵏ = M_k [RMSNorm(Emb(t_{i+k})) ; RMSNorm(hᵢᵏ⁻¹)]     (the released weights' order: embedding first)
    h^k_{1:T−k} = TRM_k(h′ᵏ_{1:T−k})                        a Transformer block of the main model's kind
    P^k_{i+k+1} = OutHead(hᵢᵏ) = head(RMSNorm_k(hᵢᵏ))
    L_MTP = (λ / D) Σ_k CrossEntropy(P^k, t shifted by k + 1)

h⁰ is the main model's last hidden state (before its final norm). The twin loads minimoe's state dict."""

import torch
import torch.nn.functional as TF
from torch import nn

from reference.attention import RMSNorm
from reference.model import Block, Transformer

__all__ = ["MTPTransformer", "from_minimoe"]


def from_minimoe(config, state):
    """A float64 twin of a minimoe model with MTP modules, loaded strictly from its state dict (host arrays)."""
    reference = MTPTransformer(config).double()
    reference.load_state_dict({name: torch.as_tensor(value) for name, value in state.items()}, strict=True)
    return reference


class MTPModule(nn.Module):
    def __init__(self, layer_id, c):
        super().__init__()
        self.enorm, self.hnorm = RMSNorm(c.dim), RMSNorm(c.dim)
        self.eh_proj = nn.Linear(2 * c.dim, c.dim, bias=False)  # M_k
        self.block = Block(layer_id, c)  # TRM_k
        self.norm = RMSNorm(c.dim)

    def forward(self, previous_hidden, embedded, start_pos=0, use_cache=False):
        combined = torch.cat([self.enorm(embedded), self.hnorm(previous_hidden)], dim=-1)
        return self.block(self.eh_proj(combined), start_pos, use_cache)


class MTPTransformer(Transformer):
    def __init__(self, config):
        super().__init__(config)
        self.config = config
        self.mtp = nn.ModuleList([MTPModule(config.n_layers + k, config) for k in range(config.n_mtp_modules)])

    def hidden(self, ids, start_pos=0, use_cache=False):
        x = self.embed(ids)
        for layer in self.layers:
            x = layer(x, start_pos, use_cache)
        return x

    def forward_mtp(self, ids):
        """(main logits (B, T, V), [P¹ (B, T−1, V), …, P^D (B, T−D, V)])."""
        hidden = self.hidden(ids)
        logits = self.head(self.norm(hidden))
        T, depth_logits = ids.shape[1], []
        for k, module in enumerate(self.mtp, start=1):
            hidden = module(hidden[:, :T - k], self.embed(ids[:, k:]))
            depth_logits.append(self.head(module.norm(hidden)))
        return logits, depth_logits

    def mtp_loss(self, depth_logits, targets, weight, ignore_index=-100):
        """(λ / D) Σ_k CE(P^k, targets[:, k:]), targets[:, i] being token i + 1."""
        V, D = self.config.vocab_size, len(depth_logits)
        losses = [TF.cross_entropy(logits.reshape(-1, V), targets[:, k:].reshape(-1), ignore_index=ignore_index)
                  for k, logits in enumerate(depth_logits, start=1)]
        return weight / D * sum(losses)

    def balance_loss(self):
        from reference.moe import MoE
        blocks = list(self.layers) + [module.block for module in self.mtp]
        losses = [b.ffn.balance_loss for b in blocks if isinstance(b.ffn, MoE) and b.ffn.balance_loss is not None]
        return sum(losses) if losses else None
