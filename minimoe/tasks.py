"""Verifiable tasks: problems whose answers a few lines of code can check, and the texts a model learns from.

A *verifiable task* is one where a program, not a person and not another neural network, decides whether an
answer is right. 347+589 is 936 or it is not; "3*7+5" reaches 26 from 3, 5 and 7 or it does not. That is what
made DeepSeek-R1-Zero's recipe possible: take a pretrained model, let it answer, and reward it with *rules*
(minimoe/rewards.py) rather than with a learned reward model, which a policy soon learns to fool.

Why the base model must be imperfect. GRPO samples a group of answers to each prompt and pushes up those that
scored above the group's mean. It can only *select* among behaviours the model already shows sometimes: if the
model never wrote its reasoning out, there would be no thinking to reinforce; if it were always right, every
answer in a group would score the same and every advantage would be zero. So the pretraining corpus
(`build_corpus`) is deliberately mixed:

    direct             "<answer>936</answer>"                                              60 %
    worked_with_error  "<think>7+9=16 4+8=12 3+5+1=9</think><answer>926</answer>"          25 %
    worked             "<think>7+9=16 4+8+1=13 3+5+1=9</think><answer>936</answer>"        15 %

A tiny model cannot add three-digit numbers in one step reliably, so its direct answers are often wrong. When
it thinks first, it has seen more sloppy work than careful work, so its thinking is unreliable too. Both habits
are there to be sampled, and the rewards decide which one grows.

Each direct answer in the corpus is correct, and so is each "worked" solution. A "worked_with_error" solution
makes exactly one mistake, a carry dropped or added, and then carries on correctly from the mistake: the
text is self-consistent and its final answer is wrong, as a hurried student's would be. A reward that checks
only the final answer tells these apart; the model has to learn that careful columns pay.

The tasks, all behind one interface (`Task`):

    AdditionTask(digits=3)   "347+589="   the default. The think block walks the columns right to left:
                             "a+b=s" per column, "+1" when a carry comes in from the column before (any
                             two-digit s carries one). The answer is read off the written column sums.
    AdditionTask(digits=4)   the same, one column longer: a probe of generalisation beyond the training data.
    CountdownTask()          "3 5 7>26:" reach 26 using each of 3, 5, 7 exactly once with + - * and
                             parentheses. Think: "3*7=21 21+5=26"; answer: "3*7+5". Many expressions can be
                             right, so the answer is checked by a small parser written here (never Python's
                             eval): each given number used once, the value equal to the target.

Train and test splits never overlap. A fixed hash of the problem's content (for addition the *unordered*
operand pair, so 347+589 and 589+347 fall on the same side) sends about 10 % of all problems to "test". The
held-out set is therefore the same under every seed and every sample size, and a test proves it disjoint.

Everything here is host data: prompts, texts and the NumPy random generator that draws them. The training
code turns token ids into backend tensors explicitly.
"""

import functools
import itertools
import re
from collections.abc import Mapping
from dataclasses import dataclass
from numbers import Real
from types import MappingProxyType
from typing import NamedTuple

import numpy as np  # host-side generation of task data, never tensor arithmetic

from .rewards import ANSWER, ANSWER_END, BOS, EOS, PAD, SPECIAL_TOKENS, THINK, THINK_END, combined_reward

__all__ = ["Tokenizer", "Problem", "Task", "AdditionTask", "CountdownTask", "Corpus", "EncodedCorpus",
           "build_corpus", "parse_expression", "expression_value", "ExpressionError", "STYLES", "SPLITS", "DEFAULT_MIX"]

STYLES = ("direct", "worked", "worked_with_error")
SPLITS = ("train", "test")
DEFAULT_MIX = MappingProxyType({"direct": 0.6, "worked_with_error": 0.25, "worked": 0.15})


# ---------------------------------------------------------------------------------------------------------
# Tokenizer


