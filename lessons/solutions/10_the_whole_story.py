"""Solutions to the exercises of lessons/10_the_whole_story.ipynb.

Each `# %% exercise: <name>` section replaces the notebook cell tagged `exercise:<name>`. The sections run inside
the notebook, so they use the names its earlier cells define (np, score_responses, parse_answer, ...).
tests/test_lessons.py runs the notebook with these solutions through the same check cells a student runs.
"""

# %% exercise: length_penalised_rewards
def length_penalised_rewards(task, responses, max_length=32, cache=8):
    """Host float array (B,): the rule reward of each response (task.reward(problem, text).total, as
    score_responses gives it) plus the soft overlong penalty of its length, responses.lengths (tokens, EOS
    included), with L_max = max_length and L_cache = cache."""
    lengths = np.asarray(responses.lengths, dtype=float)  # (B,)
    penalty = np.clip((max_length - cache - lengths) / cache, -1.0, 0.0)  # 0, then linear down to -1, then -1
    return score_responses(task, responses)["reward"] + penalty


# %% exercise: majority_vote_accuracy
def majority_vote_accuracy(responses, n_per_problem):
    """cons@n, a host float: the share of problems whose most common answer is right.

    responses: n_per_problem consecutive rows per problem, as sample_responses returns them. A response's answer is
    parse_answer(text) with surrounding spaces stripped; responses without an answer (None) do not vote; the most
    common answer wins, a tie going to the answer that appeared first; it is right if it equals
    problem.reference. A problem with no answer at all counts as wrong."""
    right = []
    for start in range(0, len(responses.texts), n_per_problem):
        answers = [parse_answer(text) for text in responses.texts[start:start + n_per_problem]]
        votes = {}  # answer -> count, in order of first appearance
        for answer in answers:
            if answer is not None:
                votes[answer.strip(" ")] = votes.get(answer.strip(" "), 0) + 1
        winner = max(votes, key=votes.get) if votes else None  # max keeps the first of equal counts
        right.append(winner == responses.problems[start].reference)
    return float(np.mean(right))
