"""Solutions to the exercises of lessons/03_layers_and_training.ipynb.

Each `# %% exercise: <name>` section replaces the notebook cell tagged `exercise:<name>`. The sections run inside
the notebook, so they use the names its earlier cells define (np, minimoe, F, ...). tests/test_lessons.py runs
the notebook with these solutions through the same check cells a student runs.
"""

# %% exercise: adamw_step
def adamw_step(theta, grad, m, v, t, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01):
    """One AdamW update of the NumPy arrays theta, m, v from grad, at step t (1, 2, ...)."""
    beta1, beta2 = betas
    theta = theta * (1 - lr * weight_decay)  # decoupled decay: not part of the gradient
    m = beta1 * m + (1 - beta1) * grad
    v = beta2 * v + (1 - beta2) * grad ** 2
    m_hat, v_hat = m / (1 - beta1 ** t), v / (1 - beta2 ** t)
    return theta - lr * m_hat / (np.sqrt(v_hat) + eps), m, v


# %% exercise: embedding_by_onehot
def embedding_by_onehot(ids, weight):
    """(N,) integer ids (a NumPy array), (V, C) weight tensor -> (N, C): onehot(ids) @ weight."""
    onehot = minimoe.tensor(np.eye(weight.shape[0])[ids], dtype=weight.dtype)  # (N, V)
    return onehot @ weight
