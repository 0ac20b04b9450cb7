"""Sampling answers to problems, and measuring them: greedy accuracy, pass@1 and pass@k, response length and
how often the model thinks before answering.

pass@k is the chance that at least one of k sampled answers is right. From n ≥ k samples per problem with c
correct, the unbiased estimate is 1 - C(n-c, k) / C(n, k) (minimoe.metrics.pass_at_k); pass@1 is then simply
c / n, the accuracy of one answer sampled at temperature T — the number DeepSeek-R1 reports.
"""

from dataclasses import dataclass

from .autograd import no_grad
from .backend import get_backend, numpy
from .generate import generate
from .metrics import pass_at_k
from .rewards import is_truncated, thinks_first
from .tasks import Tokenizer

__all__ = ["Responses", "sample_responses", "evaluate", "score_responses"]


@dataclass
class Responses:
    """Sampled responses to a list of problems, each problem repeated n_per_problem times (rows are grouped:
    problem 0's samples first).

    problems        -- the Problem of each row
    texts           -- decoded response texts (host), "<eos>" included where the model stopped
    lengths         -- (B,) host int array: response tokens up to and including EOS
    tokens          -- (B, L) backend array: prompt, response, then PAD (every row padded to the same L)
    response_mask   -- (B, L-1) backend bool array: positions t whose *next* token t+1 is a response token
                       up to and including EOS (the tokens a policy-gradient loss is about)
    """

    problems: list
    texts: list
    lengths: object
    tokens: object
    response_mask: object


def _by_prompt_length(prompt_ids):
    """Indices of the prompts grouped by length: generate() batches prompts of equal length."""
    groups = {}
    for i, ids in enumerate(prompt_ids):
        groups.setdefault(len(ids), []).append(i)
    return groups


@no_grad()
def sample_responses(model, problems, tokenizer=None, n_per_problem=1, max_new_tokens=40, temperature=1.0,
                     top_k=None, top_p=None, greedy=False, generator=None, speculative=False):
    """Generate `n_per_problem` responses to every problem in one batched pass per prompt length
    (speculative=True: drafted by the model's MTP modules, see minimoe/speculative.py)."""
    tokenizer = tokenizer or Tokenizer()
    backend = get_backend()
    xp = backend.xp
    rows = [p for p in problems for _ in range(n_per_problem)]
    prompt_ids = [tokenizer.encode("<bos>" + p.prompt) for p in rows]
    longest_prompt = max(len(ids) for ids in prompt_ids)
    width = longest_prompt + max_new_tokens
    tokens = xp.full((len(rows), width), tokenizer.pad_id, dtype="int64")
    response_mask = xp.zeros((len(rows), width - 1), dtype=bool)
    lengths = numpy.zeros(len(rows), dtype=numpy.int64)
    texts = [None] * len(rows)
    for prompt_length, indices in _by_prompt_length(prompt_ids).items():
        batch = backend.asarray(numpy.array([prompt_ids[i] for i in indices]))
        out = generate(model, batch, max_new_tokens, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
                       temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy, generator=generator,
                       speculative=speculative)
        index = backend.asarray(numpy.array(indices))
        tokens[index, :prompt_length + max_new_tokens] = out.tokens
        positions = xp.arange(width - 1)  # the position that predicts token t + 1
        response_mask[index] = (positions >= prompt_length - 1) & (positions < prompt_length - 1 + out.lengths[:, None])
        host_lengths = backend.to_numpy(out.lengths)
        host_responses = backend.to_numpy(out.responses)
        lengths[indices] = host_lengths
        for row, response, length in zip(indices, host_responses, host_lengths):
            texts[row] = tokenizer.decode(response[:length].tolist())
    return Responses(rows, texts, lengths, tokens, response_mask)


def score_responses(task, responses, accuracy_weight=1.0, format_weight=0.1):
    """Per-response rewards (host float arrays): {"reward", "accuracy", "format", "thinks", "truncated"}."""
    scored = [task.reward(p, text, accuracy_weight, format_weight) for p, text in zip(responses.problems,
                                                                                        responses.texts)]
    return {"reward": numpy.array([s.total for s in scored]),
            "accuracy": numpy.array([s.accuracy for s in scored]),
            "format": numpy.array([s.format for s in scored]),
            "thinks": numpy.array([thinks_first(t) for t in responses.texts], dtype=float),
            "truncated": numpy.array([is_truncated(t) for t in responses.texts], dtype=float)}


def evaluate(model, task, tokenizer=None, n_problems=200, n_samples=16, k=8, temperature=1.0, max_new_tokens=40,
             split="test", seed=1234, generator=None):
    """Held-out metrics before/after training:
    accuracy (greedy), pass_at_1 and pass_at_k (from n_samples ≥ k samples per problem at `temperature`),
    mean_length (sampled response tokens incl. EOS), thinking_share and format_rate (of sampled responses),
    truncated_share, and the greedy response's mean length and thinking share. Same seed, same problems."""
    if not 1 <= k <= n_samples:
        raise ValueError(f"evaluate: need 1 ≤ k ≤ n_samples, got k={k}, n_samples={n_samples}")
    tokenizer = tokenizer or Tokenizer()
    problems = task.sample(numpy.random.default_rng(seed), n_problems, split=split)
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
