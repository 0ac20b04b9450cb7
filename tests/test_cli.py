"""The command line, end to end with a tiny configuration: the demo writes its summary, plots and checkpoints;
train → rl → eval → generate chain through checkpoints; bad arguments fail clearly."""

import json
import os
import subprocess
import sys

import pytest

from minimoe import available_backends
from minimoe.checkpoint import load_checkpoint
from minimoe.cli import main

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
