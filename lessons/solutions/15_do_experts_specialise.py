"""Solutions to the exercises of lessons/15_do_experts_specialise.ipynb.

Each `# %% exercise: <name>` section replaces the notebook cell tagged `exercise:<name>`. The sections run inside
the notebook, so they use the names its earlier cells define (np, analysis, model, ids, ...). tests/test_lessons.py
runs the notebook with these solutions through the same check cells a student runs.
"""

# %% exercise: uncertainty_by_hand
def uncertainty_by_hand(counts):
    # counts: (C, E) NumPy array of non-negative counts -> float, I(C;E) / H(C) in [0, 1]
    p = counts / counts.sum()  # (C, E) joint p(c, e)
    p_c, p_e = p.sum(axis=1), p.sum(axis=0)  # (C,), (E,) marginals
    cells = p > 0  # 0 log 0 = 0: the empty cells add nothing
    mutual = (p[cells] * np.log2(p[cells] / np.outer(p_c, p_e)[cells])).sum()
    h_c = -(p_c[p_c > 0] * np.log2(p_c[p_c > 0])).sum()
    return mutual / h_c if h_c > 0 else 0.0


# %% exercise: answer_tag_expert
def answer_tag_expert(layer):
    # -> (expert index, (E,) array of mean loss increases at positions whose input token is <answer>)
    at_tag = (categories["token"].labels[:, :-1] == analysis.TOKEN_KINDS.index("<answer>")) & completion
    increases = np.zeros(E)
    for expert in range(E):
        with analysis.experts_disabled(model, {layer: [expert]}):
            increases[expert] = (analysis.token_losses(model, ids) - base_loss)[at_tag].mean()
    return int(np.argmax(increases)), increases
