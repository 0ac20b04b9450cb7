"""Every setting is checked before any work starts, and a bad one is refused with a message that names the section,
the field, the value and what was expected: the configuration dataclasses, the evaluation and sampling settings,
and the command line (whose errors are one line, `minimoe: error: …`, exit status 2)."""

import dataclasses
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

import minimoe
from minimoe import cli
from minimoe.checkpoint import load_checkpoint
from minimoe.evaluate import check_evaluation, evaluate
from minimoe.generate import generate, sample_next
from minimoe.model import ModelConfig, Transformer
from minimoe.rl import GRPOConfig
from minimoe.tasks import AdditionTask
from minimoe.train import PretrainConfig
from minimoe.validation import Checks, ConfigError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_MODEL = {"dim": 16, "n_layers": 1, "n_heads": 2, "n_routed_experts": 4, "moe_inter_dim": 8}
TINY = {"model": TINY_MODEL,
        "pretrain": {"steps": 2, "batch_size": 4, "warmup_steps": 1, "eval_every": 0, "eval_batch_size": 4,
                     "checkpoint_every": 2},
        "grpo": {"steps": 1, "prompts_per_step": 2, "group_size": 2, "warmup_steps": 0, "max_new_tokens": 8},
        "eval": {"n_problems": 2, "n_samples": 2, "k": 1, "max_new_tokens": 8}}


# ---------------------------------------------------------------------------------------------------------------
# the configuration dataclasses

@pytest.mark.parametrize("cls, field, value, expected", [
    (ModelConfig, "dim", "64", "dim='64' must be an integer (got str)"),
    (ModelConfig, "dim", True, "dim=True must be an integer (got bool)"),
    (ModelConfig, "n_layers", 2.0, "n_layers=2.0 must be an integer (got float)"),
    (ModelConfig, "dropout", math.nan, "dropout=nan must be a finite number"),
    (ModelConfig, "rope_theta", 0, "rope_theta=0 must be > 0"),
    (ModelConfig, "capacity_factor", -1.0, "capacity_factor=-1.0 must be > 0"),
    (ModelConfig, "mla_absorb", 1, "mla_absorb=1 must be true or false"),
    (ModelConfig, "attention", "MLA", "attention='MLA' must be one of 'mha', 'mla'"),
    (ModelConfig, "n_heads", 64, "the head size dim / n_heads = 1 must be even"),
    (PretrainConfig, "batch_size", 0, "batch_size=0 must be ≥ 1"),
    (PretrainConfig, "steps", "1000", "steps='1000' must be an integer"),
    (PretrainConfig, "lr", math.inf, "lr=inf must be a finite number"),
    (PretrainConfig, "lr", True, "lr=True must be a finite number (got bool)"),
    (PretrainConfig, "min_lr", 1.0, "min_lr=1.0 must be ≤ lr=0.003"),
    (PretrainConfig, "seed", -5, "seed=-5 must be ≥ 0"),
    (PretrainConfig, "grad_clip", 0, "grad_clip=0 must be > 0"),
    (PretrainConfig, "mix", {"direct": 2.0}, "mix={'direct': 2.0} must map styles"),
    (GRPOConfig, "prompts_per_step", 0, "prompts_per_step=0 must be ≥ 1"),
    (GRPOConfig, "epsilon_high", -5, "epsilon_high=-5 must be ≥ 0"),
    (GRPOConfig, "epsilon", 1.5, "epsilon=1.5 must be in [0, 1)"),
    (GRPOConfig, "temperature", math.nan, "temperature=nan must be a finite number"),
    (GRPOConfig, "max_new_tokens", 0, "max_new_tokens=0 must be ≥ 1"),
    (GRPOConfig, "log_kl", "yes", "log_kl='yes' must be true or false"),
    (GRPOConfig, "warmup_steps", 500, "warmup_steps=500 must be ≤ steps × mu = 150"),
])
def test_a_bad_field_is_refused_naming_the_section_field_value_and_expectation(cls, field, value, expected):
    with pytest.raises(ConfigError) as error:
        cls(**{field: value})
    assert str(error.value).startswith(cls.__name__ + ": ") and expected in str(error.value)
    assert isinstance(error.value, ValueError)  # callers that catch ValueError keep working


def test_every_problem_is_reported_at_once_and_good_values_of_other_types_pass():
    with pytest.raises(ConfigError) as error:
        GRPOConfig(prompts_per_step=0, group_size=1, lr=-1)
    assert all(part in str(error.value) for part in ("prompts_per_step=0", "group_size=1", "lr=-1"))
    assert PretrainConfig(lr=1, min_lr=0).lr == 1  # an int where a float is expected is fine
    assert ModelConfig(dim=np.int64(32), dropout=np.float32(0.1)).dim == 32  # NumPy scalars too
    with pytest.raises(ConfigError, match="n_activated_experts=3 experts cannot be found in n_limited_groups=1"):
        ModelConfig(n_routed_experts=8, n_expert_groups=4, n_limited_groups=1, n_activated_experts=3)


