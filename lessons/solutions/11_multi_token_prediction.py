"""Solutions to the exercises of lessons/11_multi_token_prediction.ipynb.

Each `# %% exercise: <name>` section replaces the notebook cell tagged `exercise:<name>`. The sections run inside
the notebook, so they use the names its earlier cells define (np, minimoe, ...).
tests/test_lessons.py runs the notebook with these solutions through the same check cells a student runs.
"""

# %% exercise: accepted_drafts
def accepted_drafts(keep):
    """keep (B, D) booleans (draft j of sequence b agrees with the main model) -> (B,) integers: how many drafts
    each sequence keeps, i.e. the length of its leading run of True. Vectorised; NumPy or CuPy arrays."""
    xp = minimoe.get_array_module(keep)
    return xp.cumprod(keep.astype("int64"), axis=1).sum(axis=1)  # 1 until the first False, 0 after


# %% exercise: speculative_distribution
def speculative_distribution(p, q):
    """p, q (V,) the main model's and the draft's distributions. The exact distribution (V,) of the token emitted at
    a drafted position: x ~ q kept with probability min(1, p(x)/q(x)), else a draw from norm(max(0, p − q))."""
    kept = np.minimum(p, q)  # q(x) · min(1, p(x)/q(x)), also right where q(x) = 0
    residual = np.maximum(p - q, 0)
    refused = 1 - kept.sum()  # the chance that the draft is refused
    return kept + (refused * residual / residual.sum() if residual.sum() > 0 else 0)


# %% exercise: expected_tokens_per_step
def expected_tokens_per_step(alpha, depth):
    """Tokens one speculative step yields on average when each of `depth` drafts is kept with probability alpha,
    independently, until the first refusal (plus the main model's own token)."""
    return sum(alpha ** j for j in range(depth + 1))  # 1 + α + … + α^D: draft j is kept with probability α^j
