"""Tasks, tokenizer and corpus. Worked solutions are parsed back with parsers written here, independently of
minimoe.tasks, and checked against column arithmetic (addition) or step arithmetic (Countdown); Countdown's
safe evaluator is checked against Python's own evaluation of generated, known-safe expressions."""

import itertools
import re

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from minimoe.rewards import SPECIAL_TOKENS, Reward
from minimoe.tasks import (DEFAULT_MIX, STYLES, AdditionTask, CountdownTask, ExpressionError, Problem, Tokenizer,
                           _render, build_corpus, expression_value, parse_expression)

TOKEN_BUDGET = 48  # prompt + response, with <bos> and <eos>, for 3-digit addition and Countdown
TOK = Tokenizer()
ADD3, ADD4, COUNTDOWN = AdditionTask(3), AdditionTask(4), CountdownTask()
RESPONSE = re.compile(r"<think>(.*)</think><answer>(.*)</answer>")


# --- tokenizer -------------------------------------------------------------------------------------------

def test_vocabulary_is_small_fixed_and_special_tokens_are_single():
    assert TOK.vocab_size <= 48 and len(set(TOK.tokens)) == TOK.vocab_size
    assert Tokenizer().tokens == TOK.tokens
    for token in SPECIAL_TOKENS:
        assert TOK.encode(token) == [TOK.token_to_id[token]]
    assert TOK.decode([TOK.pad_id, TOK.bos_id, TOK.eos_id]) == "<pad><bos><eos>"
    assert len({TOK.pad_id, TOK.bos_id, TOK.eos_id}) == 3


def test_encode_reads_special_strings_and_characters():
    text = "<bos>12+34=<think>4+2=6</think><answer>46</answer><eos>"
    ids = TOK.encode(text)
    assert len(ids) == 1 + 6 + 1 + 5 + 1 + 1 + 2 + 1 + 1
    assert TOK.decode(ids) == text
    assert ids[0] == TOK.bos_id and ids[-1] == TOK.eos_id
    assert TOK.encode("") == [] and TOK.decode([]) == ""


@pytest.mark.parametrize("text, bad, position", [("12a", "a", 2), ("<think>é", "é", 7), ("<answer", "<", 0),
                                                 ("1/2", "/", 1), ("９", "９", 0)])
def test_encode_rejects_unknown_characters(text, bad, position):
    with pytest.raises(ValueError, match=re.escape(f"{bad!r} at position {position}")):
        TOK.encode(text)


def test_decode_rejects_unknown_ids():
    with pytest.raises(ValueError, match="token id 26"):
        TOK.decode([1, TOK.vocab_size])
    with pytest.raises(ValueError, match="token id -1"):
        TOK.decode([-1])


def test_encode_batch_pads_and_reports_lengths():
    texts = ["<bos>1+1=", "<bos>12+3=<answer>15</answer><eos>", "7"]
    ids, lengths = TOK.encode_batch(texts)
    assert ids.shape == (3, 11) and ids.dtype == np.int64 and lengths.tolist() == [5, 11, 1]
    for row, length, text in zip(ids, lengths, texts):
        assert TOK.decode(row[:length]) == text and (row[length:] == TOK.pad_id).all()
    assert TOK.decode_batch(ids, lengths) == texts
    wide, _ = TOK.encode_batch(texts, pad_to=20)
    assert wide.shape == (3, 20) and (wide[:, :11] == ids).all()
    with pytest.raises(ValueError, match="text 1 has 11 tokens, more than pad_to=10"):
        TOK.encode_batch(texts, pad_to=10)
    with pytest.raises(ValueError, match="non-empty list"):
        TOK.encode_batch("<bos>1+1=")


# --- problems and splits ---------------------------------------------------------------------------------

@pytest.mark.parametrize("task", [ADD3, ADD4, COUNTDOWN], ids=lambda t: t.name)
def test_sampling_is_deterministic_under_a_seed(task):
    assert task.sample(np.random.default_rng(7), 300) == task.sample(7, 300)
    assert task.sample(7, 300) != task.sample(8, 300)
    assert task.sample(7, 300, split="test") == task.sample(7, 300, split="test")
    assert len(task.sample(0, 0)) == 0