class Tokenizer:
    """Character-level tokenizer over a small fixed vocabulary: the seven special tokens, then one token per
    character the tasks use. A special token's text ("<think>") is always read as that one token.

        tok = Tokenizer()
        tok.encode("<bos>12+34=")       # [1, 8, 9, 17, 10, 11, 20]
        tok.decode([5, 11, 13, 6])      # "<answer>46</answer>"
    """

    CHARACTERS = "0123456789+-*=() >:"

    def __init__(self):
        self.tokens = SPECIAL_TOKENS + tuple(self.CHARACTERS)
        self.token_to_id = {token: i for i, token in enumerate(self.tokens)}
        self.pad_id, self.bos_id, self.eos_id = (self.token_to_id[t] for t in (PAD, BOS, EOS))
        self._specials = re.compile("(" + "|".join(re.escape(t) for t in SPECIAL_TOKENS) + ")")

    @property
    def vocab_size(self):
        return len(self.tokens)

    def encode(self, text):
        """The token ids of `text` (a list of ints). Special-token strings become single tokens."""
        if not isinstance(text, str):
            raise TypeError(f"Tokenizer.encode: expected a str, got {type(text).__name__}")
        ids, offset = [], 0
        # re.split with a capturing group alternates plain text (even places) and special tokens (odd places).
        for place, piece in enumerate(self._specials.split(text)):
            if place % 2:
                ids.append(self.token_to_id[piece])
            else:
                unknown = [ch for ch in piece if ch not in self.token_to_id]
                if unknown:
                    where = offset + piece.index(unknown[0])
                    raise ValueError(f"Tokenizer.encode: character {unknown[0]!r} at position {where} of "
                                     f"{text[:80]!r} is not in the vocabulary {self.CHARACTERS!r} "
                                     f"(plus the special tokens {', '.join(SPECIAL_TOKENS)})")
                ids.extend(self.token_to_id[ch] for ch in piece)
            offset += len(piece)
        return ids

    def decode(self, ids):
        """The text of a sequence of token ids (a list or a 1-D host array). Special tokens are kept."""
        ids = list(ids)
        not_integer = [i for i in ids if isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer))]
        if not_integer:
            raise TypeError(f"Tokenizer.decode: token ids must be integers, got {not_integer[0]!r} "
                            f"({type(not_integer[0]).__name__})")
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"Tokenizer.decode: token id {bad[0]} is outside the vocabulary "
                             f"0..{self.vocab_size - 1}")
        return "".join(self.tokens[i] for i in ids)

    def encode_batch(self, texts, pad_to=None):
        """Encode several texts into one right-padded host array.

        Returns (ids, lengths): ids (B, T) int64 filled with pad_id after each text, T = pad_to or the longest
        text; lengths (B,) int64. A text longer than pad_to is an error, never silently cut."""
        if isinstance(texts, str) or len(texts) == 0:
            raise ValueError("Tokenizer.encode_batch: expected a non-empty list of texts")
        encoded = [self.encode(text) for text in texts]
        lengths = np.array([len(e) for e in encoded], dtype=np.int64)  # (B,)
        width = int(lengths.max()) if pad_to is None else pad_to
        if lengths.max() > width:
            longest = int(lengths.argmax())
            raise ValueError(f"Tokenizer.encode_batch: text {longest} has {lengths[longest]} tokens, more than "
                             f"pad_to={pad_to}")
        ids = np.full((len(texts), width), self.pad_id, dtype=np.int64)  # (B, T)
        for row, e in zip(ids, encoded):
            row[:len(e)] = e
        return ids, lengths

    def decode_batch(self, ids, lengths=None):
        """One text per row of a (B, T) host array, each cut to its length if `lengths` is given."""
        if lengths is None:
            return [self.decode(row) for row in ids]
        return [self.decode(row[:length]) for row, length in zip(ids, lengths)]


# ---------------------------------------------------------------------------------------------------------
# Problems and the task interface


@dataclass(frozen=True)
class Problem:
    """One question with a checkable answer."""

    prompt: str      # what the model reads after <bos>, e.g. "347+589="
    reference: str   # a correct answer, e.g. "936" (Countdown: one of possibly several right expressions)
    task: str        # the name of the task that made it, e.g. "addition3"
    operands: tuple  # the numbers in the prompt, e.g. (347, 589)
    target: int      # the number asked for: the sum, or the Countdown target


