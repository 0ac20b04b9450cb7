"""Solutions to the exercises of lessons/06_gating.ipynb.

Each `# %% exercise: <name>` section replaces the notebook cell tagged `exercise:<name>`. The sections run inside
the notebook, so they use the names its earlier cells define (np, minimoe, ...). tests/test_lessons.py runs the
notebook with these solutions through the same check cells a student runs.
"""

# %% exercise: seq_aux_loss
def seq_aux_loss(scores, indices, n_sequences, k, alpha):
    # scores: (S·T, E) Tensor of unbiased scores (softmax or sigmoid), sequences one after another;
    # indices: (S·T, K) backend integer array of the chosen experts. Returns a 0-d Tensor.
    xp = minimoe.get_array_module(indices)
    n_experts = scores.shape[-1]
    seq_len = scores.shape[0] // n_sequences
    p = scores / scores.sum(axis=-1, keepdims=True)  # (S·T, E): each token's scores sum to 1
    P = p.reshape(n_sequences, seq_len, n_experts).mean(axis=1)  # (S, E)
    slots = (indices.reshape(n_sequences, -1)[:, :, None] == xp.arange(n_experts)).sum(axis=1)  # (S, E) counts
    f = (slots * (n_experts / (k * seq_len))).astype(P.dtype)  # (S, E), a constant: no gradient
    return alpha * (f * P).sum(axis=-1).mean()


# %% exercise: aux_loss_weight_grad
def aux_loss_weight_grad(x, weight, indices, k, alpha):
    # d(aux loss)/d weight for a softmax gate: x (T, d), weight (E, d), indices (T, K), all NumPy -> (E, d)
    tokens, n_experts = x.shape[0], weight.shape[0]
    logits = x @ weight.T  # (T, E)
    p = np.exp(logits - logits.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)  # (T, E)
    f = np.bincount(indices.reshape(-1), minlength=n_experts) / (tokens * k)  # (E,)
    dp = np.broadcast_to(alpha * n_experts * f / tokens, p.shape)  # (T, E): dL/dp_{t,i} = αE f_i / T
    dlogits = p * (dp - (dp * p).sum(axis=-1, keepdims=True))  # through the softmax: ∝ p_{t,j} (f_j - Σ_i f_i p_{t,i})
    return dlogits.T @ x  # (E, d): through the logits x Wᵀ
