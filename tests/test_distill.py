"""Rejection sampling, SFT on a response corpus and the distillation pipeline (minimoe.distill), and the
consistency rule they filter with (minimoe.rewards.addition_consistency).

Every expected value of the consistency cases is worked out by hand for 347 + 589 = 936: the columns, units
first, are 7+9=16, 4+8+1=13, 3+5+1=9."""

import pytest

from minimoe.rewards import addition_consistency, parse_addition_steps

OPERANDS = (347, 589)
WORK = "7+9=16 4+8+1=13 3+5+1=9"


def response(think, answer="936", end="<eos>"):
    return f"<think>{think}</think><answer>{answer}</answer>{end}"


# name, response, consistent
CONSISTENCY_CASES = [
    ("right", response(WORK), 1),
    ("right_spaces_around_answer", response(WORK, " 936 "), 1),
    ("text_after_eos_ignored", response(WORK) + "<answer>1</answer>", 1),
    # the answer disagrees with the (right) steps
    ("answer_off_by_ten", response(WORK, "926"), 0),
    ("answer_digits_reversed", response(WORK, "639"), 0),
    ("answer_leading_zero", response(WORK, "0936"), 0),
    ("answer_is_last_column_only", response(WORK, "9"), 0),
    # a step's arithmetic is wrong
    ("sum_wrong", response("7+9=15 4+8+1=13 3+5+1=9"), 0),
    ("carry_dropped_then_consistent", response("7+9=16 4+8=12 3+5+1=9", "926"), 0),
    ("carry_dropped_answer_right_by_luck", response("7+9=16 4+8=12 3+5+1=9", "936"), 0),
    ("carry_added_without_cause", response("7+9=16 4+8+1=13 3+5+1+1=10", "1036"), 0),
    ("carry_into_units", response("7+9+1=17 4+8+1=13 3+5+1=9", "937"), 0),
    ("sum_with_leading_zero", response("7+9=16 4+8+1=13 3+5+1=09", "936"), 0),
    # the steps are not this problem's columns
    ("columns_left_to_right", response("3+5=8 4+8=12 7+9+1=17", "8217"), 0),
    ("operands_swapped_in_a_column", response("9+7=16 4+8+1=13 3+5+1=9"), 0),
    ("a_column_missing", response("7+9=16 4+8+1=13", "136"), 0),
    ("an_extra_column", response(WORK + " 0+0=0", "0936"), 0),
    ("another_problems_columns", response("1+1=2 1+1=2 1+1=2", "222"), 0),
    # malformed: no reasoning to agree with, or not in the protocol
    ("direct_answer", "<answer>936</answer><eos>", 0),
    ("empty_think", response(""), 0),
    ("blank_think", response("  "), 0),
    ("double_space", response("7+9=16  4+8+1=13 3+5+1=9"), 0),
    ("trailing_space", response(WORK + " "), 0),
    ("prose_in_think", response("so " + WORK), 0),
    ("truncated", response(WORK, end=""), 0),
    ("two_answers", f"<think>{WORK}</think><answer>936</answer><answer>936</answer><eos>", 0),
    ("fullwidth_digit", response("7+9=16 4+8+1=13 3+5+1=９"), 0),
    ("two_digit_column", response("7+9=16 4+8+1=13 13+15=28", "2836"), 0),
    ("huge_sum", response("7+9=16 4+8+1=13 3+5+1=" + "9" * 500, "9" * 500 + "36"), 0),
]


@pytest.mark.parametrize("name, text, consistent", CONSISTENCY_CASES, ids=[c[0] for c in CONSISTENCY_CASES])
def test_consistency_rule_on_adversarial_responses(name, text, consistent):
    assert addition_consistency(text, OPERANDS) == consistent


def test_consistency_with_operands_of_different_lengths_and_a_final_carry():
    # 95 + 7 = 102: columns 5+7=12, 9+0+1=10; the shorter operand is read with a leading zero
    assert addition_consistency(response("5+7=12 9+0+1=10", "102"), (95, 7)) == 1.0
    assert addition_consistency(response("5+7=12 9+1=10", "102"), (95, 7)) == 0.0


def test_consistency_agrees_with_the_tasks_worked_solutions():
    import numpy as np

    from minimoe.tasks import AdditionTask

    task = AdditionTask(4)
    rng = np.random.default_rng(0)
    for problem in task.sample(rng, 50):
        assert addition_consistency(task.solution(problem, "worked") + "<eos>", problem.operands) == 1.0
        slip = task.solution(problem, "worked_with_error", rng) + "<eos>"  # self-consistent, one carry wrong
        assert addition_consistency(slip, problem.operands) == 0.0


def test_parse_addition_steps():
    assert parse_addition_steps(response(WORK)) == [(7, 9, 0, 16), (4, 8, 1, 13), (3, 5, 1, 9)]
    assert parse_addition_steps("<answer>936</answer><eos>") is None
    assert parse_addition_steps(response("7+9=16,4+8+1=13")) is None


def test_consistency_rejects_a_non_string():
    with pytest.raises(TypeError, match="addition_consistency"):
        addition_consistency(None, OPERANDS)
