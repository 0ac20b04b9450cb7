"""Experts, routing and the Mixture-of-Experts layer (DeepSeekMoE, DeepSeek-V2, DeepSeek-V3).

    h_t = u_t + Σ_{i ≤ N_s} FFN^shared_i(u_t) + Σ_{i ≤ N_r} g_{i,t} · FFN^routed_i(u_t)

Every token u_t goes through the shared experts and through the K of the N routed experts its `Gate` picks,
each output weighted by a combine weight g_{i,t} (zero for the experts not picked). The residual u_t is added
by the transformer block, not here. Names follow DeepSeek-V3's reference code: `Expert`, `MLP`, `Gate`, `MoE`.

The layer never loops over tokens. It sorts the (token, expert) assignments by expert, gathers all routed
tokens once, runs every expert on its own contiguous slice of rows (`GroupedLinear`, the "grouped GEMM" of
real MoE kernels), and adds the weighted results back to their tokens with one scatter-add (`F.index_add`).
The cost therefore follows the *activated* parameters (K experts per token), not the total number of experts.
"""

import itertools
import math
from collections import namedtuple

from .. import functional as F
from ..autograd import Function, ShapeError, Tensor, get_default_dtype, is_grad_enabled
from ..backend import backend_of, device_rng, get_array_module, get_backend
from .module import Linear, Module, ModuleList, Parameter, init_uniform

__all__ = ["Expert", "MLP", "Gate", "Routing", "MoE", "GroupedLinear", "Renormalize"]


# ==============================================================================================================
# two ops the layer needs
# ==============================================================================================================

class Renormalize(Function):
    """y = x / Σ x along the last axis (weights that sum to 1);   dL/dx = (g − Σ g⊙y) / Σ x.

    With a single entry y = 1 whatever x is, and the backward gives exactly 0 (g − g·1): the top-1 trap of
    renormalised routing, where the router learns nothing from the loss the experts serve."""

    def forward(self, x):
        total = x.sum(axis=-1, keepdims=True)
        y = x / total
        self.save(y, total)
        return y

    def backward(self, g):
        y, total = self.saved
        return (g - (g * y).sum(axis=-1, keepdims=True)) / total


class GroupedLinear(Function):
    """Rows of x in consecutive groups of the given sizes; group e is multiplied by its own weight W_e (out, in):

        y[rows of e] = x[rows of e] W_eᵀ
        dL/dx[rows of e] = g[rows of e] W_e,     dL/dW_e = g[rows of e]ᵀ x[rows of e]

    One graph node for all experts, and each expert's backward touches only its own rows. (Slicing a tensor
    per expert would instead give every slice a backward as large as the whole input: a cost that grows with
    the number of experts.) `sizes` are host integers. An empty group's weight gets no gradient (None), as in
    PyTorch, where an expert that received no token is not in the graph at all."""

    def __init__(self, sizes):
        starts = [0, *itertools.accumulate(sizes)]
        self.bounds = list(zip(starts[:-1], starts[1:]))

    def forward(self, x, *weights):
        if len(weights) != len(self.bounds) or x.shape[0] != self.bounds[-1][1]:
            raise ShapeError(f"GroupedLinear: {x.shape[0]} rows and {len(weights)} weights for groups "
                             f"{[end - start for start, end in self.bounds]}")
        xp = get_array_module(x)
        y = xp.empty((x.shape[0], weights[0].shape[0]), dtype=x.dtype)  # (rows, out)
        for (start, end), weight in zip(self.bounds, weights):
            xp.matmul(x[start:end], weight.T, out=y[start:end])  # written straight into its rows: no copy
        self.save(x, weights)
        return y

    def backward(self, g):
        x, weights = self.saved
        xp = get_array_module(g)
        gx = xp.empty(x.shape, dtype=g.dtype) if self.needs_grad[0] else None  # (rows, in)
        gws = []
        for (start, end), weight, needs in zip(self.bounds, weights, self.needs_grad[1:]):
            if gx is not None:
                xp.matmul(g[start:end], weight, out=gx[start:end])
            gws.append(g[start:end].T @ x[start:end] if needs and end > start else None)
        return (gx, *gws)


