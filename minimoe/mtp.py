"""Multi-token prediction (DeepSeek-V3 technical report §2.2): D small modules that, next to the main model's
next-token head, predict the tokens after it, each keeping the full causal chain.

    main model:   ids ─ embed ─ layers ─→ h⁰ ─ norm ─ head ─→ P⁰_{i+1}          (the usual logits)
    module k:     h′ᵢᵏ = M_k [enorm(Emb(t_{i+k})) ; hnorm(hᵢᵏ⁻¹)]        i = 0 .. T−1−k
                  hᵏ   = TRM_k(h′ᵏ)                                      a Transformer block, causal
                  P^k_{i+k+1} = head(norm_k(hᵢᵏ))                         predicts the token k+1 ahead
    loss:         L_MTP = (λ / D) Σ_k CrossEntropy(P^k, t shifted by k + 1)

The embedding `Emb` and the output `head` are the main model's own (shared, not copied); each module owns its
projection M_k (`eh_proj`, d × 2d), its two input RMSNorms (`enorm`, `hnorm`), its Transformer block TRM_k (the
same `Block` as the main model: MHA or MLA, dense or MoE as the config says) and an RMSNorm before the shared head
(`norm`: the report folds it into "OutHead"; the released V3 weights give each module its own, as here).

Concatenation order: [enorm(embedding) ; hnorm(hidden)], as in the released weights (`eh_proj`: embedding
columns first) and the serving code; the report writes the hidden state first. The two orders are the same model
with M_k's column halves swapped.

λ: 0.3 by default; with `mtp_loss_weight_final` set, λ drops to it after the first 10/14.8 of pretraining (V3:
0.3 for the first 10T tokens, 0.1 for the remaining 4.8T).

At inference the modules can be dropped (the main model never reads them), or used to draft tokens for
speculative decoding (minimoe/speculative.py).
"""

from . import functional as F
from .nn import Linear, Module, RMSNorm

__all__ = ["MTPModule", "mtp_loss_weight_at", "MTP_SWITCH_FRACTION"]

MTP_SWITCH_FRACTION = 10.0 / 14.8  # V3: λ = 0.3 for the first 10T of 14.8T training tokens, then 0.1


class MTPModule(Module):
    """Depth k of multi-token prediction: combines the previous depth's hidden states h^{k-1} (B, T, dim) with the
    embeddings of the tokens k ahead (B, T, dim) and runs them through its own Transformer block.
    forward(hidden, embedded, start_pos=0, cache=None) -> h^k (B, T, dim); `norm` then the shared head give P^k."""

    def __init__(self, depth, config, block):
        super().__init__()
        self.depth = depth
        self.enorm = RMSNorm(config.dim)
        self.hnorm = RMSNorm(config.dim)
        self.eh_proj = Linear(2 * config.dim, config.dim, bias=False)  # M_k
        self.block = block
        self.norm = RMSNorm(config.dim)

    def forward(self, hidden, embedded, start_pos=0, cache=None):  # (B, T, dim), (B, T, dim) -> (B, T, dim)
        if hidden.shape != embedded.shape:
            raise ValueError(f"MTPModule (depth {self.depth}): hidden states {hidden.shape} and embeddings "
                             f"{embedded.shape} must have the same shape (B, T, dim)")
        combined = F.concatenate([self.enorm(embedded), self.hnorm(hidden)], axis=-1)  # (B, T, 2·dim)
        return self.block(self.eh_proj(combined), start_pos=start_pos, cache=cache)

    def extra_repr(self):
        return f"depth={self.depth}"


def mtp_loss_weight_at(config, progress):
    """λ at `progress` ∈ [0, 1] of pretraining: mtp_loss_weight, then mtp_loss_weight_final (when set) from
    MTP_SWITCH_FRACTION on."""
    if config.mtp_loss_weight_final is not None and progress >= MTP_SWITCH_FRACTION:
        return config.mtp_loss_weight_final
    return config.mtp_loss_weight