HOSTILE = [None, True, "64", "", 1.5, 0, -1, 10**30, math.nan, -math.inf, [], {}, np.int64(3), np.float32(0.5)]


@pytest.mark.parametrize("cls", [ModelConfig, PretrainConfig, GRPOConfig])
def test_any_value_in_any_field_is_accepted_or_refused_with_a_config_error(cls):
    """Never a TypeError or a crash later: every field's value is either valid or named in a ConfigError."""
    for field in dataclasses.fields(cls):
        for value in HOSTILE:
            try:
                config = cls(**{field.name: value})
            except ConfigError as error:
                assert f"{field.name}=" in str(error), (field.name, value, str(error))
            else:
                assert getattr(config, field.name) is value


def test_from_dict_refuses_unknown_keys_and_non_dicts_and_fills_missing_keys_with_defaults():
    with pytest.raises(ConfigError, match=r"unknown field\(s\) \['stpes'\]; known fields are \[.*'steps'"):
        PretrainConfig.from_dict({"stpes": 3})
    with pytest.raises(ConfigError, match="GRPOConfig: expected a dict of fields, got list"):
        GRPOConfig.from_dict([1, 2])
    assert ModelConfig.from_dict({"dim": 32}) == ModelConfig(dim=32)


def test_a_config_changed_after_construction_is_checked_again_when_used():
    config = ModelConfig(**TINY_MODEL)
    config.n_heads = 0
    with pytest.raises(ConfigError, match="n_heads=0 must be ≥ 1"):
        Transformer(config)


def test_checks_helper_describes_ranges():
    check = Checks("section", {"a": 0.5, "b": 2, "c": None})
    assert check.real("a", minimum=0, below=1) and check.integer("c", optional=True)
    assert not check.real("a", above=1) and not check.integer("b", maximum=1)
    with pytest.raises(ConfigError, match=r"^section: a=0.5 must be > 1; b=2 must be ≤ 1$"):
        check.done()


# ---------------------------------------------------------------------------------------------------------------
# evaluation and sampling settings

@pytest.fixture(scope="module")
def tiny_model():
    minimoe.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=26, **TINY_MODEL))


@pytest.mark.parametrize("settings, expected", [
    ({"max_new_tokens": 0}, "max_new_tokens=0 must be ≥ 1"),
    ({"k": 9, "n_samples": 4}, "k=9 must be ≤ n_samples=4"),
    ({"n_problems": True}, "n_problems=True must be an integer"),
    ({"temperature": math.nan}, "temperature=nan must be a finite number"),
])
def test_evaluate_refuses_bad_settings_before_sampling(tiny_model, settings, expected):
    with pytest.raises(ConfigError, match=expected):
        evaluate(tiny_model, AdditionTask(3), **settings)
    with pytest.raises(ConfigError, match="^eval: "):
        check_evaluation("eval", **settings)


@pytest.mark.parametrize("options, expected", [
    ({"temperature": math.nan}, "temperature=nan must be a finite number > 0"),
    ({"temperature": -1.0}, "temperature=-1.0 must be a finite number > 0"),
    ({"top_k": 0}, "top_k=0 must be ≥ 1"),
    ({"top_k": 2.5}, "top_k=2.5 must be an integer"),
    ({"top_p": 0.0}, r"top_p=0.0 must be in \(0, 1\]"),
    ({"top_p": 1.5}, r"top_p=1.5 must be in \(0, 1\]"),
])
def test_sampling_settings_are_refused_at_the_entry_point(tiny_model, options, expected):
    prompt = np.ones((1, 3), dtype=np.int64)
    with pytest.raises(ConfigError, match="generate: " + expected):
        generate(tiny_model, prompt, 4, eos_id=2, pad_id=0, **options)
    with pytest.raises(ConfigError, match="sample_next: " + expected):
        sample_next(np.zeros((1, 5)), **options)


def test_generate_refuses_a_negative_or_fractional_length(tiny_model):
    for bad in (-1, 2.0):
        with pytest.raises(ConfigError, match=f"max_new_tokens={bad!r} must be"):
            generate(tiny_model, np.ones((1, 3), dtype=np.int64), bad, eos_id=2, pad_id=0)
    assert sample_next(np.array([[0.0, 5.0, 1.0]]), temperature=math.nan, greedy=True).tolist() == [1]


# ---------------------------------------------------------------------------------------------------------------
# the command line, in process