# ==============================================================================================================
# experts
# ==============================================================================================================

class Expert(Module):
    """One routed expert: a SwiGLU feed-forward without biases,  y = w2(silu(w1 x) ⊙ w3 x).
    x (..., dim) -> (..., dim) through an inner width `inter_dim`.
    MoE.forward only reads its weights, for grouped products over every expert at once; MoE.forward_plain calls
    this forward, expert by expert."""

    def __init__(self, dim, inter_dim):
        super().__init__()
        self.dim, self.inter_dim = dim, inter_dim
        self.w1 = Linear(dim, inter_dim, bias=False)
        self.w2 = Linear(inter_dim, dim, bias=False)
        self.w3 = Linear(dim, inter_dim, bias=False)

    def forward(self, x):
        return self.w2(F.swiglu(self.w1(x), self.w3(x)))

    def extra_repr(self):
        return f"{self.dim} -> {self.inter_dim} -> {self.dim}"


class MLP(Expert):
    """The dense SwiGLU feed-forward: the same computation as an Expert, under its own name (as in DeepSeek-V3)
    because it plays other parts: the FFN of the first, dense layers, and the shared experts (N_s shared experts
    of width I, summed, are exactly one MLP of width N_s·I)."""


# ==============================================================================================================
# the gate
# ==============================================================================================================

Routing = namedtuple("Routing", ["weights", "indices", "scores", "counts", "losses"])
Routing.__doc__ = """What a Gate decides for N tokens, K experts each:
    weights -- (N, K) Tensor, the combine weights g of the chosen experts (differentiable)
    indices -- (N, K) integer array, the chosen experts, best first
    scores  -- (N, E) Tensor, the unbiased scores s (softmax or sigmoid of the logits)
    counts  -- (E,) integer array, how many tokens chose each expert (the load)
    losses  -- {name: 0-d Tensor} for each enabled balance term: "aux_loss", "seq_aux_loss", "z_loss" """