def _held_out(keys, fraction):
    """A fixed pseudo-random coin per integer key: True for about `fraction` of all keys.

    The coin is splitmix64's finaliser (a bijective scramble of 64-bit integers) followed by a threshold.
    It depends on the key alone: not on a seed, a sample size or the Python version."""
    z = np.asarray(keys, dtype=np.uint64) + np.uint64(0x9E3779B97F4A7C15)  # uint64 wraps on overflow
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)) < np.uint64(round(fraction * 2 ** 53))  # top 53 bits vs fraction·2⁵³


class Task:
    """A family of verifiable problems. Subclasses set `name` and write the four hooks at the bottom."""

    name = "task"
    held_out_fraction = 0.1

    def sample(self, rng, n, split="train"):
        """n problems of one split, drawn with `rng` (a numpy Generator or an int seed); repeats are possible."""
        if split not in SPLITS:
            raise ValueError(f"{self.name}.sample: split must be one of {SPLITS}, got {split!r}")
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"{self.name}.sample: n must be a non-negative int, got {n!r}")
        rng = np.random.default_rng(rng)
        share = self.held_out_fraction if split == "test" else 1.0 - self.held_out_fraction
        problems = []
        while len(problems) < n:
            batch = self._draw(rng, int((n - len(problems)) / share * 1.1) + 16)
            keep = self._is_held_out(batch) == (split == "test")
            problems.extend(p for p, k in zip(batch, keep.tolist()) if k)
        return problems[:n]

    def split_of(self, problem):
        """"train" or "test": the split `problem` belongs to, whoever drew it."""
        self._check(problem)
        return "test" if self._is_held_out([problem])[0] else "train"

    def solution(self, problem, style="worked", rng=None):
        """The response text for `problem` in one corpus style (without <eos>):

        direct             <answer>A</answer>
        worked             <think>W</think><answer>A</answer>      correct work, correct answer
        worked_with_error  <think>W</think><answer>A</answer>      one slip, the rest consistent, A wrong
                                                                   (needs `rng` to place the slip)"""
        self._check(problem)
        if style not in STYLES:
            raise ValueError(f"{self.name}.solution: style must be one of {STYLES}, got {style!r}")
        if style == "direct":
            return f"{ANSWER}{problem.reference}{ANSWER_END}"
        if style == "worked":
            think, answer = self._worked(problem)
        elif rng is None:
            raise ValueError(f"{self.name}.solution: style 'worked_with_error' needs an rng to place the error")
        else:
            think, answer = self._worked_with_error(problem, np.random.default_rng(rng))
        return f"{THINK}{think}{THINK_END}{ANSWER}{answer}{ANSWER_END}"

    def reward(self, problem, response, accuracy_weight=1.0, format_weight=0.1):
        """Reward(total, accuracy, format) of a generated response (the text after the prompt, normally ending
        with <eos>): see minimoe.rewards.combined_reward."""
        self._check(problem)
        return combined_reward(response, self.verifier(problem), accuracy_weight, format_weight)

    def verifier(self, problem):
        """What accuracy_reward checks an answer against: the reference string, unless a task overrides it."""
        return problem.reference

    def _check(self, problem):
        if not isinstance(problem, Problem) or problem.task != self.name:
            got = problem.task if isinstance(problem, Problem) else type(problem).__name__
            raise ValueError(f"{self.name}: expected a problem of task {self.name!r}, got {got!r}")

    def _is_held_out(self, problems):
        return _held_out([self._split_key(p) for p in problems], self.held_out_fraction)

    # Hooks a task writes.
    def _draw(self, rng, m):
        """m random problems of either split."""
        raise NotImplementedError

    def _split_key(self, problem):
        """An integer < 2⁶⁴ naming the problem's content; problems with equal keys share a split."""
        raise NotImplementedError

    def _worked(self, problem):
        """(think text, answer text) of a correct worked solution."""
        raise NotImplementedError

    def _worked_with_error(self, problem, rng):
        """(think text, answer text) of a worked solution with one self-consistent slip and a wrong answer."""
        raise NotImplementedError