def write(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return str(path)


def fails(argv, capsys):
    """Run the CLI; it must exit with status 2. Returns its stderr."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit:
        cli.main(argv)
    assert exit.value.code == 2
    return capsys.readouterr().err


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny pretrained run (2 steps)."""
    folder = tmp_path_factory.mktemp("base")
    config = write(folder, "tiny.json", TINY)
    cli.main(["train", "--config", config, "--out", str(folder / "run"), "--quiet"])
    return str(folder / "run" / "pretrain_last"), config


@pytest.mark.parametrize("argv, expected", [
    (["train", "--threads", "-3"], "argument --threads: -3 must be ≥ 0"),
    (["train", "--seed", "-5"], "argument --seed: -5 must be ≥ 0"),
    (["train", "--seed", "1.5"], "argument --seed: '1.5' is not an integer"),
    (["generate", "--checkpoint", "x", "--prompt", "1+2=", "--temperature", "nan"],
     "argument --temperature: 'nan' is not a finite number"),
    (["generate", "--checkpoint", "x", "--prompt", "1+2=", "--temperature", "-1"],
     "argument --temperature: -1 must be ≥ 0"),
    (["generate", "--checkpoint", "x", "--prompt", "1+2=", "--n", "0"], "argument --n: 0 must be ≥ 1"),
    (["demo", "--resume"], "unrecognized arguments: --resume"),  # a flag a command would ignore is refused
    (["eval", "--checkpoint", "x", "--prompt", "1+2="], "unrecognized arguments: --prompt"),
    (["train", "--resume", "--checkpoint", "x"], "--checkpoint starts a new run from a model, --resume continues"),
    (["eval"], "the following arguments are required: --checkpoint"),
])
def test_every_flag_is_checked_by_the_parser(argv, expected, capsys):
    assert expected in fails(argv, capsys)


@pytest.mark.parametrize("content, expected", [
    ('{"pretrain": {\n  "steps": 3,\n}}', "not valid JSON at line 3, column 1"),
    ("[1, 2, 3]", "expected a JSON object of sections (model, pretrain, grpo, eval, task, distill), got an array"),
    ({"modle": {}}, "unknown section(s) ['modle']; the sections are ['model', 'pretrain', 'grpo', 'eval', 'task', 'distill']"),
    ({"model": [1]}, 'section "model" must be an object of fields, got [1]'),
    ({"task": "addition5"}, "\"task\" must be one of ['addition3', 'addition4', 'countdown'], got 'addition5'"),
    ('{"pretrain": {"steps": 3, "steps": 4}}', "key(s) ['steps'] appear more than once"),
    ({"model": {"dim": "64"}}, 'section "model": ModelConfig: dim=\'64\' must be an integer (got str)'),
    ({"model": {"dim": True}}, "dim=True must be an integer (got bool)"),
    ({"model": {"vocab_size": 8}}, "vocab_size=8 is smaller than the tokenizer's 26 tokens"),
    ({"pretrain": {"stpes": 3}}, "PretrainConfig: unknown field(s) ['stpes']; known fields are ["),
    ({"pretrain": {"batch_size": 0}}, 'section "pretrain": PretrainConfig: batch_size=0 must be ≥ 1'),
    ({"grpo": {"prompts_per_step": 0}}, 'section "grpo": GRPOConfig: prompts_per_step=0 must be ≥ 1'),
    ({"grpo": {"epsilon_high": -5}}, "epsilon_high=-5 must be ≥ 0"),
    ({"eval": {"max_new_tokens": 0}}, 'section "eval": max_new_tokens=0 must be ≥ 1'),
    ({"eval": {"kk": 3}}, "unknown field(s) ['kk']; known fields are ['k', 'max_new_tokens', 'n_problems',"),
])
def test_config_file_errors_name_the_file_and_what_is_wrong(tmp_path, content, expected, capsys):
    path = write(tmp_path, "bad.json", content)
    message = fails(["eval", "--config", path, "--checkpoint", "never-read"], capsys)
    assert message.startswith(f"minimoe: error: --config {path}") and expected in message
    assert message.count("\n") == 1  # one line


def test_a_missing_config_file_is_named(tmp_path, capsys):
    message = fails(["train", "--config", str(tmp_path / "none.json")], capsys)
    assert f"--config {tmp_path / 'none.json'}: cannot read it" in message


def test_every_bad_section_is_reported_at_once(tmp_path, capsys):
    path = write(tmp_path, "bad.json", {"pretrain": {"batch_size": 0}, "grpo": {"epsilon_high": -5},
                                        "eval": {"k": 99}})
    message = fails(["train", "--config", path], capsys)
    assert all(part in message for part in ("batch_size=0", "epsilon_high=-5", "k=99 must be ≤ n_samples=16"))


def test_demo_checks_its_eval_settings_and_lengths_before_pretraining(tmp_path, capsys):
    for section, bad in (("eval", {"k": 99}),  # k > n_samples
                         ("eval", {"max_new_tokens": 60}),  # 60 tokens + the prompt > max_seq_len 64
                         ("model", {"max_seq_len": 32})):  # worked solutions are longer
        path = write(tmp_path, "bad.json", {**TINY, "pretrain": {**TINY["pretrain"], "steps": 10_000},
                                            section: {**TINY[section], **bad}})
        message = fails(["demo", "--config", path, "--out", str(tmp_path / "demo"), "--quiet"], capsys)
        assert f'section "{section}"' in message and not (tmp_path / "demo").exists()  # no step was taken
    message = fails(["train", "--config", path, "--out", str(tmp_path / "train"), "--quiet"], capsys)
    assert "reach 41 input tokens (in a sample of 256), more than the model's max_seq_len=32" in message


def test_train_checkpoint_starts_a_new_run_from_that_model(tmp_path, checkpoint, monkeypatch):
    path, config = checkpoint
    saved = load_checkpoint(path, restore_random_state=False)[0].state_dict()
    started = []

    class Stop(Exception):
        pass

    def pretrain(model, *args, resume_from=None, **kwargs):
        started.append((model.state_dict(), resume_from))
        raise Stop

    monkeypatch.setattr(cli, "pretrain", pretrain)
    with pytest.raises(Stop):
        cli.main(["train", "--config", config, "--checkpoint", path, "--out", str(tmp_path / "new"), "--quiet"])
    weights, resume_from = started[0]
    assert resume_from is None  # a new run: fresh optimizer and schedule, step 0
    assert all(np.array_equal(weights[name], saved[name]) for name in saved)


def test_model_fields_that_disagree_with_a_checkpoint_are_refused_naming_only_those(tmp_path, checkpoint, capsys):
    path, _ = checkpoint
    run = os.path.dirname(path)
    changed = write(tmp_path, "changed.json", {**TINY, "model": {**TINY_MODEL, "dim": 32, "n_heads": 4}})
    for argv in (["train", "--out", run, "--resume", "--quiet"], ["eval", "--checkpoint", path]):
        message = fails(argv + ["--config", changed], capsys)
        assert "was saved with a different model: dim=32 (saved: 16), n_heads=4 (saved: 2);" in message
        assert "n_layers" not in message and "moe_inter_dim" not in message
    longer = write(tmp_path, "longer.json", {**TINY, "pretrain": {**TINY["pretrain"], "steps": 5}})
    message = fails(["train", "--config", longer, "--out", run, "--resume", "--quiet"], capsys)
    assert "different pretrain section: steps=5 (saved: 2);" in message and "batch_size" not in message


def test_generate_checks_its_prompt_before_loading_anything(capsys):
    message = fails(["generate", "--checkpoint", "never-read", "--prompt", "1+2=?"], capsys)
    assert "--prompt '1+2=?': Tokenizer.encode: character '?'" in message


def test_a_command_that_stops_with_a_message_reports_it_the_same_way(monkeypatch, capsys):
    def stops(args):
        raise SystemExit("--out runs/x already holds a run\n(continue it with --resume)")

    monkeypatch.setitem(cli.COMMANDS, "eval", stops)
    assert fails(["eval", "--checkpoint", "x"], capsys) == \
        "minimoe: error: --out runs/x already holds a run (continue it with --resume)\n"
    monkeypatch.setitem(cli.COMMANDS, "eval", lambda args: sys.exit(130))  # an exit status passes through
    with pytest.raises(SystemExit) as exit:
        cli.main(["eval", "--checkpoint", "x"])
    assert exit.value.code == 130


# ---------------------------------------------------------------------------------------------------------------
# the command line, as a user runs it

def run_cli(*argv, cwd):
    environment = {**os.environ, "PYTHONPATH": ROOT, "OPENBLAS_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "minimoe", *argv], capture_output=True, text=True, cwd=cwd,
                          env=environment)


def test_a_library_error_is_one_line_with_exit_status_2_and_debug_keeps_the_traceback(tmp_path):
    path = write(tmp_path, "list.json", "[1, 2, 3]")
    result = run_cli("train", "--config", path, cwd=tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == f"minimoe: error: --config {path}: expected a JSON object of sections (model, " \
                            "pretrain, grpo, eval, task, distill), got an array\n"
    result = run_cli("eval", "--checkpoint", str(tmp_path / "missing"), "--debug", cwd=tmp_path)
    assert result.returncode == 1 and "Traceback (most recent call last)" in result.stderr
    assert "CheckpointError" in result.stderr