class Gate(Module):
    """The router: picks K of the E routed experts for every token and says how much each one counts.

        logits = x Wᵀ                          W (E, dim): no bias, no 1/√dim
        s      = softmax(logits)   (V2, Mixtral)    or    sigmoid(logits)   (V3)
        chosen = top-K of  s + b  (+ noise)    b: the balancing bias; it changes the choice only
        g      = s[chosen], renormalised to sum to 1 for sigmoid (V3), as they are for softmax (V2); × route_scale

    Group-limited routing (n_groups > 1): the experts form n_groups equal groups; a group's score is, as in
    DeepSeek-V3's reference Gate, the max of its selection scores when the gate has no bias (V2's rule) and the
    sum of its top-2 biased scores when it has one (V3's rule; a one-expert group scores its only expert). The
    rule follows the bias, not the score function: sigmoid without a bias scores groups by their max, softmax
    with a bias by their top-2 sum. (Hugging Face's DeepseekV3 always has a bias, `e_score_correction_bias`,
    and always uses the top-2 sum.) Only the topk_groups best groups stay, the others are set to −inf before
    the top-K. Not 0: with a sigmoid and a negative bias every kept score can be below 0, and a "masked"
    expert would win.

    Noisy top-k (noise_std > 0, training mode only): ε ~ N(0, noise_std²) per token and expert is added to the
    selection scores s + b, so it changes which experts are chosen (groups included) and nothing else: the
    combine weights, the balance losses and the gradients come from the noise-free s. Eval mode is deterministic.

    Load balancing, each term on when its coefficient is > 0 (f_i and counts use the choices before any
    capacity drop; p = s / Σ_j s_j are the normalised scores, p = s for softmax):
        aux_loss     (Switch/GShard)   α E Σ_i f_i P_i,  f_i = count_i / (T K) over the batch's T tokens,
                                       P_i = mean_t p_{t,i};  equals α when the load is perfectly even
        seq_aux_loss (V3, per sequence) α Σ_i f_i P_i  with f_i = E/(K T_seq) · count_i and P_i = mean_t p_{t,i}
                                       over one sequence's T_seq tokens, averaged over the sequences
        z_loss       (ST-MoE)          coef · mean_t (logsumexp_i logits_{t,i})²
    Auxiliary-loss-free balancing (V3; bias_update_speed γ > 0): a buffer `bias` (E,), never trained by
    gradients; after each optimizer step `update_bias()` sets b_i ← b_i + γ · sign(mean_j load_j − load_i),
    from the load summed over the training forwards since the previous update.

    The top-1 trap: with top_k=1 and renormalised (sigmoid) weights every g is exactly 1, so the router receives
    no gradient at all from the output; only the balance terms (or the bias) can steer it.
    """

    def __init__(self, dim, n_routed_experts, top_k, score_func="softmax", route_scale=1.0, n_groups=1,
                 topk_groups=1, noise_std=0.0, aux_loss_alpha=0.0, seq_aux_alpha=0.0, z_loss_coef=0.0,
                 bias_update_speed=0.0):
        super().__init__()
        if score_func not in ("softmax", "sigmoid"):
            raise ValueError(f"Gate: score_func must be 'softmax' or 'sigmoid', got {score_func!r}")
        if not 1 <= top_k <= n_routed_experts:
            raise ValueError(f"Gate: top_k={top_k} must be between 1 and n_routed_experts={n_routed_experts}")
        if n_groups < 1 or n_routed_experts % n_groups:
            raise ValueError(f"Gate: n_groups={n_groups} must divide n_routed_experts={n_routed_experts} "
                             "into equal groups")
        if not 1 <= topk_groups <= n_groups:
            raise ValueError(f"Gate: topk_groups={topk_groups} must be between 1 and n_groups={n_groups}")
        if top_k > topk_groups * (n_routed_experts // n_groups):
            raise ValueError(f"Gate: top_k={top_k} experts cannot be found in topk_groups={topk_groups} groups of "
                             f"{n_routed_experts // n_groups} experts")
        for name, value in [("noise_std", noise_std), ("aux_loss_alpha", aux_loss_alpha),
                            ("seq_aux_alpha", seq_aux_alpha), ("z_loss_coef", z_loss_coef),
                            ("bias_update_speed", bias_update_speed)]:
            if value < 0:
                raise ValueError(f"Gate: {name} must be ≥ 0, got {value}")
        self.dim, self.n_routed_experts, self.top_k = dim, n_routed_experts, top_k
        self.score_func, self.route_scale = score_func, route_scale
        self.n_groups, self.topk_groups, self.noise_std = n_groups, topk_groups, noise_std
        self.aux_loss_alpha, self.seq_aux_alpha, self.z_loss_coef = aux_loss_alpha, seq_aux_alpha, z_loss_coef
        self.bias_update_speed = bias_update_speed
        self.weight = Parameter(init_uniform((n_routed_experts, dim), 1 / math.sqrt(dim)))
        if bias_update_speed > 0:
            self.register_buffer("bias", get_backend().xp.zeros(n_routed_experts, dtype=get_default_dtype()))
        else:
            self.bias = None
        self.load_since_update = None  # (E,) tokens per expert, summed over training forwards; see update_bias

    def forward(self, x):
        """x (..., T, dim) -> Routing for its N tokens (flattened in order). The leading axes count as separate
        sequences for the sequence-wise loss; a 2-D input is one sequence."""
        if x.ndim < 2 or x.shape[-1] != self.dim:
            raise ShapeError(f"Gate: expected an input (..., T, dim={self.dim}), got shape {x.shape}")
        n_sequences, seq_len = math.prod(x.shape[:-2]), x.shape[-2]
        logits = F.linear(x.reshape(-1, self.dim), self.weight)  # (N, E)
        scores = F.softmax(logits) if self.score_func == "softmax" else F.sigmoid(logits)  # (N, E)

        indices = self._select(scores.data)  # (N, K)
        weights = F.take_along_axis(scores, indices, axis=-1)  # (N, K)
        if self.score_func == "sigmoid":
            weights = Renormalize()(weights)
        if self.route_scale != 1:
            weights = weights * self.route_scale

        counts = backend_of(indices).bincount(indices.reshape(-1), self.n_routed_experts)  # (E,), no sync
        if self.training and self.bias is not None:
            self.load_since_update = counts if self.load_since_update is None else self.load_since_update + counts
        losses = self._balance_losses(logits, scores, indices, counts, n_sequences, seq_len)
        return Routing(weights, indices, scores, counts, losses)

    def _select(self, scores):
        """Top-K experts (N, K), best first, by selection score s + b (+ noise), group-limited; plain arrays, no
        gradient (F.topk_indices: K rounds of argmax). An exact tie, which continuous scores almost never produce,
        goes to the lower expert index."""
        xp = get_array_module(scores)
        choice = scores.copy() if self.bias is None else scores + self.bias  # (N, E), a new array: masked below
        if self.training and self.noise_std > 0:
            noise = device_rng(backend_of(scores)).standard_normal(choice.shape, dtype=choice.dtype)  # (N, E)
            choice += self.noise_std * noise
        if self.n_groups > 1:
            n = choice.shape[0]
            grouped = choice.reshape(n, self.n_groups, -1)  # (N, G, E/G)
            if self.bias is None:
                group_scores = grouped.max(axis=-1)  # (N, G)
            else:
                group_scores = xp.sort(grouped, axis=-1)[..., -2:].sum(axis=-1)  # (N, G)
            best_groups = xp.argsort(-group_scores, axis=-1, kind="stable")[:, :self.topk_groups]  # (N, M)
            kept = (best_groups[:, :, None] == xp.arange(self.n_groups)).any(axis=1)  # (N, G)
            choice = xp.where(kept[:, :, None], grouped, -xp.inf).reshape(n, -1)  # (N, E)
        return F.topk_indices(choice, self.top_k)  # (N, K)

    def _balance_losses(self, logits, scores, indices, counts, n_sequences, seq_len):
        """{name: 0-d Tensor} for the enabled balance terms (see the class docstring)."""
        losses = {}
        if self.aux_loss_alpha > 0 or self.seq_aux_alpha > 0:
            probabilities = scores if self.score_func == "softmax" else Renormalize()(scores)  # (N, E)
        if self.aux_loss_alpha > 0:
            losses["aux_loss"] = self.aux_loss_alpha * self._expert_balance(
                probabilities.reshape(1, -1, self.n_routed_experts), counts[None])
        if self.seq_aux_alpha > 0:
            xp = get_array_module(counts)
            sequence = xp.arange(indices.shape[0]) // seq_len  # (N,)
            per_sequence = backend_of(indices).bincount((sequence[:, None] * self.n_routed_experts + indices)
                                                        .reshape(-1), n_sequences * self.n_routed_experts)
            losses["seq_aux_loss"] = self.seq_aux_alpha * self._expert_balance(
                probabilities.reshape(n_sequences, seq_len, -1), per_sequence.reshape(n_sequences, -1))
        if self.z_loss_coef > 0:
            losses["z_loss"] = self.z_loss_coef * (F.logsumexp(logits, axis=-1) ** 2).mean()
        return losses

    def _expert_balance(self, probabilities, counts):
        """mean over groups of tokens of Σ_i f_i P_i, f_i = E/(K T) · count_i, P_i = mean_t p_{t,i}.
        probabilities (S, T, E) Tensor, counts (S, E) array: S groups (sequences, or the whole batch) of T."""
        tokens = probabilities.shape[1]
        fraction = counts * (self.n_routed_experts / (self.top_k * tokens))  # (S, E), no gradient: counts
        return (probabilities.mean(axis=1) * fraction.astype(probabilities.dtype)).sum(axis=-1).mean()

    def update_bias(self):
        """Auxiliary-loss-free balancing, after an optimizer step: b_i ← b_i + γ·sign(mean_j load_j − load_i).
        Overloaded experts become less attractive, idle ones more. A no-op when bias_update_speed is 0 or no
        training forward happened since the last update."""
        if self.bias is None or self.load_since_update is None:
            return
        load = self.load_since_update
        self.bias += (self.bias_update_speed * get_array_module(load).sign(load.mean() - load)).astype(self.bias.dtype)
        self.load_since_update = None

    def extra_repr(self):
        options = [f"{self.dim} -> {self.n_routed_experts} experts", f"top_k={self.top_k}", self.score_func]
        if self.n_groups > 1:
            options.append(f"groups {self.topk_groups} of {self.n_groups}")
        return ", ".join(options)


# ==============================================================================================================
# the Mixture-of-Experts layer
# ==============================================================================================================

class RoutingStats(dict):
    """An MoE layer's statistics of its last forward: a dict of backend arrays. "router_entropy", the mean over
    tokens of -Σ_i p_i log p_i (p the normalised scores), is computed the first time it is read: it costs a pass
    over all N×E scores, and only logs want it (not the decode steps of generation, say)."""

    def __init__(self, scores, **values):
        super().__init__(values)
        self._scores = scores  # (N, E)

    def __missing__(self, key):
        if key != "router_entropy":
            raise KeyError(key)
        xp = get_array_module(self._scores)
        p = self._scores / self._scores.sum(axis=-1, keepdims=True)
        log_p = xp.log(xp.maximum(p, xp.finfo(p.dtype).tiny))
        self[key] = xp.asarray(-xp.vdot(p, log_p) / p.shape[0])
        return self[key]



class MoE(Module):
    """DeepSeekMoE: shared experts every token passes through, plus routed experts chosen by the gate.
    x (B, T, dim) -> (B, T, dim), the sum  Σ shared(x) + Σ_chosen g · expert(x)  (the block adds the residual).

    n_routed_experts E, n_activated_experts K (per token), moe_inter_dim I (width of one expert),
    n_shared_experts N_s (one MLP of width N_s·I, or None), gate options: see `Gate`.

    capacity_factor (None: dropless, as V3): in training mode each expert takes at most
    ceil(capacity_factor · N·K / E) of the batch's N·K assignments, its highest-scoring ones (by s, the
    unbiased score); the others are dropped: that token gets nothing from that expert (the surviving weights
    are not renormalised), and a token that loses all its experts passes through the residual and the shared
    experts only. Eval mode never drops and never adds noise, so a token's output does not depend on the rest
    of the batch and routing is deterministic, as generation and the RL loop need. The bias still applies.

    Decoding (eval mode, no_grad, at most `sync_free_tokens` tokens): every expert runs on every token and each token
    keeps its K outputs, so the layer needs no block sizes on the host (see `_every_expert_on_every_token`).

    After each forward:
      balance_loss -- a 0-d Tensor in the graph, the sum of the enabled balance terms (None when none is on);
                      add it to the training loss
      stats        -- backend arrays, for logging (copy to the host only when you print them):
                      "tokens_per_expert" (E,) load before any drop; "imbalance" max/mean of that load;
                      "router_entropy" mean over tokens of −Σ_i p_i log p_i (p the normalised scores);
                      "dropped" (token, expert) assignments dropped by the capacity; and the value of each
                      enabled balance term ("aux_loss", "seq_aux_loss", "z_loss")
    """

    sync_free_tokens = 64  # decode steps up to this many tokens take the sync-free path

    def __init__(self, dim, n_routed_experts, n_activated_experts, moe_inter_dim, n_shared_experts=0,
                 capacity_factor=None, **gate_options):
        super().__init__()
        if capacity_factor is not None and capacity_factor <= 0:
            raise ValueError(f"MoE: capacity_factor must be > 0 (or None for dropless), got {capacity_factor}")
        self.dim, self.n_routed_experts, self.n_activated_experts = dim, n_routed_experts, n_activated_experts
        self.moe_inter_dim, self.n_shared_experts = moe_inter_dim, n_shared_experts
        self.capacity_factor = capacity_factor
        self.gate = Gate(dim, n_routed_experts, n_activated_experts, **gate_options)
        self.experts = ModuleList([Expert(dim, moe_inter_dim) for _ in range(n_routed_experts)])
        self.shared_experts = MLP(dim, n_shared_experts * moe_inter_dim) if n_shared_experts > 0 else None
        self.balance_loss = None
        self.stats = None

    grouped_linear = GroupedLinear  # the routed experts' GEMMs (minimoe.fp8.use_fp8 swaps in an FP8 one)

    def forward(self, x):
        if x.ndim < 2 or x.shape[-1] != self.dim:
            raise ShapeError(f"MoE: expected an input (B, T, dim={self.dim}), got shape {x.shape}")
        xp = get_array_module(x.data)
        k = self.n_activated_experts
        routing = self.gate(x)
        tokens = x.reshape(-1, self.dim)  # (N, dim)
        n = tokens.shape[0]
        if n <= self.sync_free_tokens and not (self.training or is_grad_enabled()):  # decoding: no host sync
            routed = self._every_expert_on_every_token(tokens, routing)
            y = routed if self.shared_experts is None else self.shared_experts(tokens) + routed
            self._record(routing, xp.zeros((), dtype=routing.counts.dtype))
            return y.reshape(x.shape)

        # Dispatch: one stable sort groups the N·K (token, expert) assignments by expert. Expert batch boundaries
        # must be host integers to slice with: copying the E counts is this layer's one small device->host sync.
        counts = routing.counts  # (E,)
        sizes = backend_of(counts).to_numpy(counts).tolist()
        expert_of = routing.indices.reshape(-1)  # (N·K,) assignment a = token a // K, choice a % K
        capacity = self._capacity(n) if self.training else None
        if capacity is None:
            order = xp.argsort(expert_of, kind="stable")  # (N·K,) grouped by expert, in token order
            dropped = xp.zeros((), dtype=counts.dtype)
        else:
            order, sizes = self._drop_overflow(routing, expert_of, capacity, sizes)
            dropped = xp.maximum(counts - capacity, 0).sum()
        token_of = order // k  # (A,) the token of each kept assignment, A = Σ sizes

        # Experts: every routed token gathered once, each expert run on its own contiguous rows.
        # plain: for each expert e, expert_e(x[tokens that chose e]), see forward_plain
        routed = tokens[token_of]  # (A, dim)
        gate_proj = self.grouped_linear(sizes)(routed, *(e.w1.weight for e in self.experts))  # (A, I)
        up_proj = self.grouped_linear(sizes)(routed, *(e.w3.weight for e in self.experts))  # (A, I)
        expert_out = self.grouped_linear(sizes)(F.swiglu(gate_proj, up_proj), *(e.w2.weight for e in self.experts))

        # Combine: weight each expert output, then one scatter-add per token, onto the shared experts' output.
        # plain: y[t] = shared(x[t]) + Σ_{e chosen by t} g[t, e] · expert_e(x[t])
        weights = routing.weights.reshape(-1)[order]  # (A,)
        base = self.shared_experts(tokens) if self.shared_experts is not None else Tensor(xp.zeros_like(tokens.data))
        y = F.index_add(base, token_of, expert_out * weights.unsqueeze(-1))  # (N, dim)

        self._record(routing, dropped)
        return y.reshape(x.shape)

    def _every_expert_on_every_token(self, tokens, routing):
        """Σ_k g_{t,k} · expert_{i(t,k)}(u_t) without host integers, for a few tokens under no_grad (decoding).
        Every expert runs on every token, one batched product per weight matrix, and each token keeps the outputs
        of its K experts. That is E/K times the routed FLOPs, but a decode step is bound by reading the weights,
        which this reads once each (as the grouped path does when all experts are used), and the host never waits
        for the block sizes: a GPU decode step stays free of syncs."""
        xp = get_array_module(tokens.data)
        w1, w3, w2 = (F.stack([getattr(e, name).weight for e in self.experts]) for name in ("w1", "w3", "w2"))
        hidden = F.swiglu(tokens @ F.transpose(w1), tokens @ F.transpose(w3))  # (E, N, I)
        outputs = hidden @ F.transpose(w2)  # (E, N, dim): expert e on token t
        picked = outputs[routing.indices, xp.arange(tokens.shape[0])[:, None]]  # (N, K, dim)
        return (picked * routing.weights.unsqueeze(-1)).sum(axis=1)  # (N, dim)

    def forward_plain(self, x):
        """What `forward` computes (dropless), written as DeepSeek-V3's reference MoE.forward: a loop over the
        experts, each called on the tokens that chose it. One small graph per expert instead of three grouped
        products, and a device->host copy per expert (`len`): a reference to read and test against, not to train.
        Capacity drops are not modelled, so with a capacity_factor it runs in eval mode only."""
        if x.ndim < 2 or x.shape[-1] != self.dim:
            raise ShapeError(f"MoE: expected an input (B, T, dim={self.dim}), got shape {x.shape}")
        if self.training and self.capacity_factor is not None:
            raise ValueError("MoE.forward_plain: the plain loop is dropless, but this layer drops assignments in "
                             f"training (capacity_factor={self.capacity_factor}); call .eval() or use forward")
        xp = get_array_module(x.data)
        routing = self.gate(x)
        tokens = x.reshape(-1, self.dim)  # (N, dim)
        y = self.shared_experts(tokens) if self.shared_experts is not None else Tensor(xp.zeros_like(tokens.data))
        for e, expert in enumerate(self.experts):
            token, choice = xp.nonzero(routing.indices == e)  # the tokens that chose expert e, and in which slot
            if len(token) == 0:
                continue
            weight = routing.weights[token, choice].unsqueeze(-1)  # (n_e, 1)
            y = F.index_add(y, token, expert(tokens[token]) * weight)  # y[token] += g · expert(x[token])
        self._record(routing, xp.zeros((), dtype=routing.counts.dtype))
        return y.reshape(x.shape)

    def _capacity(self, n_tokens):
        if self.capacity_factor is None:
            return None
        return math.ceil(self.capacity_factor * n_tokens * self.n_activated_experts / self.n_routed_experts)

    def _drop_overflow(self, routing, expert_of, capacity, sizes):
        """Keep each expert's `capacity` highest-scoring assignments. Returns the kept assignments grouped by
        expert (best first within each) and the kept count per expert."""
        xp = get_array_module(expert_of)
        score = xp.take_along_axis(routing.scores.data, routing.indices, axis=-1).reshape(-1)  # (N·K,) s of each
        by_score = xp.argsort(-score, kind="stable")
        order = by_score[xp.argsort(expert_of[by_score], kind="stable")]  # by expert, best first in each
        first_of_expert = xp.cumsum(routing.counts) - routing.counts  # (E,)
        rank = xp.arange(order.shape[0]) - first_of_expert[expert_of[order]]  # place within its expert
        kept_sizes = [min(size, capacity) for size in sizes]
        # a stable sort on "dropped?" (0 or 1) moves the dropped to the end and keeps the kept ones in order
        kept = order[xp.argsort(xp.where(rank < capacity, 0, 1), kind="stable")[:sum(kept_sizes)]]
        return kept, kept_sizes

    def _record(self, routing, dropped):
        """Set balance_loss and stats from the last forward (device arrays only)."""
        xp = get_array_module(routing.counts)
        losses = list(routing.losses.values())
        self.balance_loss = sum(losses[1:], losses[0]) if losses else None
        counts = routing.counts
        self.stats = RoutingStats(routing.scores.data, tokens_per_expert=counts,
                                  imbalance=xp.asarray(counts.max() / counts.mean()), dropped=xp.asarray(dropped),
                                  **{name: loss.data for name, loss in routing.losses.items()})

    def update_bias(self):
        """Auxiliary-loss-free balancing: call after each optimizer step (see Gate.update_bias)."""
        self.gate.update_bias()

    def extra_repr(self):
        capacity = "" if self.capacity_factor is None else f", capacity factor {self.capacity_factor}"
        return f"{self.n_routed_experts} routed experts (top-{self.n_activated_experts}), " \
               f"{self.n_shared_experts} shared{capacity}"
