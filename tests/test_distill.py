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


# ---------------------------------------------------------------------------------------------------------------
# rejection sampling, on a stub policy whose outputs are known

import numpy as np  # noqa: E402

from minimoe.distill import rejection_sample, sft, SFTConfig  # noqa: E402
from minimoe.tasks import AdditionTask, Corpus, Tokenizer  # noqa: E402

TASK = AdditionTask(3)
P1, P2 = TASK.problem(347, 589), TASK.problem(123, 456)  # 936 and 579
STUB = {
    P1.prompt: [response(WORK) + "<pad>", response(WORK), response("7+9=16 4+8=12 3+5+1=9"),  # right, right, lucky
                response(WORK, end="")],                                                        # truncated
    P2.prompt: ["<answer>579</answer><eos>", response("3+6=9 2+5=7 1+4=5", "578"),  # direct, wrong answer
                response("3+6=9 2+5=7 1+4=5", "579"), "<think>3+6=9<eos>"],           # accepted, malformed
}


def stub_policy(problems, k):
    assert k == 4
    return [text for p in problems for text in STUB[p.prompt]]


def test_rejection_sampling_keeps_exactly_the_right_consistent_responses():
    result = rejection_sample(stub_policy, TASK, [P1, P2], k=4)
    assert result.accepted.tolist() == [2, 1]
    assert result.kept.tolist() == [1, 1]  # P1's two right answers are one text once <eos> ends them
    assert result.reasons == {"accepted": 3, "malformed": 3, "wrong": 1, "inconsistent": 1}
    assert result.acceptance_rate == 3 / 8
    assert result.prompt_coverage == 1.0
    assert result.corpus.prompts == ["<bos>347+589=", "<bos>123+456="]
    assert result.corpus.completions == [response(WORK), response("3+6=9 2+5=7 1+4=5", "579")]
    summary = result.summary()
    assert summary["accepted_per_prompt"] == [0, 1, 1, 0, 0] and summary["corpus_size"] == 2


def test_rejection_sampling_can_keep_duplicates_and_counts_uncovered_prompts():
    result = rejection_sample(stub_policy, TASK, [P1, P2, P1], k=4, unique=False)
    assert result.kept.tolist() == [2, 1, 2]
    assert len(result.corpus) == 5
    only_wrong = rejection_sample(lambda problems, k: [response(WORK, "1")] * (len(problems) * k), TASK, [P1], k=4)
    assert only_wrong.prompt_coverage == 0.0 and len(only_wrong.corpus) == 0
    assert only_wrong.reasons["wrong"] == 4


def test_rejection_sampling_refuses_bad_input():
    with pytest.raises(ValueError, match="k must be"):
        rejection_sample(stub_policy, TASK, [P1], k=0)
    with pytest.raises(ValueError, match="returned 3 responses"):
        rejection_sample(lambda problems, k: ["x"] * 3, TASK, [P1], k=4)
    with pytest.raises(ValueError, match="addition"):
        from minimoe.tasks import CountdownTask
        rejection_sample(stub_policy, CountdownTask(), [P1], k=4)


def test_rejection_sampling_from_a_model_samples_k_per_prompt():
    import minimoe
    from minimoe.model import ModelConfig, Transformer

    minimoe.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=26, dim=16, n_layers=1, n_heads=2, ffn="dense", inter_dim=16))
    result = rejection_sample(model, TASK, [P1, P2, P1], k=3, max_new_tokens=8)
    assert sum(result.reasons.values()) == 9
    assert result.accepted.shape == (3,)


# ---------------------------------------------------------------------------------------------------------------
# SFT: the loss is the completion tokens' alone

