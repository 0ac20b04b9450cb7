"""The command line, end to end with a tiny configuration: the demo writes its summary, plots and checkpoints;
train → rl → eval → generate chain through checkpoints; bad arguments fail clearly."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from minimoe import available_backends
from minimoe.checkpoint import load_checkpoint
from minimoe.cli import main
from minimoe.model import ModelConfig
from minimoe.preset import load_preset
from minimoe.rl import GRPOConfig
from minimoe.train import PretrainConfig
from minimoe.validation import ConfigError

TINY = {"model": {"dim": 16, "n_layers": 1, "n_heads": 2, "n_routed_experts": 4, "moe_inter_dim": 8},
        "pretrain": {"steps": 4, "batch_size": 8, "warmup_steps": 1, "eval_every": 2, "eval_batch_size": 8,
                     "checkpoint_every": 2},
        "grpo": {"steps": 2, "prompts_per_step": 2, "group_size": 4, "warmup_steps": 1, "max_new_tokens": 8,
                 "allow_weak_base": True},  # 4 pretraining steps: a base GRPO would refuse
        "eval": {"n_problems": 4, "n_samples": 4, "k": 2, "max_new_tokens": 8}}


@pytest.fixture
def tiny_config(tmp_path):
    path = tmp_path / "tiny.json"
    path.write_text(json.dumps(TINY))
    return str(path)


def test_demo_writes_summary_plots_and_checkpoints(tmp_path, tiny_config, capsys):
    out = tmp_path / "demo"
    main(["demo", "--config", tiny_config, "--out", str(out), "--quiet", "--seed", "3"])
    summary = json.loads((out / "summary.json").read_text())
    for phase in ("before", "after"):
        for key in ("accuracy", "pass_at_1", "pass_at_k", "mean_length", "thinking_share"):
            assert 0 <= summary[phase][key] <= (100 if key == "mean_length" else 1), (phase, key)
    assert summary["seconds"] > 0 and summary["seed"] == 3
    for name in ("pretraining.png", "grpo.png", "expert_load.png", "pretrain_last.npz", "rl_last.npz",
                 "rl_reference.npz"):
        assert (out / name).stat().st_size > 0, name
    printed = capsys.readouterr().out
    assert "before RL" in printed and "pass@2" in printed and "greedy accuracy" in printed


def test_train_rl_eval_generate_chain(tmp_path, tiny_config, capsys):
    base, tuned = tmp_path / "base", tmp_path / "tuned"
    main(["train", "--config", tiny_config, "--out", str(base), "--quiet"])
    assert (base / "pretrain_last.npz").exists() and (base / "pretraining.png").exists()
    main(["rl", "--config", tiny_config, "--checkpoint", str(base / "pretrain_last"), "--out", str(tuned), "--quiet"])
    main(["eval", "--config", tiny_config, "--checkpoint", str(tuned / "rl_last"), "--out", str(tuned)])
    result = json.loads((tuned / "eval.json").read_text())
    assert set(result) >= {"accuracy", "pass_at_1", "pass_at_k", "thinking_share"}
    capsys.readouterr()
    main(["generate", "--config", tiny_config, "--checkpoint", str(tuned / "rl_last"), "--prompt", "347+589=",
          "--n", "3"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and all(line.startswith("347+589=") for line in lines)


def test_train_resumes_where_it_stopped(tmp_path, tiny_config):
    out = tmp_path / "run"
    main(["train", "--config", tiny_config, "--out", str(out), "--quiet"])
    before = load_checkpoint(out / "pretrain_last")[1]["step"]
    main(["train", "--config", tiny_config, "--out", str(out), "--quiet", "--resume"])
    assert before == load_checkpoint(out / "pretrain_last")[1]["step"] == 4


def test_bad_arguments_fail_clearly(tmp_path, tiny_config, capsys):
    with pytest.raises(SystemExit) as exit:
        main(["rl", "--config", tiny_config])
    assert exit.value.code == 2 and "--checkpoint" in capsys.readouterr().err
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"modle": {}}))
    with pytest.raises(SystemExit) as exit:
        main(["demo", "--config", str(bad)])
    assert exit.value.code == 2 and "unknown section(s) ['modle']" in capsys.readouterr().err
    if "cupy" not in available_backends():  # where a GPU works, --backend cupy is no error
        with pytest.raises(SystemExit) as exit:
            main(["eval", "--backend", "cupy", "--checkpoint", "x"])
        assert exit.value.code == 2 and "minimoe: error: --backend cupy" in capsys.readouterr().err


def test_module_entry_point():
    result = subprocess.run([sys.executable, "-m", "minimoe", "--help"], capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.dirname(__file__)))
    assert result.returncode == 0 and "demo" in result.stdout


# ---- presets: the settings --config starts from ----------------------------------------------------------------

def test_the_default_preset_is_deepseek_v3_and_config_goes_on_top(tmp_path, tiny_config):
    """No --preset: the demo builds V3's architecture (MLA, sigmoid gate) and takes GRPO's step from the preset,
    while the tiny --config's own fields (width, steps) win field by field; --preset classic gives the
    dataclass defaults under the same file."""
    v3 = load_preset("v3")
    runs = {}
    for preset in (None, "classic"):
        out = tmp_path / str(preset)
        main(["demo", "--config", tiny_config, "--out", str(out), "--quiet"] + (["--preset", preset] if preset else []))
        runs[preset] = json.loads((out / "summary.json").read_text())
    default, classic = runs[None], runs["classic"]
    assert default["preset"] == "v3" and classic["preset"] == "classic"
    for section in ("model", "pretrain", "grpo"):
        for field, value in v3[section].items():
            # the tiny file's own fields win over the preset's
            expected = TINY[section].get(field, value)
            assert default[section][field] == expected, (section, field)
    assert default["model"]["attention"] == "mla" and default["model"]["score_func"] == "sigmoid"
    assert default["grpo"]["lr"] == 5e-4 and default["pretrain"]["steps"] == TINY["pretrain"]["steps"]
    assert default["model"]["dim"] == classic["model"]["dim"] == TINY["model"]["dim"]
    defaults = {"model": ModelConfig(vocab_size=default["model"]["vocab_size"]), "grpo": GRPOConfig(),
                "pretrain": PretrainConfig()}
    for section, config in defaults.items():
        for field, value in config.to_dict().items():
            if field not in TINY[section] and field != "seed":
                assert classic[section][field] == value, (section, field)


def test_the_default_preset_equals_the_shipped_file(tmp_path, tiny_config):
    """`train` with no --preset and `train --preset classic --config presets/v3.json` (+ the tiny fields) build
    and train the same model: the same weights, bit for bit."""
    explicit = {section: {**load_preset("v3").get(section, {}), **fields} if isinstance(fields, dict) else fields
                for section, fields in TINY.items()}
    explicit_path = tmp_path / "explicit.json"
    explicit_path.write_text(json.dumps(explicit))
    main(["train", "--config", tiny_config, "--out", str(tmp_path / "a"), "--quiet"])
    main(["train", "--preset", "classic", "--config", str(explicit_path), "--out", str(tmp_path / "b"), "--quiet"])
    a, b = (load_checkpoint(tmp_path / name / "pretrain_last", restore_random_state=False)[0] for name in "ab")
    assert a.config == b.config and a.config.attention == "mla"
    for (name, x), (_, y) in zip(sorted(a.state_dict().items()), sorted(b.state_dict().items())):
        assert np.array_equal(x, y), name


def test_rl_from_a_checkpoint_of_another_architecture_keeps_it(tmp_path, tiny_config):
    """The preset's model fields describe a model to build, not one to load: rl from a classic (MHA) checkpoint
    under the default preset runs on that checkpoint as it is, with the preset's GRPO settings. Model fields
    given in --config itself must still agree with the checkpoint."""
    base = tmp_path / "base"
    main(["train", "--preset", "classic", "--config", tiny_config, "--out", str(base), "--quiet"])
    main(["rl", "--config", tiny_config, "--checkpoint", str(base / "pretrain_last"), "--out", str(tmp_path / "rl"),
          "--quiet"])
    tuned, state = load_checkpoint(tmp_path / "rl" / "rl_last", restore_random_state=False)
    assert tuned.config.attention == "mha" and state["config"]["lr"] == load_preset("v3")["grpo"]["lr"]
    mla = tmp_path / "mla.json"
    mla.write_text(json.dumps({**TINY, "model": {**TINY["model"], "attention": "mla"}}))
    with pytest.raises(ConfigError, match="attention='mla' \\(saved: 'mha'\\)"):
        main(["rl", "--config", str(mla), "--checkpoint", str(base / "pretrain_last"), "--out",
              str(tmp_path / "rl2"), "--quiet", "--debug"])


def test_an_unknown_preset_is_refused(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["demo", "--preset", "v4"])
    assert exit.value.code == 2 and "invalid choice: 'v4'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown preset 'v4'; the presets are \\['v3', 'classic'\\]"):
        load_preset("v4")


def test_resume_under_another_preset_is_refused_with_the_fix(tmp_path, tiny_config, capsys):
    """A GRPO run started with --preset classic and resumed without it would go on at another learning rate (the
    v3 preset's): refused, naming the field and the flags to give."""
    base, out = tmp_path / "base", tmp_path / "rl"
    main(["train", "--config", tiny_config, "--out", str(base), "--quiet"])
    main(["rl", "--preset", "classic", "--config", tiny_config, "--checkpoint", str(base / "pretrain_last"), "--out",
          str(out), "--quiet"])
    with pytest.raises(SystemExit) as exit:
        main(["rl", "--config", tiny_config, "--checkpoint", str(base / "pretrain_last"), "--out", str(out), "--quiet",
              "--resume"])
    message = capsys.readouterr().err
    assert exit.value.code == 2 and "lr=0.0005 (saved: 0.001)" in message and "same --preset, --config" in message
