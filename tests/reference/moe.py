"""PyTorch twins of minimoe.nn.moe, written from the DeepSeekMoE / V2 / V3 papers, Switch and ST-MoE,
never by calling minimoe. The MoE loops over experts and picks each expert's tokens with
torch.where: slow, obviously right. Load minimoe's state dict (buffers included) with `load_minimoe_state`.

Routing is deterministic here (no noisy top-k): the tests compare with noise off.
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as TF


def load_minimoe_state(module, state):
    """Load a minimoe state dict ({name: array of any backend}, converted by the caller to host NumPy arrays)
    into a twin, strictly: every parameter and buffer must be there. The twin takes the state's dtype."""
    module.to(torch.as_tensor(next(iter(state.values()))).dtype)
    module.load_state_dict({name: torch.as_tensor(value) for name, value in state.items()}, strict=True)
    return module


class Expert(nn.Module):
    """SwiGLU without biases: w2(silu(w1 x) * w3 x)."""

    def __init__(self, dim, inter_dim):
        super().__init__()
        self.w1 = nn.Linear(dim, inter_dim, bias=False)
        self.w2 = nn.Linear(inter_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, inter_dim, bias=False)

    def forward(self, x):
        return self.w2(TF.silu(self.w1(x)) * self.w3(x))


MLP = Expert


class Gate(nn.Module):
    """Router of DeepSeek-V2 (softmax) / V3 (sigmoid, bias for selection only, group-limited routing) with the
    Switch auxiliary loss, V3's sequence-wise balance loss and the ST-MoE router z-loss."""

    def __init__(self, dim, n_routed_experts, top_k, score_func="softmax", route_scale=1.0, n_groups=1,
                 topk_groups=1, noise_std=0.0, aux_loss_alpha=0.0, seq_aux_alpha=0.0, z_loss_coef=0.0,
                 bias_update_speed=0.0):
        super().__init__()
        assert noise_std == 0, "the twin routes deterministically"
        self.n, self.k, self.score_func, self.route_scale = n_routed_experts, top_k, score_func, route_scale
        self.n_groups, self.topk_groups = n_groups, topk_groups
        self.aux_loss_alpha, self.seq_aux_alpha, self.z_loss_coef = aux_loss_alpha, seq_aux_alpha, z_loss_coef
        self.weight = nn.Parameter(torch.empty(n_routed_experts, dim))
        if bias_update_speed > 0:
            self.register_buffer("bias", torch.zeros(n_routed_experts))
        else:
            self.bias = None

    def group_scores(self, choice):
        """(N, G): max of each group's selection scores without a bias, sum of its top-2 with one (as V3's
        inference/model.py: the rule follows the bias, not the score function)."""
        grouped = choice.view(choice.shape[0], self.n_groups, -1)
        if self.bias is None:
            return grouped.amax(dim=-1)
        return grouped.topk(min(2, grouped.shape[-1]), dim=-1)[0].sum(dim=-1)

    def selection_scores(self, scores):
        """s + b with the groups outside the top ones masked to -inf (as V3's inference/model.py)."""
        choice = scores if self.bias is None else scores + self.bias
        if self.n_groups > 1:
            group_scores = self.group_scores(choice)
            grouped = choice.view(choice.shape[0], self.n_groups, -1)
            best = group_scores.topk(self.topk_groups, dim=-1)[1]
            masked = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, best, False)
            choice = grouped.masked_fill(masked.unsqueeze(-1), float("-inf")).flatten(1)
        return choice

    def forward(self, x):
        """x (S, T, dim) -> weights (S·T, K), indices (S·T, K), scores (S·T, E), {loss name: value}."""
        n_sequences, seq_len = x.shape[0], x.shape[1]
        logits = x.reshape(-1, x.shape[-1]) @ self.weight.T
        scores = logits.softmax(dim=-1) if self.score_func == "softmax" else logits.sigmoid()
        indices = self.selection_scores(scores.detach()).topk(self.k, dim=-1)[1]
        weights = scores.gather(1, indices)
        if self.score_func == "sigmoid":
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights * self.route_scale

        probabilities = scores / scores.sum(dim=-1, keepdim=True) if self.score_func == "sigmoid" else scores
        losses = {}
        if self.aux_loss_alpha > 0:  # Switch: α N Σ f_i P_i, f_i = count_i / (T K)
            f = torch.bincount(indices.flatten(), minlength=self.n).to(x.dtype) / (indices.shape[0] * self.k)
            losses["aux_loss"] = self.aux_loss_alpha * self.n * (f * probabilities.mean(dim=0)).sum()
        if self.seq_aux_alpha > 0:  # V3: per sequence α Σ f_i P_i, f_i = N/(K T) count_i; mean over sequences
            per_sequence = []
            for s in range(n_sequences):
                rows = slice(s * seq_len, (s + 1) * seq_len)
                count = torch.bincount(indices[rows].flatten(), minlength=self.n).to(x.dtype)
                f = self.n / (self.k * seq_len) * count
                per_sequence.append((f * probabilities[rows].mean(dim=0)).sum())
            losses["seq_aux_loss"] = self.seq_aux_alpha * torch.stack(per_sequence).mean()
        if self.z_loss_coef > 0:
            losses["z_loss"] = self.z_loss_coef * (torch.logsumexp(logits, dim=-1) ** 2).mean()
        return weights, indices, scores, losses


class MoE(nn.Module):
    """Shared experts + routed experts; each expert processes the tokens that chose it (a loop over experts).
    With a capacity factor, an expert keeps its ceil(cf·N·K/E) highest-scoring tokens."""

    def __init__(self, dim, n_routed_experts, n_activated_experts, moe_inter_dim, n_shared_experts=0,
                 capacity_factor=None, **gate_options):
        super().__init__()
        self.k, self.capacity_factor = n_activated_experts, capacity_factor
        self.gate = Gate(dim, n_routed_experts, n_activated_experts, **gate_options)
        self.experts = nn.ModuleList([Expert(dim, moe_inter_dim) for _ in range(n_routed_experts)])
        self.shared_experts = MLP(dim, n_shared_experts * moe_inter_dim) if n_shared_experts else None

    def forward(self, x):
        shape = x.shape
        x = x.reshape(-1, shape[-2], shape[-1])  # (S, T, dim)
        weights, indices, scores, self.losses = self.gate(x)
        self.balance_loss = sum(self.losses.values()) if self.losses else None
        self.counts = torch.bincount(indices.flatten(), minlength=len(self.experts))
        tokens = x.reshape(-1, shape[-1])
        n = tokens.shape[0]
        capacity = None if self.capacity_factor is None else \
            math.ceil(self.capacity_factor * n * self.k / len(self.experts))
        y = self.shared_experts(tokens) if self.shared_experts is not None else torch.zeros_like(tokens)
        self.dropped = 0
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(indices == e)
            if capacity is not None and len(token) > capacity:
                best = torch.sort(scores[token, e].detach(), descending=True, stable=True)[1][:capacity]
                self.dropped += len(token) - capacity
                token, slot = token[best], slot[best]
            if len(token):
                y = y.index_add(0, token, expert(tokens[token]) * weights[token, slot, None])
        return y.reshape(shape)
