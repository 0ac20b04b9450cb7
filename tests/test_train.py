"""Pretraining and the checkpoints that make runs lose no work: the loss falls, an interrupted run resumes bit for
bit, a NaN stops the run with the last good checkpoint intact, and a bad checkpoint is refused clearly."""

import os

import numpy as np
import pytest

import minimoe
from minimoe.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from minimoe.model import ModelConfig, Transformer
from minimoe.optim import AdamW
from minimoe.rl import GRPOConfig, train_grpo
from minimoe.tasks import AdditionTask, Tokenizer
from minimoe.testing import to_numpy
from minimoe.train import PretrainConfig, TrainingDiverged, pretrain

TINY = dict(vocab_size=26, dim=16, n_layers=1, n_heads=2, n_routed_experts=4, moe_inter_dim=8, max_seq_len=48,
            dropout=0.1)


def tiny_model(seed=0, **overrides):
    minimoe.manual_seed(seed)
    return Transformer(ModelConfig(**{**TINY, **overrides}))


def short_config(**overrides):
    return PretrainConfig(**{**dict(steps=6, batch_size=8, warmup_steps=2, eval_every=3, eval_batch_size=8,
                                    checkpoint_every=3, seed=3), **overrides})


def parameters(model):
    return {name: to_numpy(p).copy() for name, p in model.state_dict().items()}


def test_pretraining_lowers_the_loss():
    model = tiny_model()
    history = pretrain(model, AdditionTask(3), short_config(steps=40, batch_size=32, lr=1e-2, eval_every=20),
                       progress=False)
    assert np.mean(history["loss"][-5:]) < np.mean(history["loss"][:5]) - 0.5
    assert [e["step"] for e in history["eval"]] == [20, 40]
    assert history["eval"][-1]["heldout_loss"] < history["eval"][0]["heldout_loss"] + 0.1


class Interrupt(Exception):
    pass


def test_an_interrupted_run_resumes_bit_for_bit(tmp_path):
    """Dropout is on and the routing bias moves, so every random generator and buffer must be restored."""
    task, config = AdditionTask(3), short_config()
    straight = tiny_model(bias_update_speed=1e-2)
    pretrain(straight, task, config, out_dir=str(tmp_path / "straight"), progress=False)

    interrupted = tiny_model(bias_update_speed=1e-2)

    def stop_after_four(step, record):
        if step == 4:
            raise Interrupt

    with pytest.raises(Interrupt):
        pretrain(interrupted, task, config, out_dir=str(tmp_path / "resumed"), progress=False, on_step=stop_after_four)
    resumed = tiny_model(seed=99, bias_update_speed=1e-2)  # a different start: everything must come from disk
    minimoe.manual_seed(12345)
    history = pretrain(resumed, task, config, out_dir=str(tmp_path / "resumed"),
                       resume_from=str(tmp_path / "resumed" / "pretrain_last"), progress=False)
    assert history["step"] == list(range(1, 7))
    expected, actual = parameters(straight), parameters(resumed)
    assert expected.keys() == actual.keys()
    for name in expected:
        np.testing.assert_array_equal(actual[name], expected[name], err_msg=name)


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    model = tiny_model()

    def poison(step, record):
        if step == 4:
            model.head.weight.data[...] = np.nan

    with pytest.raises(TrainingDiverged, match=r"loss became nan at step 5.*pretrain_last"):
        pretrain(model, AdditionTask(3), short_config(), out_dir=str(tmp_path), progress=False, on_step=poison)
    restored, state = load_checkpoint(tmp_path / "pretrain_last")
    assert state["step"] == 3
    assert all(np.isfinite(to_numpy(p)).all() for p in restored.parameters())


