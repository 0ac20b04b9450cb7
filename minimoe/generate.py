"""Sampling text from the model: batched, with temperature, top-k and top-p, and a key/value cache; and
`sample_responses`, which answers a list of problems n times each (the rollouts of RL, the samples of evaluation).

Generation is a loop over positions, not over sequences: every step feeds the newest token of all B sequences
at once. With the cache each step costs one token's worth of compute — the prefix's keys and values are kept,
never recomputed. A sequence that has emitted EOS keeps stepping along with the others, but its later tokens
are replaced by PAD and not counted.
"""

from dataclasses import dataclass

import numpy as np

from .autograd import Tensor, no_grad
from .backend import backend_of, device_rng, get_array_module, get_backend
from .functional import shifted_exp
from .tasks import Tokenizer
from .validation import Checks, is_real

__all__ = ["Generation", "generate", "sample_next", "filter_logits", "check_sampling", "Responses",
           "sample_responses"]


@dataclass
class Generation:
    """What `generate` returns (all backend arrays).

    tokens    -- (B, P + N) prompt followed by the generated tokens, PAD after each sequence's EOS
    responses -- (B, N) the generated part alone
    lengths   -- (B,) generated tokens up to and including EOS (N for sequences that never stopped)
    finished  -- (B,) True where the sequence emitted EOS
    """

    tokens: object
    responses: object
    lengths: object
    finished: object


def filter_logits(logits, top_k=None, top_p=None):
    """Keep the top_k largest logits and/or the smallest set of tokens whose probability reaches top_p
    (nucleus); everything else becomes -inf. logits: (B, V)."""
    xp = get_array_module(logits)
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k must be ≥ 1, got {top_k}")
        if top_k < logits.shape[-1]:
            kth_largest = xp.partition(logits, -top_k, axis=-1)[:, -top_k:].min(axis=-1, keepdims=True)
            logits = xp.where(logits < kth_largest, -xp.inf, logits)
    if top_p is not None:
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        probabilities = _softmax(logits)
        descending = -xp.sort(-probabilities, axis=-1)  # (B, V), largest first
        mass_before = xp.cumsum(descending, axis=-1) - descending
        keep_count = (mass_before < top_p).sum(axis=-1, keepdims=True)  # ≥ 1: the top token always stays
        smallest_kept = xp.take_along_axis(descending, keep_count - 1, axis=-1)
        logits = xp.where(probabilities < smallest_kept, -xp.inf, logits)
    return logits


def _softmax(logits):
    e, total, _ = shifted_exp(logits)
    return e / total


def check_sampling(who, temperature=1.0, top_k=None, top_p=None, greedy=False, max_new_tokens=0):
    """Refuse sampling settings that cannot work (a NaN or negative temperature, top_k < 1, top_p outside
    (0, 1], a negative or fractional max_new_tokens) before any token is drawn."""
    check = Checks(who, {"temperature": temperature, "top_k": top_k, "top_p": top_p, "greedy": greedy,
                         "max_new_tokens": max_new_tokens})
    if check.flag("greedy") and not greedy and not (is_real(temperature) and temperature > 0):
        check.fail("temperature", f"temperature={temperature!r} must be a finite number > 0 (use greedy=True for "
                                  "argmax)")
    check.integer("top_k", minimum=1, optional=True)
    check.real("top_p", above=0, maximum=1, optional=True)
    check.integer("max_new_tokens", minimum=0)
    check.done()


def sample_next(logits, temperature=1.0, top_k=None, top_p=None, greedy=False, generator=None):
    """One token id per row of logits (B, V): argmax when greedy, else a draw from softmax(logits / T)
    restricted by top_k / top_p (inverse-CDF sampling with one uniform number per row)."""
    check_sampling("sample_next", temperature, top_k, top_p, greedy)
    xp = get_array_module(logits)
    if greedy:
        return logits.argmax(axis=-1)
    probabilities = _softmax(filter_logits(logits / temperature, top_k, top_p))
    cdf = xp.cumsum(probabilities, axis=-1)  # (B, V)
    generator = generator or device_rng(backend_of(logits))
    u = generator.random((logits.shape[0], 1), dtype=cdf.dtype) * cdf[:, -1:]
    return xp.minimum((cdf < u).sum(axis=-1), logits.shape[-1] - 1)


