"""Solutions to the exercises of lessons/05_transformer_lm.ipynb.

Each `# %% exercise: <name>` section replaces the notebook cell tagged `exercise:<name>`. The sections run inside
the notebook, so they use the names its earlier cells define (np, minimoe, F, ...). tests/test_lessons.py runs
the notebook with these solutions through the same check cells a student runs.
"""

# %% exercise: completion_loss
def completion_loss(logits, ids, completion_mask):
    """logits: Tensor (N, T-1, V) predicting ids[:, 1:]; ids: host (N, T) ints; completion_mask: host (N, T) bool.
    Returns a 0-d Tensor: the mean of -log p(target) over the targets that are completion tokens."""
    targets = ids[:, 1:]  # (N, T-1): position t predicts token t + 1 ...
    counted = completion_mask[:, 1:]  # ... so the mask of the *target* decides, shifted the same way
    log_p = F.log_softmax(logits)  # (N, T-1, V)
    picked = F.take_along_axis(log_p, targets[..., None], axis=-1)[..., 0]  # (N, T-1)
    weights = minimoe.tensor(counted.astype(logits.dtype))
    return -(picked * weights).sum() / counted.sum()


# %% exercise: nucleus_filter
def nucleus_filter(logits, top_p):
    """logits: host float array (B, V); 0 < top_p <= 1. Returns a copy with the logits outside each row's
    nucleus set to -inf."""
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probabilities = shifted / shifted.sum(axis=-1, keepdims=True)  # (B, V)
    order = np.argsort(-probabilities, axis=-1)  # most likely first
    sorted_p = np.take_along_axis(probabilities, order, axis=-1)
    mass_before = np.cumsum(sorted_p, axis=-1) - sorted_p  # probability of the tokens ranked above
    keep_sorted = mass_before < top_p  # a token stays while the nucleus has not yet reached p
    keep = np.zeros_like(keep_sorted)
    np.put_along_axis(keep, order, keep_sorted, axis=-1)
    return np.where(keep, logits, -np.inf)


# %% exercise: greedy_without_cache
def greedy_without_cache(model, prompt_ids, max_new_tokens, eos_id, pad_id):
    """prompt_ids: host int array (B, P). Returns a host int array (B, P + max_new_tokens): the prompts, then the
    greedy tokens, with pad_id after each sequence's first eos_id."""
    model.eval()
    tokens = prompt_ids
    finished = np.zeros(len(prompt_ids), dtype=bool)
    for _ in range(max_new_tokens):
        logits = model(tokens).numpy()[:, -1]  # (B, V): the whole prefix, every step
        next_ids = np.where(finished, pad_id, logits.argmax(axis=-1))
        finished |= next_ids == eos_id
        tokens = np.concatenate([tokens, next_ids[:, None]], axis=1)
    return tokens