# ---------------------------------------------------------------------------------------------------------
# Addition


class AdditionTask(Task):
    """a + b with two `digits`-digit operands (10^(digits−1) .. 10^digits − 1), e.g. "347+589=" → "936".

    Worked solution, right to left, one column per digit:   7+9=16 4+8+1=13 3+5+1=9   → 936
    A column "x+y=s" or "x+y+1=s" (the +1 is the carry in); s ≥ 10 carries one into the next column. The
    answer is the last column's sum followed by the units digits of the other columns, left to right."""

    def __init__(self, digits=3):
        if isinstance(digits, bool) or not isinstance(digits, int) or not 2 <= digits <= 9:
            raise ValueError(f"AdditionTask: digits must be an int in 2..9, got {digits!r}")
        self.digits = digits
        self.name = f"addition{digits}"
        self.low, self.high = 10 ** (digits - 1), 10 ** digits - 1

    def problem(self, a, b):
        """The problem a + b."""
        for x in (a, b):
            if not isinstance(x, int) or not self.low <= x <= self.high:
                raise ValueError(f"{self.name}.problem: operands must be ints in {self.low}..{self.high}, "
                                 f"got {a!r} and {b!r}")
        return Problem(f"{a}+{b}=", str(a + b), self.name, (a, b), a + b)

    def _draw(self, rng, m):
        a, b = rng.integers(self.low, self.high + 1, size=(2, m)).tolist()
        return [self.problem(x, y) for x, y in zip(a, b)]

    def _split_key(self, problem):
        low, high = sorted(problem.operands)
        return low * 10 ** self.digits + high

    def _columns(self, problem, flipped=None):
        """(x, y, carry_in, sum) per column, units first. The carry into column `flipped` is inverted
        (dropped if due, added if not); every other carry follows from the sum written before it."""
        a, b = (str(x)[::-1] for x in problem.operands)
        columns, carry = [], 0
        for j, (x, y) in enumerate(zip(a, b)):
            carry = 1 - carry if j == flipped else carry
            total = int(x) + int(y) + carry
            columns.append((x, y, carry, total))
            carry = int(total >= 10)
        return columns

    def _write(self, columns):
        think = " ".join(f"{x}+{y}{'+1' if carry else ''}={total}" for x, y, carry, total in columns)
        answer = str(columns[-1][3]) + "".join(str(total % 10) for *_, total in reversed(columns[:-1]))
        return think, answer

    def _worked(self, problem):
        return self._write(self._columns(problem))

    def _worked_with_error(self, problem, rng):
        # Flipping the carry into column j (j ≥ 1) moves the result by ±10^j: always wrong, never negative.
        return self._write(self._columns(problem, flipped=int(rng.integers(1, self.digits))))


# ---------------------------------------------------------------------------------------------------------
# Countdown: a safe parser and evaluator for + - * and parentheses (never Python's eval)


class ExpressionError(ValueError):
    """The text is not an expression of the grammar below."""


MAX_EXPRESSION_LENGTH = 64  # bounds the parser's recursion and the size of any number it could compute
_PRECEDENCE = {"+": 1, "-": 1, "*": 2}
_APPLY = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def parse_expression(text):
    """Parse text into a tree: an int (a number), or a tuple (op, left, right) with op in "+-*".

    Grammar (the usual precedence: * binds tighter; + and - associate to the left):
        sum     := product (("+" | "-") product)*
        product := atom ("*" atom)*
        atom    := number | "(" sum ")"          number: ASCII digits, no leading zero
    Spaces between tokens are allowed. No unary minus, no other operators. Raises ExpressionError."""
    if not isinstance(text, str) or len(text) > MAX_EXPRESSION_LENGTH:
        raise ExpressionError(f"parse_expression: expected a str of at most {MAX_EXPRESSION_LENGTH} characters")
    tokens = re.findall(r"[0-9]+|\S", text)
    for token in tokens:
        if token not in _PRECEDENCE and token not in "()" and not re.fullmatch(r"0|[1-9][0-9]*", token):
            raise ExpressionError(f"parse_expression: unexpected {token!r} in {text!r}")
    tree, end = _parse_sum(tokens, 0)
    if end != len(tokens):
        raise ExpressionError(f"parse_expression: unexpected {tokens[end]!r} in {text!r}")
    return tree


