"""The collapse guard of the GRPO loop (issue 19): RL refuses a base that never answers right, warns when a run's
groups stop carrying accuracy signal or its accuracy falls while the format reward holds, and stays silent on
the committed base models."""

import os

import numpy as np
import pytest

import minimoe
from minimoe.checkpoint import load_checkpoint
from minimoe.model import ModelConfig, Transformer
from minimoe.preset import load_preset
from minimoe.rl import (GRPOConfig, WeakBaseError, accuracy_signal, collapse_signs, control_step_size,
                        train_grpo)
from minimoe.tasks import AdditionTask, Tokenizer
from minimoe.validation import ConfigError

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lessons", "data")
SMALL_RUN = dict(prompts_per_step=8, group_size=4, warmup_steps=0, max_new_tokens=12, checkpoint_every=0)


def untrained_model():
    return Transformer(ModelConfig(vocab_size=Tokenizer().vocab_size, dim=16, n_layers=1, n_heads=2,
                                   n_routed_experts=4, moe_inter_dim=8, max_seq_len=48))


def record(accuracy, format_rate=1.0, zero_accuracy_share=0.0):
    return {"accuracy": accuracy, "format_rate": format_rate, "zero_accuracy_share": zero_accuracy_share}


def test_accuracy_signal_counts_groups_without_a_right_answer_and_groups_that_teach():
    accuracy = np.array([0, 0, 0, 0,  # no right answer: nothing but format to learn from
                         1, 0, 0, 0,  # right and wrong: a group that teaches accuracy
                         1, 1, 1, 1], dtype=float)  # all right: equal rewards, no signal either
    signal = accuracy_signal(accuracy, (3, 4))
    assert signal == {"zero_accuracy_share": pytest.approx(1 / 3), "signal_share": pytest.approx(1 / 3)}


def test_rl_refuses_an_untrained_base_before_any_update():
    model = untrained_model()
    before = {name: p.data.copy() for name, p in model.named_parameters()}
    with pytest.raises(WeakBaseError, match="too weak for RL.*min_base_pass_at_g=0.1.*allow_weak_base"):
        train_grpo(model, AdditionTask(3), GRPOConfig(steps=2, **SMALL_RUN), progress=False)
    assert all(np.array_equal(p.data, before[name]) for name, p in model.named_parameters())


def test_allow_weak_base_runs_anyway_and_records_the_warning(capsys):
    history = train_grpo(untrained_model(), AdditionTask(3), GRPOConfig(steps=1, allow_weak_base=True, **SMALL_RUN),
                         progress=False)
    assert [w["kind"] for w in history["warnings"]] == ["weak_base"] and history["warnings"][0]["step"] == 1
    assert "WARNING at step 1: only 0% of the first step's 8 groups" in capsys.readouterr().err
    assert history["steps"][0]["zero_accuracy_share"] == 1.0


@pytest.mark.parametrize("preset, base", [("v3", "v3_base_addition3"), ("classic", "base_addition3")])
def test_the_committed_base_models_pass_the_floor(preset, base, capsys):
    """The default (V3) base of lesson 10 and the classic base of lessons 11, 12 and 15, with their presets'
    GRPO settings: no warning, and most of the first step's groups hold a right answer (held-out pass@8 of the V3
    base is ~0.71, of the classic one ~0.96)."""
    model = load_checkpoint(os.path.join(DATA, base), restore_random_state=False)[0]
    minimoe.manual_seed(0)
    config = GRPOConfig(steps=1, warmup_steps=0, checkpoint_every=0, **load_preset(preset)["grpo"])
    history = train_grpo(model, AdditionTask(3), config, progress=False)
    assert history["warnings"] == [] and "WARNING" not in capsys.readouterr().err
    assert history["steps"][0]["zero_accuracy_share"] <= 0.4


def test_the_committed_weak_base_is_refused():
    """Lesson 10's weak base (the V3 model after 100 pretraining steps) is refused before any update."""
    model = load_checkpoint(os.path.join(DATA, "v3_weak_base_addition3"), restore_random_state=False)[0]
    before = {name: p.data.copy() for name, p in model.named_parameters()}
    minimoe.manual_seed(0)
    config = GRPOConfig(steps=1, warmup_steps=0, checkpoint_every=0, **load_preset("v3")["grpo"])
    with pytest.raises(WeakBaseError, match="only 0% of the first step's 16 groups"):
        train_grpo(model, AdditionTask(3), config, progress=False)
    assert all(np.array_equal(p.data, before[name]) for name, p in model.named_parameters())


