"""Measuring sampled answers to problems: greedy accuracy, pass@1 and pass@k, response length and how often the
model thinks before answering. (The answers are sampled by minimoe.generate.sample_responses.)

pass@k is the chance that at least one of k sampled answers is right. From n ≥ k samples per problem with c
correct, the unbiased estimate is 1 - C(n-c, k) / C(n, k) (minimoe.metrics.pass_at_k); pass@1 is then simply
c / n, the accuracy of one answer sampled at temperature T — the number DeepSeek-R1 reports.
"""

import numpy as np

from .generate import sample_responses
from .metrics import pass_at_k
from .rewards import is_truncated, thinks_first
from .tasks import Tokenizer
from .validation import Checks

__all__ = ["evaluate", "score_responses", "check_evaluation"]


def score_responses(task, responses, accuracy_weight=1.0, format_weight=0.1):
    """Per-response rewards (host float arrays): {"reward", "accuracy", "format", "thinks", "truncated"}."""
    scored = [task.reward(p, text, accuracy_weight, format_weight) for p, text in zip(responses.problems,
                                                                                        responses.texts)]
    return {"reward": np.array([s.total for s in scored]),
            "accuracy": np.array([s.accuracy for s in scored]),
            "format": np.array([s.format for s in scored]),
            "thinks": np.array([thinks_first(t) for t in responses.texts], dtype=float),
            "truncated": np.array([is_truncated(t) for t in responses.texts], dtype=float)}


def check_evaluation(who="evaluate", n_problems=200, n_samples=16, k=8, temperature=1.0, max_new_tokens=40):
    """Refuse evaluation settings that cannot work, before any sampling (the CLI calls it before training)."""
    check = Checks(who, {"n_problems": n_problems, "n_samples": n_samples, "k": k, "temperature": temperature,
                         "max_new_tokens": max_new_tokens})
    for name in ("n_problems", "n_samples", "max_new_tokens"):
        check.integer(name, minimum=1)
    if check.integer("k", minimum=1) and check.ok("n_samples") and k > n_samples:
        check.fail("k", f"k={k} must be ≤ n_samples={n_samples} (pass@k picks k of the n samples)")
    check.real("temperature", above=0)
    check.done()


def evaluate(model, task, tokenizer=None, n_problems=200, n_samples=16, k=8, temperature=1.0, max_new_tokens=40,
             split="test", seed=1234, generator=None):
    """Held-out metrics before/after training:
    accuracy (greedy), pass_at_1 and pass_at_k (from n_samples ≥ k samples per problem at `temperature`),
    mean_length (sampled response tokens incl. EOS), thinking_share and format_rate (of sampled responses),
    truncated_share, and the greedy response's mean length and thinking share. Same seed, same problems."""
    check_evaluation("evaluate", n_problems, n_samples, k, temperature, max_new_tokens)
    tokenizer = tokenizer or Tokenizer()
    problems = task.sample(np.random.default_rng(seed), n_problems, split=split)
    greedy = sample_responses(model, problems, tokenizer, 1, max_new_tokens, greedy=True)
    greedy_scores = score_responses(task, greedy)
    sampled = sample_responses(model, problems, tokenizer, n_samples, max_new_tokens, temperature=temperature,
                               generator=generator)
    scores = score_responses(task, sampled)
    correct = scores["accuracy"].reshape(n_problems, n_samples).sum(axis=1).astype(int)
    return {"accuracy": float(greedy_scores["accuracy"].mean()),
            "pass_at_1": float(correct.mean() / n_samples),
            "pass_at_k": float(pass_at_k(n_samples, correct, k).mean()),
            "k": k, "n_samples": n_samples,
            "mean_length": float(sampled.lengths.mean()),
            "thinking_share": float(scores["thinks"].mean()),
            "format_rate": float(scores["format"].mean()),
            "truncated_share": float(scores["truncated"].mean()),
            "greedy_mean_length": float(greedy.lengths.mean()),
            "greedy_thinking_share": float(greedy_scores["thinks"].mean()),
            "n_problems": n_problems, "temperature": temperature, "split": split}