@pytest.mark.parametrize("task", [ADD3, ADD4, COUNTDOWN], ids=lambda t: t.name)
def test_splits_are_disjoint_and_fixed(task):
    def content(p):  # what decides the split: the operands as a multiset (and the Countdown target)
        return tuple(sorted(p.operands)), p.target

    train = task.sample(0, 10_000, split="train")
    test = task.sample(1, 3_000, split="test")
    assert not {content(p) for p in train} & {content(p) for p in test}
    assert {task.split_of(p) for p in train} == {"train"} and {task.split_of(p) for p in test} == {"test"}
    # A different seed and size draw from the same held-out set, and the held-out share is about 10 %.
    assert all(task.split_of(p) == "test" for p in task.sample(123, 50, split="test"))
    either = task._draw(np.random.default_rng(5), 10_000)
    share = np.mean([task.split_of(p) == "test" for p in either])
    assert 0.08 < share < 0.12, share


def test_swapped_operands_share_a_split():
    rng = np.random.default_rng(0)
    for a, b in rng.integers(100, 1000, size=(2000, 2)).tolist():
        assert ADD3.split_of(ADD3.problem(a, b)) == ADD3.split_of(ADD3.problem(b, a))


def test_addition_problems():
    for task in (ADD3, ADD4):
        for p in task.sample(3, 2000):
            a, b = p.operands
            assert 10 ** (task.digits - 1) <= min(a, b) and max(a, b) < 10 ** task.digits
            assert p.prompt == f"{a}+{b}=" and p.reference == str(a + b) and p.target == a + b
            assert p.task == task.name
    with pytest.raises(ValueError, match="100..999"):
        ADD3.problem(99, 500)
    with pytest.raises(ValueError, match="digits"):
        AdditionTask(1)


def test_countdown_problems():
    for p in COUNTDOWN.sample(3, 2000):
        assert p.prompt == " ".join(map(str, p.operands)) + f">{p.target}:"
        assert len(p.operands) == 3 and all(1 <= x <= 9 for x in p.operands) and 1 <= p.target <= 99
        assert COUNTDOWN.check_answer(p, p.reference)
    with pytest.raises(ValueError, match="cannot be reached"):
        COUNTDOWN.problem((1, 1, 1), 50)


def test_a_task_refuses_another_tasks_problem():
    with pytest.raises(ValueError, match="expected a problem of task 'addition4', got 'addition3'"):
        ADD4.solution(ADD3.problem(100, 200))
    with pytest.raises(ValueError, match="countdown"):
        COUNTDOWN.reward(ADD3.problem(100, 200), "<answer>300</answer><eos>")
    with pytest.raises(ValueError, match="style"):
        ADD3.solution(ADD3.problem(100, 200), style="sloppy")
    with pytest.raises(ValueError, match="needs an rng"):
        ADD3.solution(ADD3.problem(100, 200), style="worked_with_error")
    with pytest.raises(ValueError, match="split"):
        ADD3.sample(0, 5, split="validation")


# --- addition solutions, parsed back ---------------------------------------------------------------------

COLUMN = re.compile(r"(\d)\+(\d)(\+1)?=(\d+)")


def audit_addition(problem, response):
    """Parse an addition response independently and describe its work: the number of carry mistakes, whether
    every column's sum is right for what it says, and whether the answer is what the columns add up to."""
    match = RESPONSE.fullmatch(response)
    assert match, response
    think, answer = match.groups()
    columns = [COLUMN.fullmatch(text) for text in think.split(" ")]
    assert all(columns), think
    a, b = (str(x)[::-1] for x in problem.operands)
    assert [(c[1], c[2]) for c in columns] == list(zip(a, b)), "columns must walk the digits right to left"
    carry_mistakes, sums_right, carry_due = 0, True, 0
    for c in columns:
        carry, total = int(c[3] is not None), int(c[4])
        carry_mistakes += carry != carry_due
        sums_right &= total == int(c[1]) + int(c[2]) + carry
        carry_due = int(total >= 10)
    written = int(columns[-1][4]) * 10 ** (len(columns) - 1) + sum(
        int(c[4]) % 10 * 10 ** j for j, c in enumerate(columns[:-1]))
    return carry_mistakes, sums_right, answer == str(written), answer