def prompt_shape(model, prompt_ids, max_new_tokens):
    """(prompt ids as an array, B, P, P + max_new_tokens), refusing a total longer than the model's context."""
    prompt_ids = prompt_ids.data if isinstance(prompt_ids, Tensor) else prompt_ids
    batch, prompt_length = prompt_ids.shape
    total = prompt_length + max_new_tokens
    if total > model.config.max_seq_len:
        raise ValueError(f"generate: prompt of {prompt_length} tokens + {max_new_tokens} new tokens exceeds the "
                         f"model's max_seq_len={model.config.max_seq_len}")
    return prompt_ids, batch, prompt_length, total


@no_grad()
def generate(model, prompt_ids, max_new_tokens, eos_id, pad_id, temperature=1.0, top_k=None, top_p=None,
             greedy=False, use_cache=True, generator=None, speculative=False):
    """Continue each prompt of `prompt_ids` (B, P) — integer backend array, all prompts the same length — by up
    to `max_new_tokens` tokens. Runs in eval mode (no dropout, deterministic routing) and restores the mode.
    speculative=True drafts with the model's multi-token prediction modules and verifies the drafts in one pass
    (minimoe/speculative.py): the same output distribution, fewer passes of the main model.

    Stopping early when every sequence has finished costs one boolean read from the device per step."""
    check_sampling("generate", temperature, top_k, top_p, greedy, max_new_tokens)
    if speculative:
        from .speculative import speculative_generate  # it builds on this module

        return speculative_generate(model, prompt_ids, max_new_tokens, eos_id, pad_id, temperature, top_k, top_p,
                                    greedy, generator)
    prompt_ids, batch, prompt_length, total = prompt_shape(model, prompt_ids, max_new_tokens)
    xp = get_array_module(prompt_ids)
    was_training = model.training
    model.eval()
    tokens = xp.full((batch, total), pad_id, dtype=prompt_ids.dtype)
    tokens[:, :prompt_length] = prompt_ids
    finished = xp.zeros(batch, dtype=bool)
    lengths = xp.full(batch, max_new_tokens, dtype=prompt_ids.dtype)
    caches = model.new_caches(batch, total) if use_cache else None
    logits = model(prompt_ids, start_pos=0, caches=caches).data[:, -1]  # (B, V) prefill
    position = prompt_length
    for step in range(max_new_tokens):
        next_ids = sample_next(logits, temperature, top_k, top_p, greedy, generator)
        next_ids = xp.where(finished, pad_id, next_ids)
        tokens[:, position] = next_ids
        just_finished = (next_ids == eos_id) & ~finished
        lengths = xp.where(just_finished, step + 1, lengths)
        finished = finished | just_finished
        position += 1
        if step == max_new_tokens - 1 or bool(finished.all()):
            break
        if use_cache:
            logits = model(tokens[:, position - 1:position], start_pos=position - 1, caches=caches).data[:, -1]
        else:
            logits = model(tokens[:, :position]).data[:, -1]
    model.train(was_training)
    return Generation(tokens, tokens[:, prompt_length:], lengths, finished)


# ==============================================================================================================
# answering problems
# ==============================================================================================================

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
    lengths = np.zeros(len(rows), dtype=np.int64)
    texts = [None] * len(rows)
    for prompt_length, indices in _by_prompt_length(prompt_ids).items():
        batch = backend.asarray(np.array([prompt_ids[i] for i in indices]))
        out = generate(model, batch, max_new_tokens, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
                       temperature=temperature, top_k=top_k, top_p=top_p, greedy=greedy, generator=generator,
                       speculative=speculative)
        index = backend.asarray(np.array(indices))
        tokens[index, :prompt_length + max_new_tokens] = out.tokens
        positions = xp.arange(width - 1)  # the position that predicts token t + 1
        response_mask[index] = (positions >= prompt_length - 1) & (positions < prompt_length - 1 + out.lengths[:, None])
        host_lengths = backend.to_numpy(out.lengths)
        host_responses = backend.to_numpy(out.responses)
        lengths[indices] = host_lengths
        for row, response, length in zip(indices, host_responses, host_lengths):
            texts[row] = tokenizer.decode(response[:length].tolist())
    return Responses(rows, texts, lengths, tokens, response_mask)