def test_sft_loss_counts_only_completion_tokens():
    import minimoe
    from minimoe.model import ModelConfig, Transformer

    minimoe.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=26, dim=16, n_layers=1, n_heads=2, ffn="dense", inter_dim=16))
    tokenizer = Tokenizer()
    prompts = ["<bos>347+589=", "<bos>12+3="]
    completions = [response(WORK), "<answer>15</answer><eos>"]
    corpus = Corpus([P1, P1], ["sampled"] * 2, prompts, completions)

    # by hand: -log p of every completion token given everything before it, averaged over completion tokens
    nll, all_tokens = [], []
    for prompt, completion in zip(prompts, completions):
        p_ids, c_ids = tokenizer.encode(prompt), tokenizer.encode(completion)
        ids = p_ids + c_ids
        logits = np.asarray(model(minimoe.backend.get_backend().asarray(np.array([ids[:-1]]))).data)[0]
        logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
            - logits.max(-1, keepdims=True)
        token_nll = -logp[np.arange(len(ids) - 1), ids[1:]]  # position t predicts token t + 1
        nll += token_nll[len(p_ids) - 1:].tolist()  # the first completion token is predicted at len(prompt) - 1
        all_tokens += token_nll.tolist()
    expected = np.mean(nll)
    assert abs(expected - np.mean(all_tokens)) > 1e-3  # the prompt would change the loss: the test can tell

    history = sft(model, corpus, SFTConfig(steps=1, batch_size=8, warmup_steps=0))
    assert abs(history["loss"][0] - expected) < 1e-5


def test_sft_learns_its_corpus_and_refuses_an_empty_one():
    import minimoe
    from minimoe.model import ModelConfig, Transformer

    minimoe.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=26, dim=16, n_layers=1, n_heads=2, ffn="dense", inter_dim=32))
    corpus = Corpus([P1], ["sampled"], ["<bos>347+589="], [response(WORK)])
    history = sft(model, corpus, SFTConfig(steps=60, batch_size=1, lr=1e-2, warmup_steps=0))
    assert history["loss"][-1] < 0.2 * history["loss"][0]
    with pytest.raises(ValueError, match="empty"):
        sft(model, Corpus([], [], [], []))


# ---------------------------------------------------------------------------------------------------------------
# the loosened rules, and GRPO exploiting one

from pathlib import Path  # noqa: E402

from minimoe.distill import LoosenedTask, first_number_judge, self_consistency_judge  # noqa: E402

DATA = Path(__file__).resolve().parents[1] / "lessons" / "data"


def test_loosened_judges_pay_what_the_strict_rule_refuses():
    lucky_wrong = response("7+9=16 4+8=12 3+5=9", "926")  # two carries dropped, the answer follows the steps
    assert self_consistency_judge(P1, lucky_wrong) == 1.0 and TASK.reward(P1, lucky_wrong).accuracy == 0.0
    assert self_consistency_judge(P1, response(WORK, "926")) == 0.0  # the answer must follow the written steps
    assert self_consistency_judge(P1, "<answer>936</answer><eos>") == 0.0  # no steps, nothing to follow
    assert first_number_judge(P1, "936<eos>") == 1.0 and TASK.reward(P1, "936<eos>").accuracy == 0.0
    assert first_number_judge(P1, response(WORK)) == 0.0  # a right worked solution starts with "7"
    task = LoosenedTask(self_consistency_judge)
    assert task.reward(P1, lucky_wrong).accuracy == 1.0 and task.true_accuracy == [0.0]


def test_grpo_exploits_a_self_consistency_judge():
    """From the committed base: within 25 GRPO steps the policy learns that a judge which only checks that the
    answer follows from the written steps pays for wrong steps too. Paid reward up, true accuracy not up."""
    import minimoe
    from minimoe.checkpoint import load_checkpoint
    from minimoe.distill import reward_hacking_run
    from minimoe.rl import GRPOConfig

    minimoe.manual_seed(0)
    model = load_checkpoint(DATA / "base_addition3", restore_random_state=False)[0]
    run = reward_hacking_run(model, self_consistency_judge, GRPOConfig(steps=25, log_kl=False), n_samples=8)
    loose, true = np.array(run["loose_reward"]), np.array(run["true_accuracy"])
    assert loose[-5:].mean() > loose[:5].mean() + 0.3
    assert true[-5:].mean() <= true[:5].mean() + 0.02
    exploits = [s for s in run["samples"] if s["loose"] == 1.0 and s["true"] == 0.0]
    assert exploits, run["samples"]


# ---------------------------------------------------------------------------------------------------------------
# `python -m minimoe distill`, end to end on a tiny configuration, and its refusals

import json  # noqa: E402

from minimoe.cli import main  # noqa: E402

TINY = {"pretrain": {"steps": 3, "warmup_steps": 1, "eval_every": 0, "batch_size": 8},
        "grpo": {"prompts_per_step": 2, "group_size": 2, "warmup_steps": 1},
        "eval": {"n_problems": 4, "n_samples": 2, "k": 2},
        "distill": {"n_prompts": 8, "k": 2, "arm_seconds": 0, "grpo_steps": 2, "sft_steps": 2, "sft_batch_size": 4}}
