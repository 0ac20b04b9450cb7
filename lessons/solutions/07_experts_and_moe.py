"""Solutions to the exercises of lessons/07_experts_and_moe.ipynb.

Each `# %% exercise: <name>` section replaces the notebook cell tagged `exercise:<name>`. The sections run inside
the notebook, so they use the names its earlier cells define (np, minimoe, Expert, ...). tests/test_lessons.py runs
the notebook with these solutions through the same check cells a student runs.
"""

# %% exercise: split_expert
def split_expert(expert, m):
    # an Expert of width I -> a list of m Experts of width I // m (m divides I) whose outputs sum to expert's
    width = expert.inter_dim // m
    weights = expert.state_dict()  # {"w1.weight": (I, d), "w2.weight": (d, I), "w3.weight": (I, d)}
    pieces = []
    for j in range(m):
        rows = slice(j * width, (j + 1) * width)  # piece j owns hidden units j·I/m ... (j+1)·I/m - 1
        piece = Expert(expert.dim, width)
        piece.load_state_dict({"w1.weight": weights["w1.weight"][rows], "w3.weight": weights["w3.weight"][rows],
                               "w2.weight": weights["w2.weight"][:, rows]})
        pieces.append(piece)
    return pieces


# %% exercise: kept_within_capacity
def kept_within_capacity(scores, indices, capacity):
    # scores (N, E) unbiased scores and indices (N, K) chosen experts, backend arrays; capacity: a host int.
    # Returns an (N, K) boolean backend array: True where the assignment is among its expert's `capacity` best.
    xp = minimoe.get_array_module(indices)
    expert_of = indices.reshape(-1)  # (N·K,)
    score = xp.take_along_axis(scores, indices, axis=-1).reshape(-1)  # (N·K,) the score of each assignment
    by_score = xp.argsort(-score, kind="stable")  # best first
    order = by_score[xp.argsort(expert_of[by_score], kind="stable")]  # grouped by expert, best first in each
    counts = xp.bincount(expert_of, minlength=scores.shape[-1])  # (E,)
    first_of_expert = xp.cumsum(counts) - counts  # (E,) where each expert's group starts in `order`
    rank = xp.empty_like(order)
    rank[order] = xp.arange(order.shape[0]) - first_of_expert[expert_of[order]]  # place within its expert
    return (rank < capacity).reshape(indices.shape)