@pytest.mark.parametrize("task", [ADD3, ADD4], ids=lambda t: t.name)
def test_addition_solutions_are_what_they_claim(task):
    rng = np.random.default_rng(0)
    problems = task.sample(1, 1500) + [task.problem(task.high, task.high), task.problem(task.low, task.low)]
    flips = set()
    for p in problems:
        assert task.solution(p, "direct") == f"<answer>{sum(p.operands)}</answer>"
        assert audit_addition(p, task.solution(p, "worked")) == (0, True, True, str(sum(p.operands)))
        mistakes, sums_right, consistent, answer = audit_addition(p, task.solution(p, "worked_with_error", rng))
        assert (mistakes, sums_right, consistent) == (1, True, True)
        assert answer != str(sum(p.operands))
        flips.add(abs(int(answer) - sum(p.operands)))
    assert flips == {10 ** j for j in range(1, task.digits)}, "every inner column can hold the slip"


def test_worked_with_error_drops_and_adds_carries():
    rng = np.random.default_rng(0)
    no_carries, all_carries = ADD3.problem(123, 456), ADD3.problem(999, 999)
    for _ in range(20):
        assert int(RESPONSE.fullmatch(ADD3.solution(no_carries, "worked_with_error", rng))[2]) > 579
        assert int(RESPONSE.fullmatch(ADD3.solution(all_carries, "worked_with_error", rng))[2]) < 1998


def test_addition_example_from_the_docs():
    p = ADD3.problem(347, 589)
    assert ADD3.solution(p) == "<think>7+9=16 4+8+1=13 3+5+1=9</think><answer>936</answer>"


# --- Countdown: the safe evaluator -----------------------------------------------------------------------

def trees(depth):
    leaf = st.integers(0, 200)
    if depth == 0:
        return leaf
    return st.one_of(leaf, st.tuples(st.sampled_from("+-*"), trees(depth - 1), trees(depth - 1)))


def fully_parenthesised(tree):
    return str(tree) if isinstance(tree, int) else f"({fully_parenthesised(tree[1])}{tree[0]}" \
                                                    f"{fully_parenthesised(tree[2])})"


@settings(max_examples=300, deadline=None)
@given(trees(3))
def test_evaluator_agrees_with_python_on_safe_expressions(tree):
    text = fully_parenthesised(tree)
    # the oracle: a test-only eval of digits and + - * ( )
    assert expression_value(parse_expression(text)) == eval(text)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["+", "-", "*", " - ", "*("]), st.integers(0, 99)), max_size=6),
       st.integers(0, 99))
def test_precedence_and_associativity_agree_with_python(pairs, first):
    text = str(first) + "".join(op + str(x) for op, x in pairs)
    text += ")" * text.count("(")
    assert expression_value(parse_expression(text)) == eval(text)


@settings(max_examples=300, deadline=None)
@given(trees(3))
def test_rendering_keeps_the_value(tree):
    assert eval(_render(tree)) == eval(fully_parenthesised(tree))


def test_rendered_solutions_use_only_needed_parentheses():
    for p in COUNTDOWN.sample(0, 3000):
        assert eval(p.reference) == p.target
        if "(" in p.reference:  # two steps need at most one pair, and without it the expression parses otherwise
            assert p.reference.count("(") == 1
            assert parse_expression(p.reference.replace("(", "").replace(")", "")) != parse_expression(p.reference)


@pytest.mark.parametrize("text", ["", "3+", "+3", "-3+5", "3++5", "3--5", "(3+5", "3+5)", "()", "3/5", "2**3",
                                  "07+5", "3 5", "1e3", "3.0", "３+5", "٣+5", "3+x", "(" * 40 + "1" + ")" * 40,
                                  "1+" * 40 + "1"])
def test_evaluator_rejects_bad_expressions(text):
    with pytest.raises(ExpressionError):
        parse_expression(text)


