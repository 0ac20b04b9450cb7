"""The R1 rule rewards on well-formed and adversarial responses. Every expected value below is worked out by
hand from the rules in minimoe/rewards.py's docstring; the reference answer is "936" throughout."""

import pytest
from hypothesis import given, settings, strategies as st

from minimoe.rewards import (SPECIAL_TOKENS, Reward, accuracy_reward, combined_reward, format_reward,
                             is_truncated, parse_answer, thinks_first)

REF = "936"
WORK = "7+9=16 4+8+1=13 3+5+1=9"
HUGE = "9" * 5000

# name, response, parse_answer, accuracy, format, thinks_first, is_truncated
CASES = [
    ("well_formed", f"<think>{WORK}</think><answer>936</answer><eos>", "936", 1, 1, True, False),
    ("well_formed_wrong", f"<think>{WORK}</think><answer>926</answer><eos>", "926", 0, 1, True, False),
    ("direct_no_think", "<answer>936</answer><eos>", "936", 1, 0, False, False),
    ("empty", "", None, 0, 0, False, True),
    ("only_eos", "<eos>", None, 0, 0, False, False),
    # missing tags
    ("no_answer_tags", f"<think>{WORK}</think>936<eos>", None, 0, 0, True, False),
    ("no_answer_close", "<think>a</think><answer>936<eos>", None, 0, 0, True, False),
    ("no_answer_open", "<think>a</think>936</answer><eos>", None, 0, 0, True, False),
    ("no_think_open", "7+9=16</think><answer>936</answer><eos>", "936", 1, 0, False, False),
    ("no_think_close", "<think>7+9=16<answer>936</answer><eos>", "936", 1, 0, True, False),
    ("bare_number", "936<eos>", None, 0, 0, False, False),
    ("tag_without_bracket", "<answer>936</answer<eos>", None, 0, 0, False, False),
    ("tag_in_capitals", "<ANSWER>936</ANSWER><eos>", None, 0, 0, False, False),
    # nesting, order, repeats
    ("nested_answer", "<think>a</think><answer><answer>936</answer></answer><eos>", None, 0, 0, True, False),
    ("nested_think", "<think><think>a</think></think><answer>936</answer><eos>", "936", 1, 0, True, False),
    ("answer_inside_think", "<think>a<answer>936</answer></think><eos>", "936", 1, 0, True, False),
    ("answer_before_think", "<answer>936</answer><think>a</think><eos>", "936", 1, 0, False, False),
    ("closing_before_opening", "<think>a</think></answer>936<answer><eos>", None, 0, 0, True, False),
    ("two_answers", "<think>a</think><answer>1</answer><answer>936</answer><eos>", None, 0, 0, True, False),
    ("two_same_answers", "<think>a</think><answer>936</answer><answer>936</answer><eos>", None, 0, 0, True,
     False),
    ("two_thinks", "<think>a</think><think>b</think><answer>936</answer><eos>", "936", 1, 0, True, False),
    # text around the blocks
    ("text_after_answer", "<think>a</think><answer>936</answer>936<eos>", "936", 1, 0, True, False),
    ("text_between_blocks", "<think>a</think>so<answer>936</answer><eos>", "936", 1, 0, True, False),
    ("space_before_think", " <think>a</think><answer>936</answer><eos>", "936", 1, 0, False, False),
    # after EOS: ignored, as the loss ignores it
    ("text_after_eos", "<think>a</think><answer>936</answer><eos>123", "936", 1, 1, True, False),
    ("pads_after_eos", "<think>a</think><answer>936</answer><eos><pad><pad>", "936", 1, 1, True, False),
    ("answer_only_after_eos", "<think>a</think><eos><answer>936</answer>", None, 0, 0, True, False),
    ("second_answer_after_eos", "<think>a</think><answer>1</answer><eos><answer>936</answer>", "1", 0, 1, True,
     False),
    ("everything_after_eos", "<eos><think>a</think><answer>936</answer><eos>", None, 0, 0, False, False),
    # the answer's text: compared as a string, never converted
    ("huge_number", f"<think>a</think><answer>{HUGE}</answer><eos>", HUGE, 0, 1, True, False),
    ("leading_zero", "<answer>0936</answer><eos>", "0936", 0, 0, False, False),
    ("plus_sign", "<answer>+936</answer><eos>", "+936", 0, 0, False, False),
    ("minus_sign", "<answer>-936</answer><eos>", "-936", 0, 0, False, False),
    ("decimal", "<answer>936.0</answer><eos>", "936.0", 0, 0, False, False),
    ("space_inside", "<answer>9 36</answer><eos>", "9 36", 0, 0, False, False),
    ("spaces_around", "<think>a</think><answer> 936  </answer><eos>", " 936  ", 1, 1, True, False),
    ("tab", "<answer>\t936</answer><eos>", "\t936", 0, 0, False, False),
    ("newline", "<answer>936\n</answer><eos>", "936\n", 0, 0, False, False),
    ("empty_answer", "<think>a</think><answer></answer><eos>", "", 0, 0, True, False),
    ("blank_answer", "<think>a</think><answer>  </answer><eos>", "  ", 0, 0, True, False),
    ("empty_think", "<think></think><answer>936</answer><eos>", "936", 1, 0, True, False),
    ("blank_think", "<think>   </think><answer>936</answer><eos>", "936", 1, 0, True, False),
    # special tokens where they do not belong
    ("bos_in_think", "<think>a<bos></think><answer>936</answer><eos>", "936", 1, 0, True, False),
    ("pad_in_answer", "<think>a</think><answer>936<pad></answer><eos>", "936<pad>", 0, 0, True, False),
    # truncated by the token budget (no EOS)
    ("truncated_in_think", "<think>7+9=16 4+8", None, 0, 0, True, True),
    ("truncated_in_answer", "<think>a</think><answer>93", None, 0, 0, True, True),
    ("truncated_after_answer", "<think>a</think><answer>936</answer>", "936", 1, 0, True, True),
    # unicode junk
    ("fullwidth_digits", "<think>a</think><answer>９３６</answer><eos>", "９３６", 0, 1, True, False),
    ("arabic_indic_digits", "<answer>٩٣٦</answer><eos>", "٩٣٦", 0, 0, False, False),
    ("zero_width_space", "<answer>936\u200b</answer><eos>", "936\u200b", 0, 0, False, False),
    ("no_break_space", "<answer>\xa0936</answer><eos>", "\xa0936", 0, 0, False, False),
    ("unicode_think", "<think>é ✓ 🙂 \x00</think><answer>936</answer><eos>", "936", 1, 1, True, False),
    ("lookalike_tag", "<think>a</think>＜answer＞936＜/answer＞<eos>", None, 0, 0, True, False),
]