def test_collapse_signs_fire_on_a_collapse_and_not_on_a_healthy_run():
    rising = [record(min(0.95, 0.2 + 0.01 * s), format_rate=min(1.0, 0.4 + 0.01 * s)) for s in range(150)]
    assert all(collapse_signs(rising[:n]) == [] for n in range(1, 151))
    plateau_with_noise = [record(0.95 + 0.03 * (-1) ** s) for s in range(60)]
    assert collapse_signs(plateau_with_noise) == []

    # the MLA run: accuracy up to ~0.4 by step 15, down to ~0.05 by step 25, format rising all along
    accuracy = np.concatenate([np.linspace(0.05, 0.4, 15), np.linspace(0.4, 0.05, 10), np.full(10, 0.03)])
    collapsing = [record(a, format_rate=min(1.0, 0.5 + 0.03 * s)) for s, a in enumerate(accuracy)]
    fired = {n: [kind for kind, _ in collapse_signs(collapsing[:n])] for n in range(1, 36)}
    assert fired[20] == [] and "accuracy_falling" in fired[35]
    message = dict(collapse_signs(collapsing))["accuracy_falling"]
    assert "accuracy fell from" in message and "lower lr" in message

    format_only = [record(0.0, zero_accuracy_share=0.95) for _ in range(10)]
    assert [kind for kind, _ in collapse_signs(format_only)] == ["no_accuracy_signal"]
    assert collapse_signs(format_only, window=0) == [] and collapse_signs(format_only[:9]) == []


def test_accuracy_falling_is_not_reported_when_the_format_fell_too():
    """Accuracy and format falling together is a different failure (e.g. truncation), not format farming."""
    accuracy = [0.4] * 10 + [0.05] * 10
    form = [0.9] * 10 + [0.3] * 10
    assert collapse_signs([record(a, f) for a, f in zip(accuracy, form)]) == []


@pytest.mark.parametrize("field, value, expected", [
    ("min_base_pass_at_g", 1.5, "min_base_pass_at_g=1.5 must be"),
    ("min_base_pass_at_g", -0.1, "min_base_pass_at_g=-0.1 must be"),
    ("allow_weak_base", "yes", "allow_weak_base='yes' must be true or false"),
    ("collapse_window", -1, "collapse_window=-1 must be ≥ 0"),
    ("target_kl", -0.01, "target_kl=-0.01 must be ≥ 0"),
])
def test_the_guard_settings_are_validated(field, value, expected):
    with pytest.raises(ConfigError, match=expected):
        GRPOConfig(**{field: value})


def test_the_step_control_halves_after_a_large_move_and_recovers_to_the_schedule():
    target = 0.01
    assert control_step_size(1.0, 0.05, target) == 0.5  # moved 5× the target: halve
    assert control_step_size(0.5, 0.015, target) == 0.5  # within [target/2, 2·target]: keep
    assert control_step_size(0.5, 0.001, target) == 0.75  # barely moved: grow
    assert control_step_size(0.9, 0.001, target) == 1.0  # never above the schedule
    assert control_step_size(1 / 64, 1.0, target) == 1 / 64  # a floor: the run never stops learning
    assert control_step_size(0.3, 0.05, 0.0) == 0.3 and control_step_size(0.3, None, target) == 0.3  # off


def test_the_step_control_lowers_the_learning_rate_of_a_run_that_moves_too_fast():
    """With a tiny target every update moves the policy too far, so the rate falls below the schedule's, and the
    measured shift is a KL: never negative. With the control off the rate is the schedule's."""
    model = load_checkpoint(os.path.join(DATA, "base_addition3"), restore_random_state=False)[0]
    settings = dict(steps=3, prompts_per_step=4, group_size=4, warmup_steps=0, lr=1e-3, min_lr=1e-3,
                    checkpoint_every=0, min_base_pass_at_g=0.0)
    controlled = train_grpo(model, AdditionTask(3), GRPOConfig(target_kl=1e-9, **settings), progress=False)["steps"]
    assert [s["lr"] for s in controlled] == pytest.approx([1e-3, 5e-4, 2.5e-4])
    assert all(s["policy_shift"] > 2e-9 for s in controlled)
    free = train_grpo(model, AdditionTask(3), GRPOConfig(target_kl=0.0, **settings), progress=False)["steps"]
    assert [s["lr"] for s in free] == pytest.approx([1e-3] * 3) and free[0]["policy_shift"] is None