def _parse_sum(tokens, at):
    tree, at = _parse_product(tokens, at)
    while at < len(tokens) and tokens[at] in "+-":
        right, end = _parse_product(tokens, at + 1)
        tree, at = (tokens[at], tree, right), end
    return tree, at


def _parse_product(tokens, at):
    tree, at = _parse_atom(tokens, at)
    while at < len(tokens) and tokens[at] == "*":
        right, at = _parse_atom(tokens, at + 1)
        tree = ("*", tree, right)
    return tree, at


def _parse_atom(tokens, at):
    if at == len(tokens):
        raise ExpressionError("parse_expression: the expression ends too early")
    if tokens[at] == "(":
        tree, at = _parse_sum(tokens, at + 1)
        if at == len(tokens) or tokens[at] != ")":
            raise ExpressionError("parse_expression: a '(' is never closed")
        return tree, at + 1
    if not tokens[at].isdigit():
        raise ExpressionError(f"parse_expression: expected a number or '(', got {tokens[at]!r}")
    return int(tokens[at]), at + 1


def expression_value(tree):
    """The integer value of a tree from parse_expression."""
    if isinstance(tree, int):
        return tree
    op, left, right = tree
    return _APPLY[op](expression_value(left), expression_value(right))


def _leaves(tree):
    return [tree] if isinstance(tree, int) else _leaves(tree[1]) + _leaves(tree[2])


def _render(tree, parent=None, is_right=False):
    """The expression text of a tree with only the parentheses it needs."""
    if isinstance(tree, int):
        return str(tree)
    op, left, right = tree
    text = _render(left, op) + op + _render(right, op, is_right=True)
    loose = parent is not None and (_PRECEDENCE[op] < _PRECEDENCE[parent]
                                    or (is_right and parent == "-" and _PRECEDENCE[op] == 1))
    return f"({text})" if loose else text


def _steps(tree, slip=None):
    """The work of a tree as a person writes it: "a op b=v", innermost operation first. `slip`, if given,
    replaces the value of the first step, and every later step computes correctly from it."""
    steps = []

    def value(node):
        if isinstance(node, int):
            return node
        op, left, right = node
        a, b = value(left), value(right)
        v = slip if slip is not None and not steps else _APPLY[op](a, b)
        steps.append(f"{a}{op}{b}={v}")
        return v

    value(tree)
    return steps


@functools.lru_cache(maxsize=None)
def _derivations(numbers):
    """Every two-step expression tree over the sorted triple `numbers` (each used once) whose intermediate
    and final values are ≥ 0, as {rendered text: tree} in a fixed order."""
    trees = {}
    for x, y, z in sorted(set(itertools.permutations(numbers))):
        for op1, op2 in itertools.product("+-*", repeat=2):
            inner = (op1, x, y)
            if expression_value(inner) < 0:
                continue
            for tree in ((op2, inner, z), (op2, z, inner)):
                if expression_value(tree) >= 0:
                    trees.setdefault(_render(tree), tree)
    return trees


@functools.lru_cache(maxsize=None)
def _solutions_by_target(numbers, max_target):
    """{target: [expression texts reaching it]} for targets 1..max_target, from _derivations(numbers)."""
    by_target = {}
    for text, tree in _derivations(numbers).items():
        if 1 <= expression_value(tree) <= max_target:
            by_target.setdefault(expression_value(tree), []).append(text)
    return by_target