def test_checkpoint_round_trip_with_optimizer(tmp_path):
    model = tiny_model()
    optimizer = AdamW(model.parameters(), lr=1e-3)
    pretrain(model, AdditionTask(3), short_config(steps=2, checkpoint_every=0, eval_every=0), progress=False)
    for p in model.parameters():
        p.grad = np.ones_like(p.data)
    optimizer.step()
    path = save_checkpoint(tmp_path / "ckpt", model, optimizer, state={"note": "hello"})
    assert path.endswith("ckpt.npz") and os.listdir(tmp_path) == ["ckpt.npz"]
    other = tiny_model(seed=5)
    other_optimizer = AdamW(other.parameters(), lr=1e-3)
    _, state = load_checkpoint(tmp_path / "ckpt", other, other_optimizer)
    assert state == {"note": "hello"}
    for name, value in parameters(model).items():
        np.testing.assert_array_equal(parameters(other)[name], value)
    for mine, theirs in zip(optimizer.state_dict()["state"], other_optimizer.state_dict()["state"]):
        for key in mine:
            np.testing.assert_array_equal(np.asarray(theirs[key]), np.asarray(mine[key]))


def test_bad_checkpoints_are_refused_clearly(tmp_path):
    model = tiny_model()
    save_checkpoint(tmp_path / "good", model)
    with pytest.raises(CheckpointError, match="different model configuration: dim: saved 16, model 32"):
        load_checkpoint(tmp_path / "good", tiny_model(dim=32))
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="holds no optimizer state"):
        load_checkpoint(tmp_path / "good", tiny_model(), AdamW(tiny_model().parameters()))
    # a weight changed by hand after the file was written
    with np.load(tmp_path / "good.npz") as archive:
        entries = dict(archive)
    entries["model/head.weight"] = entries["model/head.weight"] + 1
    np.savez(tmp_path / "good.npz", **entries)
    with pytest.raises(CheckpointError, match="SHA-256 differs"):
        load_checkpoint(tmp_path / "good")


def test_a_checkpoint_cannot_run_code(tmp_path):
    """Arrays are loaded with allow_pickle=False: an object array (which would unpickle) is refused before
    anything else is looked at."""
    model = tiny_model()
    save_checkpoint(tmp_path / "ckpt", model)
    with np.load(tmp_path / "ckpt.npz") as archive:
        entries = dict(archive)
    entries["model/embed.weight"] = np.array([object()], dtype=object)
    with open(tmp_path / "ckpt.npz", "wb") as file:
        np.savez(file, **entries)
    with pytest.raises(CheckpointError, match="pickle"):
        load_checkpoint(tmp_path / "ckpt")


def test_a_failed_write_leaves_the_previous_checkpoint(tmp_path, monkeypatch):
    model = tiny_model()
    save_checkpoint(tmp_path / "ckpt", model)
    before = (tmp_path / "ckpt.npz").read_bytes()

    def crash(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path / "ckpt", tiny_model(seed=3))
    monkeypatch.undo()
    assert (tmp_path / "ckpt.npz").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp")] == []
    load_checkpoint(tmp_path / "ckpt")


def test_rl_resumes_bit_for_bit(tmp_path):
    task = AdditionTask(3)
    config = GRPOConfig(steps=4, prompts_per_step=2, group_size=4, warmup_steps=1, max_new_tokens=12,
                        checkpoint_every=2, seed=1, allow_weak_base=True)  # an untrained model: the loop, not the learning
    straight = tiny_model(dropout=0.0)
    train_grpo(straight, task, config, out_dir=str(tmp_path / "a"), progress=False)

    interrupted = tiny_model(dropout=0.0)

    def stop(step, record):
        if step == 3:
            raise Interrupt

    with pytest.raises(Interrupt):
        train_grpo(interrupted, task, config, out_dir=str(tmp_path / "b"), progress=False, on_step=stop)
    resumed = tiny_model(seed=7, dropout=0.0)
    history = train_grpo(resumed, task, config, out_dir=str(tmp_path / "b"),
                         resume_from=str(tmp_path / "b" / "rl_last"), progress=False)
    assert [r["step"] for r in history["steps"]] == [1, 2, 3, 4]
    for name, value in parameters(straight).items():
        np.testing.assert_array_equal(parameters(resumed)[name], value, err_msg=name)


def test_the_tokenizer_must_fit_the_model():
    with pytest.raises(ValueError, match="vocab_size"):
        pretrain(tiny_model(vocab_size=10), AdditionTask(3), short_config(), Tokenizer(), progress=False)
