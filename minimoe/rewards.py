"""Rule-based rewards for reasoning, the DeepSeek-R1-Zero way.

Reinforcement learning needs a number for every answer the model writes. One way to get it is a *reward
model*: a second network trained to score answers. DeepSeek-R1-Zero deliberately did not use one for its
reasoning tasks. A reward model has blind spots, and a policy optimised hard against it finds them (reward
hacking: answers the scorer likes that are not right). R1-Zero used *rules* instead, short programs that check a
response the way a teacher marks homework:

    accuracy  1.0 if the final answer is right, else 0.0        (for us: the text inside <answer>…</answer>)
    format    1.0 if the reasoning is in <think>…</think> and the answer follows in <answer>…</answer>

    reward = accuracy_weight · accuracy + format_weight · format      (weights 1.0 and 0.1 by default)

A rule cannot be flattered, costs nothing to run and never drifts. The price is that it only exists for tasks
whose answers can be checked mechanically (arithmetic, puzzles, code with tests): *verifiable* tasks.

What the functions here read: the response, decoded to text. That is everything the policy wrote after the
prompt, for example

    "<think>7+9=16 4+8+1=13 3+5+1=9</think><answer>936</answer><eos>"

The rules, decided once for every function in this file:

- Everything after the first <eos> is ignored. The policy-gradient loss masks those tokens too (GRPO's objective
  sums over the tokens of each output oᵢ, t = 1..|oᵢ|: DeepSeekMath, arXiv 2402.03300, eq. 3), so the reward
  judges exactly the tokens the loss trains on.
- A response with no <eos> was cut off by the token budget (`is_truncated`). Its answer still counts if the
  answer block closed before the cut, but it earns no format credit: a well-formed response ends.
- The answer is compared as text, never converted with int(): "0936", "+936" and "９３６" (full-width digits,
  which int() would happily accept) are all wrong. Only surrounding ASCII spaces are forgiven, because the
  vocabulary contains a space the model may emit. Comparing strings also means a thousand-digit answer costs
  nothing and cannot overflow.
- Exactly one <answer>…</answer> block, or the answer is None. Two answers ("<answer>1</answer><answer>936
  </answer>") would let the policy hedge its bets.
- A direct answer with no think block earns *no* format credit. R1's format reward asks for the reasoning in
  think tags; that small extra reward is one of the two pushes towards thinking (the bigger one: thinking
  makes the answer right more often, and accuracy pays ten times as much).
- An empty or all-space think or answer block earns no format credit either: "<think></think>" would be the
  cheapest way to collect the format bonus without thinking.

Malformed text never raises; it scores 0.0. Passing something that is not a string is a bug in the caller and
raises TypeError.
"""

import re
from typing import NamedTuple

__all__ = ["PAD", "BOS", "EOS", "THINK", "THINK_END", "ANSWER", "ANSWER_END", "SPECIAL_TOKENS", "Reward",
           "parse_answer", "accuracy_reward", "format_reward", "combined_reward", "thinks_first", "is_truncated",
           "parse_addition_steps", "addition_consistency"]

# The special tokens of the text protocol. The tokenizer (minimoe.tasks.Tokenizer) gives each one a single id.
PAD, BOS, EOS = "<pad>", "<bos>", "<eos>"
THINK, THINK_END, ANSWER, ANSWER_END = "<think>", "</think>", "<answer>", "</answer>"
SPECIAL_TOKENS = (PAD, BOS, EOS, THINK, THINK_END, ANSWER, ANSWER_END)

_WELL_FORMED = re.compile("{}(.*){}{}(.*){}".format(*map(re.escape, (THINK, THINK_END, ANSWER, ANSWER_END))),
                          re.DOTALL)


class Reward(NamedTuple):
    """The total reward of one response and the two rule scores it is made of."""

    total: float
    accuracy: float
    format: float


def _check_text(text, name):
    if not isinstance(text, str):
        raise TypeError(f"{name}: the response must be a str (decoded text), got {type(text).__name__}")


def _before_eos(text):
    """The part of the response the policy actually wrote: everything before the first <eos>."""
    return text.split(EOS, 1)[0]


def parse_answer(text):
    """The text between <answer> and </answer>, or None unless there is exactly one such block (one opening
    tag, one closing tag, in that order) before the first <eos>. The content is returned as written."""
    _check_text(text, "parse_answer")
    text = _before_eos(text)
    if text.count(ANSWER) != 1 or text.count(ANSWER_END) != 1:
        return None
    start, end = text.index(ANSWER) + len(ANSWER), text.index(ANSWER_END)
    return text[start:end] if start <= end else None