class CountdownTask(Task):
    """Reach a target from three numbers in 1..max_number, each used exactly once, with + - * and parentheses.

    Prompt "3 5 7>26:"; worked solution "<think>3*7=21 21+5=26</think><answer>3*7+5</answer>". Targets are
    1..max_target values of some two-step expression whose intermediate results are ≥ 0. Any expression that
    uses each number once and equals the target is accepted (`check_answer`), not just the reference.

    The slip in worked_with_error: the first step's value is miscalculated so that an expression that does
    *not* reach the target seems to ("3*5=19 7+19=26", answer "7+3*5", which is 22). Of all such slips the
    generator picks among the three smallest, the kind of mistake that looks plausible."""

    name = "countdown"

    def __init__(self, max_number=9, max_target=99):
        if not isinstance(max_number, int) or not 2 <= max_number <= 99:
            raise ValueError(f"CountdownTask: max_number must be an int in 2..99, got {max_number!r}")
        if not isinstance(max_target, int) or not 1 <= max_target <= 9999:
            raise ValueError(f"CountdownTask: max_target must be an int in 1..9999, got {max_target!r}")
        self.max_number, self.max_target = max_number, max_target

    def problem(self, numbers, target):
        """The problem: reach `target` from the three `numbers` (in prompt order). Raises if unreachable."""
        numbers = tuple(numbers)
        if len(numbers) != 3 or not all(isinstance(x, int) and 1 <= x <= self.max_number for x in numbers):
            raise ValueError(f"{self.name}.problem: expected three ints in 1..{self.max_number}, got {numbers}")
        solutions = _solutions_by_target(tuple(sorted(numbers)), self.max_target).get(target)
        if not solutions:
            raise ValueError(f"{self.name}.problem: {target!r} cannot be reached from {numbers} "
                             f"(targets are 1..{self.max_target}, intermediate results ≥ 0)")
        return self._make(numbers, target, solutions[0])

    def check_answer(self, problem, answer):
        """True iff `answer` parses, uses each of the problem's numbers exactly once, and equals the target."""
        try:
            tree = parse_expression(answer)
        except ExpressionError:
            return False
        # Compare the numbers before evaluating, so only the given (small) numbers are ever multiplied.
        return sorted(_leaves(tree)) == sorted(problem.operands) and expression_value(tree) == problem.target

    def verifier(self, problem):
        return functools.partial(self.check_answer, problem)

    def _make(self, numbers, target, reference):
        prompt = " ".join(map(str, numbers)) + f">{target}:"
        return Problem(prompt, reference, self.name, numbers, target)

    def _draw(self, rng, m):
        problems = []
        for numbers in rng.integers(1, self.max_number + 1, size=(m, 3)).tolist():
            by_target = _solutions_by_target(tuple(sorted(numbers)), self.max_target)
            target = sorted(by_target)[rng.integers(len(by_target))]
            solutions = by_target[target]
            problems.append(self._make(tuple(numbers), target, solutions[rng.integers(len(solutions))]))
        return problems

    def _split_key(self, problem):
        a, b, c = sorted(problem.operands)
        return ((a * 100 + b) * 100 + c) * 10_000 + problem.target

    def _worked(self, problem):
        return " ".join(_steps(parse_expression(problem.reference))), problem.reference

    def _worked_with_error(self, problem, rng):
        target, slips = problem.target, []
        for text, tree in _derivations(tuple(sorted(problem.operands))).items():
            op, left, right = tree
            inner_left = isinstance(left, tuple)
            other = right if inner_left else left
            # The first-step value s that would make the second step land on the target.
            if op == "+":
                s = target - other
            elif op == "-":
                s = target + other if inner_left else other - target
            else:
                s = target // other if target % other == 0 else -1
            true_value = expression_value(left if inner_left else right)
            if s >= 0 and s != true_value:  # s ≠ true value ⟺ the expression misses the target
                slips.append((abs(s - true_value), text, tree, s))
        if not slips:
            raise RuntimeError(f"{self.name}: no plausible slip for {problem.prompt!r}")
        slips.sort(key=lambda slip: slip[:2])  # smallest slips first; texts are unique, so the order is fixed
        _, text, tree, s = slips[rng.integers(min(3, len(slips)))]
        return " ".join(_steps(tree, slip=s)), text