TEACHER = str(DATA / "teacher_addition3")


def write_config(tmp_path, config):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    return str(path)


def test_distill_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    main(["distill", "--teacher", TEACHER, "--out", str(out), "--config", write_config(tmp_path, TINY), "--quiet"])
    summary = json.loads((out / "summary.json").read_text())
    arms = [row["arm"] for row in summary["arms"]]
    assert arms == ["teacher", "student base", "(a) GRPO", "(b) SFT on teacher", "(c) SFT then GRPO"]
    keys = {"arm", "pass_at_1", "accuracy", "pass_at_k", "mean_length", "consistency", "seconds",
            "activated_parameters"}
    for row in summary["arms"]:
        assert keys <= set(row)
        assert all(0 <= row[key] <= 1 for key in ("pass_at_1", "accuracy", "pass_at_k", "consistency"))
    teacher, student = summary["arms"][0], summary["arms"][1]
    assert student["activated_parameters"] <= teacher["activated_parameters"] / 4
    assert teacher["accuracy"] > 0.5  # the committed teacher is the RL-trained demo model
    assert summary["rejection"]["responses"] == 16 and summary["steps"] == {"grpo": 2, "sft": 2, "c_sft": 1,
                                                                             "c_grpo": 1}
    for name in ("distillation.png", "student_base.npz", "arm_a_grpo.npz", "arm_b_sft.npz", "arm_c_sft_grpo.npz"):
        assert (out / name).stat().st_size > 0, name
    with pytest.raises(SystemExit):  # the folder holds a run now
        main(["distill", "--teacher", TEACHER, "--out", str(out), "--config", write_config(tmp_path, TINY)])
    assert "already holds a run" in capsys.readouterr().err


def refused(tmp_path, capsys, argv):
    out = tmp_path / "refused"
    with pytest.raises(SystemExit) as stop:
        main(["distill", "--out", str(out), "--quiet", *argv])
    assert stop.value.code == 2
    assert not (out / "student_base.npz").exists() and not (out / "summary.json").exists()  # no work done
    return capsys.readouterr().err


def test_distill_refuses_a_missing_teacher(tmp_path, capsys):
    error = refused(tmp_path, capsys, ["--teacher", str(tmp_path / "nope")])
    assert "nope" in error


def test_distill_refuses_a_student_larger_than_the_teacher(tmp_path, capsys):
    config = {**TINY, "model": {"dim": 128, "inter_dim": 512}}
    error = refused(tmp_path, capsys, ["--teacher", TEACHER, "--config", write_config(tmp_path, config)])
    assert "more than the teacher's" in error and "activated parameters" in error


def test_distill_refuses_a_teacher_that_cannot_hold_a_response(tmp_path, capsys):
    from minimoe.checkpoint import save_checkpoint
    from minimoe.model import ModelConfig, Transformer

    save_checkpoint(tmp_path / "short", Transformer(ModelConfig(vocab_size=26, max_seq_len=24)))
    error = refused(tmp_path, capsys, ["--teacher", str(tmp_path / "short"), "--config",
                                       write_config(tmp_path, TINY)])
    assert "teacher's max_seq_len=24" in error


def test_distill_refuses_an_empty_corpus_after_filtering(tmp_path, capsys):
    import minimoe
    from minimoe.checkpoint import save_checkpoint
    from minimoe.model import ModelConfig, Transformer

    minimoe.manual_seed(0)
    save_checkpoint(tmp_path / "untrained", Transformer(ModelConfig(vocab_size=26)))  # writes nothing well-formed
    error = refused(tmp_path, capsys, ["--teacher", str(tmp_path / "untrained"), "--config",
                                       write_config(tmp_path, TINY)])
    assert "accepted none of the teacher's 16 responses" in error


def test_steps_to_reach_smooths_over_a_window():
    from minimoe.distill import steps_to_reach

    history = {"steps": [{"accuracy": a} for a in [0.0] * 5 + [1.0] * 10]}
    assert steps_to_reach(history, 0.9, window=10) == 14  # steps 5..14 average 0.9 (nine ones, one zero)
    assert steps_to_reach(history, 0.9, window=20) is None
    assert steps_to_reach({"steps": [{"accuracy": 0.5}] * 30}, 0.9) is None