def accuracy_reward(text, reference):
    """1.0 if the parsed answer is right, 0.0 otherwise (including no parsable answer).

    `reference` is either the correct answer as a string, compared exactly after stripping ASCII spaces from
    both ends, or a verifier: a function answer_text -> bool, for tasks with many right answers (a Countdown
    expression can be written several ways)."""
    answer = parse_answer(text)
    if answer is None:
        return 0.0
    if callable(reference):
        return 1.0 if reference(answer) else 0.0
    if not isinstance(reference, str):
        raise TypeError(f"accuracy_reward: reference must be a str or a function answer -> bool, "
                        f"got {type(reference).__name__}")
    return 1.0 if answer.strip(" ") == reference.strip(" ") else 0.0


def format_reward(text):
    """1.0 iff the response is exactly <think>T</think><answer>A</answer><eos> (anything after the <eos> is
    ignored), with T and A not blank and free of special tokens; 0.0 otherwise. No think block, no credit."""
    _check_text(text, "format_reward")
    if is_truncated(text):
        return 0.0
    match = _WELL_FORMED.fullmatch(_before_eos(text))
    if match is None:
        return 0.0
    for part in match.groups():
        if not part.strip() or any(token in part for token in SPECIAL_TOKENS):
            return 0.0
    return 1.0


def combined_reward(text, reference, accuracy_weight=1.0, format_weight=0.1):
    """Reward(total, accuracy, format) with total = accuracy_weight·accuracy + format_weight·format."""
    accuracy, form = accuracy_reward(text, reference), format_reward(text)
    return Reward(accuracy_weight * accuracy + format_weight * form, accuracy, form)


def thinks_first(text):
    """True if the response opens with <think>: the model chose to reason before answering."""
    _check_text(text, "thinks_first")
    return _before_eos(text).startswith(THINK)


def is_truncated(text):
    """True if the response has no <eos>: generation stopped at the token budget, not by choice."""
    _check_text(text, "is_truncated")
    return EOS not in text


# ---------------------------------------------------------------------------------------------------------
# Reasoning that agrees with its answer (addition): the filter of rejection sampling (minimoe.distill)

_COLUMN = re.compile(r"([0-9])\+([0-9])(\+1)?=(0|[1-9][0-9]*)")


def parse_addition_steps(text):
    """The column steps of an addition response's think block, units column first: a list of
    (x, y, carry_in, written_sum) ints, e.g. "<think>7+9=16 4+8+1=13</think>…" -> [(7, 9, 0, 16), (4, 8, 1, 13)].
    None unless the response is well-formed (format_reward) and its think block is exactly columns "x+y=s" or
    "x+y+1=s" separated by single spaces (one digit each for x and y, s without a leading zero)."""
    if format_reward(text) != 1.0:
        return None
    think = _WELL_FORMED.fullmatch(_before_eos(text)).group(1)
    steps = []
    for piece in think.split(" "):
        match = _COLUMN.fullmatch(piece)
        if match is None:
            return None
        x, y, carry, total = match.groups()
        steps.append((int(x), int(y), int(carry is not None), int(total)))
    return steps


def addition_consistency(text, operands):
    """1.0 if the response's reasoning is right and its answer is what the reasoning gives, else 0.0:

    - the think block is one column step per digit, units first, and column j adds digit j of each operand
      (the columns of *this* problem, a shorter operand read with leading zeros);
    - every step's arithmetic is right: written_sum = x + y + carry_in, and the carry into column j is 1
      exactly when the sum written in column j-1 is ≥ 10 (none into the units column);
    - the answer (spaces around it forgiven, as in accuracy_reward) is the number the written steps give: the
      last column's sum, then the units digits of the others, left to right.

    A direct answer has no reasoning to agree with and scores 0.0, as does anything malformed. Together the
    three rules imply a right answer; the converse fails: "<think>7+9=16 4+8=12 3+5+1=9</think><answer>936
    </answer>" is right by luck (a dropped carry, then a wrong answer written down anyway) and scores 0.0."""
    _check_text(text, "addition_consistency")
    steps = parse_addition_steps(text)
    if steps is None:
        return 0.0
    a, b = (str(int(x))[::-1] for x in operands)  # digits, units first
    width = max(len(a), len(b))
    a, b = a.ljust(width, "0"), b.ljust(width, "0")
    if len(steps) != width:
        return 0.0
    carry = 0
    for (x, y, carry_in, total), da, db in zip(steps, a, b):
        if (x, y) != (int(da), int(db)) or carry_in != carry or total != x + y + carry_in:
            return 0.0
        carry = int(total >= 10)
    from_steps = str(steps[-1][3]) + "".join(str(total % 10) for *_, total in reversed(steps[:-1]))
    return 1.0 if parse_answer(text).strip(" ") == from_steps else 0.0