# ---------------------------------------------------------------------------------------------------------
# The pretraining corpus


class EncodedCorpus(NamedTuple):
    """A corpus as host arrays (see Corpus.encode)."""

    ids: np.ndarray              # (N, T) int64, right-padded with pad_id
    lengths: np.ndarray          # (N,) int64 tokens per text
    prompt_lengths: np.ndarray   # (N,) int64 tokens of "<bos>" + prompt
    completion_mask: np.ndarray  # (N, T) bool, True on the response and its <eos>


@dataclass
class Corpus:
    """Pretraining texts, each "<bos>" + prompt followed by response + "<eos>", kept in two parts so the
    loss can be restricted to the completion. `texts` joins them."""

    problems: list     # Problem per text
    styles: list       # "direct" | "worked" | "worked_with_error" per text
    prompts: list      # "<bos>347+589="
    completions: list  # "<think>…</think><answer>936</answer><eos>"

    def __len__(self):
        return len(self.prompts)

    @property
    def texts(self):
        return [p + c for p, c in zip(self.prompts, self.completions)]

    def encode(self, tokenizer, pad_to=None):
        """EncodedCorpus(ids, lengths, prompt_lengths, completion_mask): token ids of every text and a mask
        of the completion tokens. For next-token training, inputs are ids[:, :-1], targets ids[:, 1:], and the
        loss mask is completion_mask[:, 1:] (a target counts when the token it predicts is part of the completion)."""
        ids, lengths = tokenizer.encode_batch(self.texts, pad_to)
        prompt_lengths = np.array([len(tokenizer.encode(p)) for p in self.prompts], dtype=np.int64)
        positions = np.arange(ids.shape[1])  # (T,)
        mask = (positions >= prompt_lengths[:, None]) & (positions < lengths[:, None])  # (N, T)
        return EncodedCorpus(ids, lengths, prompt_lengths, mask)


def _style_counts(mix, n):
    """Exact counts per style from fractions, rounding by largest remainder so they add up to n."""
    if not isinstance(mix, Mapping) or not mix:
        raise ValueError(f"build_corpus: mix must be a non-empty dict style -> fraction, got {mix!r}")
    unknown = set(mix) - set(STYLES)
    if unknown:
        raise ValueError(f"build_corpus: unknown style(s) {sorted(unknown)} in mix; styles are {STYLES}")
    if not all(isinstance(f, Real) for f in mix.values()):
        raise ValueError(f"build_corpus: mix fractions must be numbers, got {dict(mix)}")
    fractions = {style: float(mix.get(style, 0.0)) for style in STYLES}
    if not all(0.0 <= f <= 1.0 for f in fractions.values()) or abs(sum(fractions.values()) - 1.0) > 1e-9:
        raise ValueError(f"build_corpus: mix fractions must be non-negative and sum to 1, got {dict(mix)} "
                         f"(sum {sum(fractions.values())})")
    counts = {style: int(f * n) for style, f in fractions.items()}
    by_remainder = sorted(STYLES, key=lambda style: counts[style] - fractions[style] * n)
    for style in by_remainder[:n - sum(counts.values())]:
        counts[style] += 1
    return counts


def build_corpus(task, n, rng, mix=DEFAULT_MIX, split="train"):
    """n pretraining texts for `task` from `split`, in the styles and proportions of `mix` (exact counts by
    largest-remainder rounding, shuffled), drawn with `rng` (a numpy Generator or an int seed)."""
    counts = _style_counts(mix, n)
    rng = np.random.default_rng(rng)
    problems = task.sample(rng, n, split)
    styles = [STYLES[i] for i in rng.permutation(np.repeat(np.arange(len(STYLES)),
                                                              [counts[s] for s in STYLES]))]
    prompts = [BOS + p.prompt for p in problems]
    completions = [task.solution(p, style, rng) + EOS for p, style in zip(problems, styles)]
    return Corpus(problems, styles, prompts, completions)