def test_check_answer():
    p = COUNTDOWN.problem((3, 5, 7), 26)
    for right in ("3*7+5", "5+7*3", "(7*3)+5", " 5 + 3 * 7 "):
        assert COUNTDOWN.check_answer(p, right)
    for wrong in ("3*7+5+0", "3*7", "3*7+5-5+5", "26", "3*5+7", "7*3+5*1", "21+5", "3*7+05", "3*(7+5)",
                  "9" * 60, "9" * 1000, "3*7+5\u200b", ""):
        assert not COUNTDOWN.check_answer(p, wrong), wrong
    repeated = COUNTDOWN.problem((2, 2, 3), 7)  # a repeated number must be used as often as it is given
    assert COUNTDOWN.check_answer(repeated, "2*2+3") and COUNTDOWN.check_answer(repeated, "2+2+3")
    for wrong in ("2*3+1", "2+2+3+0", "3+2+2+0", "2+3+2*1", "(2+3)+2+0"):
        assert not COUNTDOWN.check_answer(repeated, wrong), wrong
    assert not COUNTDOWN.check_answer(COUNTDOWN.problem((2, 3, 4), 10), "2+2*4")


# --- Countdown solutions, parsed back --------------------------------------------------------------------

STEP = re.compile(r"(\d+)([-+*])(\d+)=(\d+)")
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


def audit_countdown(problem, response):
    """Parse a Countdown response: the steps, which of them compute wrongly, whether each later step uses the
    value the step before wrote, and the value of the answer expression."""
    match = RESPONSE.fullmatch(response)
    assert match, response
    think, answer = match.groups()
    steps = [STEP.fullmatch(text) for text in think.split(" ")]
    assert len(steps) == 2 and all(steps), think
    wrong_steps = [i for i, s in enumerate(steps) if OPS[s[2]](int(s[1]), int(s[3])) != int(s[4])]
    first_value, second = steps[0][4], steps[1]
    chained = first_value in (second[1], second[3])
    # The answer expression is the work written as one line: the first step's operands appear in it.
    numbers = sorted(int(x) for x in re.findall(r"\d+", answer))
    uses_given = numbers == sorted(problem.operands)
    return wrong_steps, chained, int(second[4]), eval(answer), uses_given


def test_countdown_solutions_are_what_they_claim():
    rng = np.random.default_rng(0)
    for p in COUNTDOWN.sample(2, 1500):
        assert COUNTDOWN.solution(p, "direct") == f"<answer>{p.reference}</answer>"
        assert audit_countdown(p, COUNTDOWN.solution(p, "worked")) == ([], True, p.target, p.target, True)
        wrong_steps, chained, claimed, value, uses_given = audit_countdown(
            p, COUNTDOWN.solution(p, "worked_with_error", rng))
        assert (wrong_steps, chained, claimed, uses_given) == ([0], True, p.target, True)
        assert value != p.target


def test_every_countdown_problem_has_a_slip():
    rng = np.random.default_rng(0)
    for numbers in itertools.combinations_with_replacement(range(1, 10), 3):
        for target in range(1, 100):
            try:
                p = COUNTDOWN.problem(numbers, target)
            except ValueError:
                continue
            response = COUNTDOWN.solution(p, "worked_with_error", rng)
            assert COUNTDOWN.reward(p, response + "<eos>").accuracy == 0.0


# --- rewards through the task ----------------------------------------------------------------------------

@pytest.mark.parametrize("task", [ADD3, COUNTDOWN], ids=lambda t: t.name)
def test_task_rewards_each_style(task):
    rng = np.random.default_rng(0)
    for p in task.sample(4, 200):
        assert task.reward(p, task.solution(p, "worked") + "<eos>") == Reward(1.1, 1.0, 1.0)
        assert task.reward(p, task.solution(p, "direct") + "<eos>") == Reward(1.0, 1.0, 0.0)
        assert task.reward(p, task.solution(p, "worked_with_error", rng) + "<eos>") == Reward(0.1, 0.0, 1.0)
        assert task.reward(p, task.solution(p, "worked")) == Reward(1.0, 1.0, 0.0)  # truncated before <eos>


def test_countdown_reward_accepts_any_valid_expression():
    p = COUNTDOWN.problem((3, 5, 7), 26)
    assert COUNTDOWN.reward(p, "<think>7*3=21 5+21=26</think><answer>5+7*3</answer><eos>").total == 1.1
    assert COUNTDOWN.reward(p, "<answer>" + "9" * 5000 + "</answer><eos>").total == 0.0