@pytest.mark.parametrize("name, text, answer, accuracy, form, thinks, truncated", CASES,
                         ids=[case[0] for case in CASES])
def test_rewards_on_adversarial_responses(name, text, answer, accuracy, form, thinks, truncated):
    assert parse_answer(text) == answer
    assert accuracy_reward(text, REF) == accuracy
    assert format_reward(text) == form
    assert thinks_first(text) is thinks
    assert is_truncated(text) is truncated
    assert combined_reward(text, REF) == Reward(accuracy + 0.1 * form, accuracy, form)


def test_huge_correct_answer_is_compared_exactly():
    reference = "1" + "0" * 3000
    assert accuracy_reward(f"<answer>{reference}</answer><eos>", reference) == 1.0
    assert accuracy_reward(f"<answer>{reference}0</answer><eos>", reference) == 0.0


def test_combined_reward_weights_and_components():
    text = f"<think>{WORK}</think><answer>936</answer><eos>"
    assert combined_reward(text, REF, accuracy_weight=2.0, format_weight=0.5) == Reward(2.5, 1.0, 1.0)
    assert combined_reward(text, "937", accuracy_weight=2.0, format_weight=0.5) == Reward(0.5, 0.0, 1.0)
    assert combined_reward(text, REF, format_weight=0.0).total == 1.0


def test_reference_may_be_a_verifier():
    seen = []

    def verifier(answer):
        seen.append(answer)
        return answer == "3*7+5"

    assert accuracy_reward("<answer>3*7+5</answer><eos>", verifier) == 1.0
    assert accuracy_reward("<answer>5+7*3</answer><eos>", verifier) == 0.0
    assert accuracy_reward("<answer>3*7+5<eos>", verifier) == 0.0  # malformed: the verifier is not asked
    assert seen == ["3*7+5", "5+7*3"]


@pytest.mark.parametrize("fn", [parse_answer, format_reward, thinks_first, is_truncated,
                                lambda text: accuracy_reward(text, REF)])
def test_non_string_response_is_a_type_error(fn):
    with pytest.raises(TypeError, match="str"):
        fn([5, 10, 6])


def test_bad_reference_is_a_type_error():
    with pytest.raises(TypeError, match="reference"):
        accuracy_reward("<answer>936</answer><eos>", 936)


# Random strings over the protocol's pieces: the rules never raise, return 0.0 or 1.0, and agree with
# each other (a well-formed response has a parsable answer, thinks first and was not truncated).
PIECES = st.sampled_from(list(SPECIAL_TOKENS) + ["936", "9", "0", " ", "+", "=", "é", "\n", "<", ">"])


@settings(max_examples=400, deadline=None)
@given(st.lists(PIECES, max_size=12).map("".join))
def test_rules_are_total_and_consistent(text):
    answer = parse_answer(text)
    accuracy, form = accuracy_reward(text, REF), format_reward(text)
    assert accuracy in (0.0, 1.0) and form in (0.0, 1.0)
    assert (accuracy == 1.0) == (answer is not None and answer.strip(" ") == REF)
    if form == 1.0:
        assert answer is not None and answer.strip() and thinks_first(text) and not is_truncated(text)
        body = text.split("<eos>", 1)[0]
        assert body.startswith("<think>") and body.endswith("</answer>")
        assert [body.count(tag) for tag in SPECIAL_TOKENS] == [0, 0, 0, 1, 1, 1, 1]