# --- the corpus ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("task", [ADD3, ADD4, COUNTDOWN], ids=lambda t: t.name)
def test_corpus_texts_round_trip_and_are_deterministic(task):
    corpus = build_corpus(task, 2000, np.random.default_rng(0))
    assert corpus.texts == build_corpus(task, 2000, 0).texts
    assert corpus.texts != build_corpus(task, 2000, 1).texts
    for text, problem, prompt in zip(corpus.texts, corpus.problems, corpus.prompts):
        assert TOK.decode(TOK.encode(text)) == text
        assert prompt == "<bos>" + problem.prompt and text.startswith(prompt) and text.endswith("<eos>")
        assert text.count("<eos>") == 1 and text.count("<bos>") == 1


@pytest.mark.parametrize("task", [ADD3, COUNTDOWN], ids=lambda t: t.name)
def test_corpus_styles_are_what_they_claim(task):
    corpus = build_corpus(task, 1000, 0)
    counts = {style: corpus.styles.count(style) for style in STYLES}
    assert counts == {"direct": 600, "worked_with_error": 250, "worked": 150}
    assert len(set(corpus.styles[:100])) == 3, "styles are shuffled"
    expected = {"direct": Reward(1.0, 1.0, 0.0), "worked": Reward(1.1, 1.0, 1.0),
                "worked_with_error": Reward(0.1, 0.0, 1.0)}
    for problem, style, completion in zip(corpus.problems, corpus.styles, corpus.completions):
        assert task.reward(problem, completion) == expected[style]


@pytest.mark.parametrize("task", [ADD3, COUNTDOWN], ids=lambda t: t.name)
def test_corpus_fits_the_token_budget(task):
    lengths = build_corpus(task, 5000, 0).encode(TOK).lengths
    assert lengths.max() <= TOKEN_BUDGET


def test_longest_addition_text_fits_the_budget():
    p = ADD3.problem(999, 999)  # three carries and a four-digit answer: the longest worked text
    rng = np.random.default_rng(0)
    for style in STYLES:
        assert len(TOK.encode("<bos>" + p.prompt + ADD3.solution(p, style, rng) + "<eos>")) <= TOKEN_BUDGET


def test_corpus_from_the_test_split():
    corpus = build_corpus(ADD3, 500, 0, split="test")
    assert {ADD3.split_of(p) for p in corpus.problems} == {"test"}


def test_completion_mask_covers_exactly_the_completion():
    corpus = build_corpus(COUNTDOWN, 300, 0, mix={"direct": 0.5, "worked": 0.5})
    ids, lengths, prompt_lengths, mask = corpus.encode(TOK, pad_to=40)
    assert ids.shape == mask.shape == (300, 40) and mask.dtype == bool
    for row, row_mask, prompt, completion, n, m in zip(ids, mask, corpus.prompts, corpus.completions, lengths,
                                                       prompt_lengths):
        assert TOK.decode(row[row_mask]) == completion
        assert TOK.decode(row[:m]) == prompt and (row[n:] == TOK.pad_id).all()


@pytest.mark.parametrize("mix, match", [
    ({"direct": 0.7, "worked": 0.2}, "sum to 1"),
    ({"direct": 1.2, "worked": -0.2}, "non-negative"),
    ({"direct": float("nan"), "worked": 1.0}, "non-negative"),
    ({"direct": 0.5, "sloppy": 0.5}, "unknown style"),
    ({}, "non-empty"),
    ([0.6, 0.25, 0.15], "dict"),
])
def test_bad_mix_is_refused(mix, match):
    with pytest.raises(ValueError, match=match):
        build_corpus(ADD3, 10, 0, mix=mix)


def test_mix_counts_add_up():
    for n in (1, 7, 33, 100):
        corpus = build_corpus(ADD3, n, 0, mix={"direct": 1 / 3, "worked": 1 / 3, "worked_with_error": 1 / 3})
        counts = sorted(corpus.styles.count(s) for s in STYLES)
        assert sum(counts) == n and counts[-1] - counts[0] <= 1
    assert set(build_corpus(ADD3, 50, 0, mix={"worked": 1.0}).styles) == {"worked"}
    assert dict(DEFAULT_MIX) == {"direct": 0.6, "worked_with_error": 0.25, "worked": 0.15}


def test_problem_is_a_frozen_value():
    p = ADD3.problem(100, 200)
    assert p == Problem("100+200=", "300", "addition3", (100, 200), 300) and hash(p) == hash(ADD3.problem(100, 200))
    with pytest.raises(AttributeError):
        p.reference = "301"
