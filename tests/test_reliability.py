"""No lost work, no silent acceptance: each probe of a careless or hostile user that once lost a run or was
silently accepted, kept as a test — checkpoints that survive a kill at any moment, a divergence guard that names a
checkpoint that really is good, run folders that refuse to be clobbered — and a real `python -m minimoe train`
killed with SIGKILL twenty-odd times, whose resumed run must equal an uninterrupted one bit for bit."""

import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest

import minimoe
from minimoe.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from minimoe.cli import main
from minimoe.loop import RunFolder, RunFolderError
from minimoe.model import ModelConfig, Transformer
from minimoe.rl import GRPOConfig, train_grpo
from minimoe.tasks import AdditionTask, Tokenizer, build_corpus
from minimoe.testing import to_numpy
from minimoe.train import PretrainConfig, TrainingDiverged, lm_batch, lm_loss, pretrain

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(vocab_size=26, dim=16, n_layers=1, n_heads=2, n_routed_experts=4, moe_inter_dim=8, max_seq_len=48)
TINY_RUN = {"model": {k: v for k, v in TINY.items() if k != "vocab_size"},
            "pretrain": {"steps": 4, "batch_size": 4, "warmup_steps": 1, "eval_every": 0, "checkpoint_every": 1},
            # short responses, so that prompt + response fit max_seq_len; an untrained model may run GRPO
            "grpo": {"max_new_tokens": 8, "allow_weak_base": True}, "eval": {"max_new_tokens": 8}}


def refused(capsys, argv, pattern):
    """The CLI refuses argv with one line on stderr matching pattern, and exit status 2."""
    with pytest.raises(SystemExit) as stopped:
        main(argv)
    assert stopped.value.code == 2
    error = capsys.readouterr().err
    assert re.search(pattern, error), error

def tiny_model(seed=0, **overrides):
    minimoe.manual_seed(seed)
    return Transformer(ModelConfig(**{**TINY, **overrides}))


def short_config(**overrides):
    return PretrainConfig(**{**dict(steps=4, batch_size=4, warmup_steps=1, eval_every=0, checkpoint_every=1,
                                    seed=3), **overrides})


def weights(model):
    return {name: to_numpy(value).copy() for name, value in model.state_dict().items()}


def write_config(tmp_path, config):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    return str(path)


# --------------------------------------------------------------------------------------------------------------
# the checkpoint file
# --------------------------------------------------------------------------------------------------------------

def rewrite_format_2(path, change):
    """Rewrite a checkpoint after `change(arrays, meta)`, with a fresh hash computed as the format is documented
    (minimoe/checkpoint.py): SHA-256 over each array's [name, dtype, shape] JSON and bytes in name order, then the
    metadata bytes. Written here from the description, not with the module's code."""
    with np.load(path) as archive:
        arrays = {name: archive[name] for name in archive.files}
    meta = json.loads(arrays.pop("__meta__").tobytes())
    arrays.pop("__sha256__")
    change(arrays, meta)
    meta_bytes = json.dumps(meta).encode()
    digest = hashlib.sha256()
    for name in sorted(arrays):
        digest.update(json.dumps([name, arrays[name].dtype.str, list(arrays[name].shape)]).encode())
        digest.update(np.ascontiguousarray(arrays[name]).tobytes())
    digest.update(meta_bytes)
    np.savez(path, **arrays, __meta__=np.frombuffer(meta_bytes, np.uint8),
             __sha256__=np.frombuffer(digest.hexdigest().encode(), np.uint8))


def test_a_checkpoint_is_one_file_whose_documented_hash_is_checked(tmp_path):
    save_checkpoint(tmp_path / "ckpt", tiny_model(), state={"step": 1})
    assert sorted(os.listdir(tmp_path)) == ["ckpt.npz"]
    rewrite_format_2(tmp_path / "ckpt.npz", lambda arrays, meta: None)  # the same content, our own hash
    assert load_checkpoint(tmp_path / "ckpt")[1] == {"step": 1}


@pytest.mark.parametrize("field, value", [("n_activated_experts", 1), ("rope_theta", 500.0), ("score_func", "sigmoid")])
def test_editing_the_model_configuration_in_the_file_is_detected(tmp_path, field, value):
    """The old hash covered only the arrays: an edited configuration loaded and changed the model's outputs."""
    save_checkpoint(tmp_path / "ckpt", tiny_model())
    with np.load(tmp_path / "ckpt.npz") as archive:
        entries = dict(archive)
    meta = json.loads(entries["__meta__"].tobytes())
    assert meta["model_config"][field] != value
    meta["model_config"][field] = value
    entries["__meta__"] = np.frombuffer(json.dumps(meta).encode(), np.uint8)
    np.savez(tmp_path / "ckpt.npz", **entries)
    with pytest.raises(CheckpointError, match="SHA-256 differs"):
        load_checkpoint(tmp_path / "ckpt")


def test_non_finite_weights_are_never_saved_nor_loaded(tmp_path):
    model = tiny_model()
    save_checkpoint(tmp_path / "ckpt", model)
    model.head.weight.data[0, 0] = np.nan
    with pytest.raises(CheckpointError, match="non-finite.*head.weight.*nothing was written"):
        save_checkpoint(tmp_path / "ckpt", model)
    assert sorted(os.listdir(tmp_path)) == ["ckpt.npz"]

    def poison(arrays, meta):
        arrays["model/head.weight"][0, 0] = np.nan

    rewrite_format_2(tmp_path / "ckpt.npz", poison)  # NaN weights under a correct hash
    with pytest.raises(CheckpointError, match="non-finite.*model/head.weight"):
        load_checkpoint(tmp_path / "ckpt")


def test_a_state_json_cannot_hold_changes_nothing_on_disk(tmp_path):
    """The old code replaced the arrays, then failed to write the JSON: neither checkpoint loaded."""
    save_checkpoint(tmp_path / "ckpt", tiny_model(), state={"step": 1})
    before = (tmp_path / "ckpt.npz").read_bytes()
    for bad in ({"a": np.float32(1)}, {"weights": np.zeros(3)}, {("a", "tuple"): "a key JSON cannot hold"}):
        with pytest.raises(CheckpointError, match="cannot be stored as JSON.*nothing was written"):
            save_checkpoint(tmp_path / "ckpt", tiny_model(seed=2), state=bad)
    assert sorted(os.listdir(tmp_path)) == ["ckpt.npz"] and (tmp_path / "ckpt.npz").read_bytes() == before


def test_on_eval_returning_a_numpy_scalar_keeps_the_previous_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="float32"):
        pretrain(tiny_model(), AdditionTask(3), short_config(eval_every=2), out_dir=str(tmp_path), progress=False,
                 on_eval=lambda model, step: {"a": np.float32(1)})
    assert load_checkpoint(tmp_path / "pretrain_last")[1]["step"] == 1


def test_every_moment_of_a_save_leaves_a_loadable_checkpoint(tmp_path, monkeypatch):
    """A SIGKILL can stop a save between any two of its file operations. Record the folder before and after each
    rename the save makes; every one of those states must load (the old checkpoint or the new one)."""
    folder = tmp_path / "run"
    save_checkpoint(folder / "ckpt", tiny_model(), state={"step": 1})
    save_checkpoint(folder / "ckpt", tiny_model(seed=1), state={"step": 2})
    snapshots, real_replace = [], os.replace

    def snapshot():
        snapshots.append({p.name: p.read_bytes() for p in folder.iterdir()})

    def replace_and_record(source, target):
        snapshot()
        real_replace(source, target)
        snapshot()

    monkeypatch.setattr(os, "replace", replace_and_record)
    save_checkpoint(folder / "ckpt", tiny_model(seed=2), state={"step": 3})
    monkeypatch.undo()
    assert len(snapshots) == 4  # the previous one aside, the new one into place
    for i, files in enumerate(snapshots):
        moment = tmp_path / f"moment{i}"
        moment.mkdir()
        for name, data in files.items():
            (moment / name).write_bytes(data)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # loading the previous one warns; that is fine here
            step = load_checkpoint(moment / "ckpt")[1]["step"]
        assert step in (2, 3), (i, sorted(files))
    assert step == 3


def test_loading_falls_back_to_the_previous_checkpoint_and_says_so(tmp_path):
    save_checkpoint(tmp_path / "ckpt", tiny_model(), state={"step": 1})
    save_checkpoint(tmp_path / "ckpt", tiny_model(seed=1), state={"step": 2})
    assert sorted(os.listdir(tmp_path)) == ["ckpt.npz", "ckpt.prev.npz"]
    data = (tmp_path / "ckpt.npz").read_bytes()
    (tmp_path / "ckpt.npz").write_bytes(data[: len(data) // 2])  # a damaged disk, a truncated copy
    with pytest.warns(UserWarning, match=r"ckpt.npz refused \(.*truncated or damaged.*\); loaded the previous one"):
        assert load_checkpoint(tmp_path / "ckpt")[1] == {"step": 1}
    (tmp_path / "ckpt.prev.npz").write_bytes(b"nonsense")
    with pytest.raises(CheckpointError, match="no valid file.*ckpt.npz.*ckpt.prev.npz"):
        load_checkpoint(tmp_path / "ckpt")


def test_a_format_1_checkpoint_still_loads_and_is_replaced_by_format_2(tmp_path):
    """Format 1 as it was written until now: `name.npz` (arrays) + `name.json` (metadata, SHA-256 of the arrays
    file). The lesson's base model was one; a user's last-month checkpoints are."""
    model = tiny_model()
    buffer = io.BytesIO()
    np.savez(buffer, **{f"model/{name}": value for name, value in weights(model).items()})
    data = buffer.getvalue()
    meta = {"format": 1, "model_config": model.config.to_dict(), "random_state": minimoe.backend.random_state(),
            "state": {"step": 7}, "arrays_sha256": hashlib.sha256(data).hexdigest()}
    (tmp_path / "old.npz").write_bytes(data)
    (tmp_path / "old.json").write_text(json.dumps(meta))
    restored, state = load_checkpoint(tmp_path / "old", restore_random_state=False)
    assert state == {"step": 7}
    for name, value in weights(model).items():
        np.testing.assert_array_equal(weights(restored)[name], value)
    other = io.BytesIO()
    np.savez(other, **{f"model/{name}": value for name, value in weights(tiny_model(seed=1)).items()})
    (tmp_path / "old.npz").write_bytes(other.getvalue())  # arrays that do not belong to the .json
    with pytest.raises(CheckpointError, match="does not match .*old.json"):
        load_checkpoint(tmp_path / "old")
    (tmp_path / "old.npz").write_bytes(data)
    (tmp_path / "old.json").write_text(json.dumps({k: v for k, v in meta.items() if k != "model_config"}))
    with pytest.raises(CheckpointError, match="old.npz: the metadata lacks model_config"):  # was a KeyError
        load_checkpoint(tmp_path / "old")
    (tmp_path / "old.json").write_text(json.dumps(meta))
    save_checkpoint(tmp_path / "old", restored, state={"step": 8})
    assert load_checkpoint(tmp_path / "old")[1] == {"step": 8}
    assert sorted(os.listdir(tmp_path)) == ["old.npz", "old.prev.json", "old.prev.npz"]
    assert load_checkpoint(tmp_path / "old.prev", restore_random_state=False)[1] == {"step": 7}
    save_checkpoint(tmp_path / "old", restored, state={"step": 9})
    assert sorted(os.listdir(tmp_path)) == ["old.npz", "old.prev.npz"]
    assert load_checkpoint(tmp_path / "old.prev")[1] == {"step": 8}


def test_the_lesson_base_model_loads():
    model, state = load_checkpoint(os.path.join(REPOSITORY, "lessons", "data", "base_addition3"),
                                   restore_random_state=False)
    assert state["step"] == 1000 and type(model) is Transformer


def test_a_checkpoint_builds_the_class_it_was_saved_from(tmp_path):
    class Shallow(Transformer):
        pass

    save_checkpoint(tmp_path / "ckpt", Shallow(ModelConfig(**TINY)))
    with pytest.raises(CheckpointError, match="holds a Shallow; known model classes"):
        load_checkpoint(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="holds a Shallow, not a Transformer"):
        load_checkpoint(tmp_path / "ckpt", tiny_model())
    minimoe.checkpoint.register_model_class(Shallow)
    try:
        assert type(load_checkpoint(tmp_path / "ckpt")[0]) is Shallow
    finally:
        del minimoe.checkpoint.MODEL_CLASSES["Shallow"]


# --------------------------------------------------------------------------------------------------------------
# the divergence guard
# --------------------------------------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # overflow: what this test provokes
@pytest.mark.parametrize("every", [1, 2])
def test_the_checkpoint_named_after_divergence_gives_a_finite_loss(tmp_path, every):
    """lr 1e6 without clipping: the weights blow up and the loss turns NaN at step 3, right after the checkpoint of
    step 2. The old guard named that checkpoint, whose weights (~5e9) give a NaN loss."""
    task, tokenizer = AdditionTask(3), Tokenizer()
    config = short_config(steps=12, lr=1e6, min_lr=1e6, grad_clip=1e9, checkpoint_every=every)
    with pytest.raises(TrainingDiverged, match="became nan at step 3") as stopped:
        pretrain(tiny_model(), task, config, tokenizer, out_dir=str(tmp_path), progress=False)
    assert (tmp_path / "pretrain_last.diverged.npz").exists(), "the checkpoint that gives NaN is set aside"
    if every == 2:  # nothing good was ever written
        assert "there is no checkpoint to resume from" in str(stopped.value)
        assert not (tmp_path / "pretrain_last.npz").exists()
        return
    assert "the last checkpoint is" in str(stopped.value) and "(step 1)" in str(stopped.value)
    restored, state = load_checkpoint(tmp_path / "pretrain_last")
    corpus = build_corpus(task, 16, np.random.default_rng(0), config.mix)
    assert state["step"] == 1 and np.isfinite(lm_loss(restored, *lm_batch(corpus, tokenizer))[1].item())


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_divergence_right_after_a_checkpoint_falls_back_to_the_one_before(tmp_path):
    model = tiny_model()

    def poison(step, record):
        if step == 3:  # after step 3's checkpoint is due, so the checkpoint of step 3 must not be trusted
            model.head.weight.data[...] = np.finfo(model.head.weight.dtype).max  # finite; its logits are not

    with pytest.raises(TrainingDiverged, match=r"step 4.*last checkpoint is .*pretrain_last.npz \(step 2\)"):
        pretrain(model, AdditionTask(3), short_config(steps=6), out_dir=str(tmp_path), progress=False,
                 on_step=poison)
    restored, state = load_checkpoint(tmp_path / "pretrain_last")
    assert state["step"] == 2 and all(np.abs(to_numpy(p)).max() < 1e3 for p in restored.parameters())


def test_non_finite_weights_stop_the_run_before_they_are_saved(tmp_path):
    model = tiny_model()

    def poison(step, record):
        if step == 2:
            model.head.weight.data[...] = np.nan

    with pytest.raises(TrainingDiverged, match=r"weights became non-finite at step 2.*\(step 1\)"):
        pretrain(model, AdditionTask(3), short_config(), out_dir=str(tmp_path), progress=False, on_step=poison)
    assert load_checkpoint(tmp_path / "pretrain_last")[1]["step"] == 1


def test_checkpoint_every_0_saves_the_final_checkpoint_and_the_cli_plots(tmp_path):
    config = write_config(tmp_path, {**TINY_RUN, "pretrain": {**TINY_RUN["pretrain"], "checkpoint_every": 0}})
    main(["train", "--config", config, "--out", str(tmp_path / "run"), "--quiet"])
    assert load_checkpoint(tmp_path / "run" / "pretrain_last")[1]["step"] == 4
    assert (tmp_path / "run" / "pretraining.png").exists()


# --------------------------------------------------------------------------------------------------------------
# run folders
# --------------------------------------------------------------------------------------------------------------

def test_a_run_folder_is_not_clobbered(tmp_path, capsys):
    config, out = write_config(tmp_path, TINY_RUN), str(tmp_path / "run")
    main(["train", "--config", config, "--out", out, "--quiet"])
    before = (tmp_path / "run" / "pretrain_last.npz").read_bytes()
    refused(capsys, ["train", "--config", config, "--out", out, "--quiet"], "already holds a run.*--resume.*--overwrite")
    refused(capsys, ["demo", "--config", config, "--out", out, "--quiet"], "already holds a run")
    refused(capsys, ["demo", "--config", config, "--out", out, "--quiet", "--resume"], "unrecognized arguments: --resume")
    assert (tmp_path / "run" / "pretrain_last.npz").read_bytes() == before
    with pytest.raises(RunFolderError, match="already holds a run"):  # the library refuses too
        pretrain(tiny_model(), AdditionTask(3), short_config(), out_dir=out, progress=False)
    refused(capsys, ["train", "--config", config, "--out", out, "--quiet", "--overwrite", "--resume"], "--resume and --overwrite exclude each other")
    with pytest.raises(ValueError, match="resume_from and overwrite exclude each other"):
        pretrain(tiny_model(), AdditionTask(3), short_config(), out_dir=out, progress=False, overwrite=True,
                 resume_from=os.path.join(out, "pretrain_last"))
    assert (tmp_path / "run" / "pretrain_last.npz").read_bytes() == before
    main(["train", "--config", config, "--out", out, "--quiet", "--overwrite", "--seed", "1"])
    assert (tmp_path / "run" / "pretrain_last.npz").read_bytes() != before
    refused(capsys, ["train", "--config", config, "--out", str(tmp_path / "empty"), "--quiet", "--resume"], "--resume: .* holds no checkpoint")


def test_an_unwritable_out_is_refused_before_any_training(tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    started = time.perf_counter()
    refused(capsys, ["train", "--config", write_config(tmp_path, TINY_RUN), "--out", str(tmp_path / "file" / "run")], "cannot write there")
    with pytest.raises(RunFolderError, match="cannot write there"):
        pretrain(tiny_model(), AdditionTask(3), short_config(), out_dir=str(tmp_path / "file" / "run"),
                 progress=False)
    assert time.perf_counter() - started < 5


def test_a_lock_stops_a_second_process_and_a_dead_ones_lock_is_taken_over(tmp_path, capsys):
    folder = tmp_path / "run"
    folder.mkdir()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (folder / ".lock").write_text(str(alive.pid))
        with pytest.raises(RunFolderError, match=f"in use by process {alive.pid}"):
            pretrain(tiny_model(), AdditionTask(3), short_config(), out_dir=str(folder), progress=False)
    finally:
        alive.kill()
        alive.wait()
    (folder / ".lock").write_text(str(alive.pid))  # its owner is gone now
    pretrain(tiny_model(), AdditionTask(3), short_config(), out_dir=str(folder), progress=False)
    assert f"taking over the lock of process {alive.pid}" in capsys.readouterr().err
    assert not (folder / ".lock").exists(), "the run released its lock"
    with RunFolder(folder), RunFolder(folder):  # one process may hold it twice (the CLI, then the loop)
        assert (folder / ".lock").read_text() == str(os.getpid())
    assert not (folder / ".lock").exists()


def interrupt_at(stop):
    def on_step(step, record):
        if step == stop:
            raise KeyboardInterrupt

    return on_step


def test_temporary_files_of_killed_writes_are_removed_on_resume(tmp_path):
    config = short_config()
    with pytest.raises(KeyboardInterrupt):
        pretrain(tiny_model(), AdditionTask(3), config, out_dir=str(tmp_path), progress=False,
                 on_step=interrupt_at(3))
    for name in (".tmp-pretrain_last.npz-abc123", ".tmp-pretrain_last.npz-xyz"):
        (tmp_path / name).write_bytes(b"half a checkpoint")
    pretrain(tiny_model(), AdditionTask(3), config, out_dir=str(tmp_path), progress=False,
             resume_from=str(tmp_path / "pretrain_last"))
    assert sorted(os.listdir(tmp_path)) == ["pretrain_last.npz", "pretrain_last.prev.npz"]


def test_ctrl_c_says_where_the_last_checkpoint_is(tmp_path, capsys):
    with pytest.raises(KeyboardInterrupt):
        pretrain(tiny_model(), AdditionTask(3), short_config(), out_dir=str(tmp_path), progress=False,
                 on_step=interrupt_at(3))
    err = capsys.readouterr().err
    assert "interrupted at step 3; the last checkpoint is" in err and "pretrain_last.npz (step 2)" in err
    assert load_checkpoint(tmp_path / "pretrain_last")[1]["step"] == 2
    assert not any(name.startswith(".") for name in os.listdir(tmp_path))


def test_grpo_finds_its_reference_in_its_own_run_folder(tmp_path, monkeypatch):
    """The old state held the reference's path relative to the working directory: a moved run failed to resume,
    and another run at the old path lent it its reference without a word."""
    task = AdditionTask(3)
    config = GRPOConfig(steps=3, prompts_per_step=2, group_size=2, warmup_steps=1, max_new_tokens=6,
                        checkpoint_every=1, seed=1, allow_weak_base=True)  # an untrained model: the loop, not the learning
    straight = tiny_model(dropout=0.0)
    train_grpo(straight, task, config, out_dir=str(tmp_path / "straight"), progress=False)

    monkeypatch.chdir(tmp_path)
    with pytest.raises(KeyboardInterrupt):
        train_grpo(tiny_model(dropout=0.0), task, config, out_dir="first", progress=False,
                   on_step=interrupt_at(2))
    shutil.move("first", "moved")
    train_grpo(tiny_model(seed=5), task, config, out_dir="first", progress=False)  # another run at the old path
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    resumed = tiny_model(seed=9, dropout=0.0)
    train_grpo(resumed, task, config, out_dir=str(tmp_path / "moved"), progress=False,
               resume_from=str(tmp_path / "moved" / "rl_last"))
    for name, value in weights(straight).items():
        np.testing.assert_array_equal(weights(resumed)[name], value, err_msg=name)
    save_checkpoint(tmp_path / "moved" / "rl_reference", tiny_model(seed=4))  # a reference swapped by hand
    with pytest.raises(CheckpointError, match="not the one the run .* started from"):
        train_grpo(tiny_model(), task, config, out_dir=str(tmp_path / "moved"), progress=False,
                   resume_from=str(tmp_path / "moved" / "rl_last"))


# --------------------------------------------------------------------------------------------------------------
# a real process, killed
# --------------------------------------------------------------------------------------------------------------

KILLS = 20
KILL_RUN = {"model": TINY_RUN["model"],
            "pretrain": {"steps": 60, "batch_size": 4, "warmup_steps": 2, "eval_every": 0, "checkpoint_every": 1}}


def _train(config, out, *flags):
    env = {**os.environ, "PYTHONPATH": REPOSITORY, "OPENBLAS_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "minimoe", "train", "--config", config, "--out", str(out),
                             "--quiet", *flags], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _identity(path):
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        return None
    return stat.st_ino, stat.st_mtime_ns, stat.st_size


def _wait_for_progress(process, checkpoint, start, timeout=60):
    """Wait until the process has written a checkpoint other than `start` (or has ended)."""
    deadline = time.monotonic() + timeout
    while process.poll() is None and _identity(checkpoint) == start:
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.002)


def _arrays_and_history(path):
    with np.load(path) as archive:
        arrays = {name: archive[name] for name in archive.files if not name.startswith("__")}
        meta = json.loads(archive["__meta__"].tobytes())
    history = {key: value for key, value in meta["state"]["history"].items() if key != "seconds"}
    return arrays, history, meta["state"]["step"]


def test_a_run_killed_at_random_moments_resumes_to_the_same_result(tmp_path):
    """SIGKILL at KILLS random moments (each after the run has written a checkpoint of its own, a few ms into its
    next steps and saves); after every kill `train --resume` must succeed, and the run finished that way must
    equal an uninterrupted one bit for bit: weights, optimizer buffers and the logged history."""
    config = write_config(tmp_path, KILL_RUN)
    straight = _train(config, tmp_path / "straight")
    rng = np.random.default_rng(2026)
    out = tmp_path / "killed"
    checkpoint = out / "pretrain_last.npz"
    kills = 0
    while kills < KILLS:
        start = _identity(checkpoint)
        started = start or (out / "pretrain_last.prev.npz").exists()  # a kill between the two renames
        process = _train(config, out, *(["--resume"] if started else []))
        _wait_for_progress(process, checkpoint, start)
        if process.poll() is not None:  # it finished before it could be killed
            assert process.returncode == 0, process.communicate()[1].decode()
            break
        time.sleep(rng.uniform(0, 0.02))
        process.send_signal(signal.SIGKILL)
        _, err = process.communicate()
        assert process.returncode in (-signal.SIGKILL, 0), err.decode()
        kills += process.returncode == -signal.SIGKILL
    finished = _train(config, out, "--resume")
    _, err = finished.communicate()
    assert finished.returncode == 0, err.decode()
    assert straight.wait() == 0
    assert kills == KILLS, f"the run finished after {kills} kills: give it more steps"
    expected, expected_history, steps = _arrays_and_history(tmp_path / "straight" / "pretrain_last.npz")
    actual, actual_history, resumed_steps = _arrays_and_history(checkpoint)
    assert steps == resumed_steps == KILL_RUN["pretrain"]["steps"]
    assert expected.keys() == actual.keys()
    for name in expected:
        np.testing.assert_array_equal(actual[name], expected[name], err_msg=name)
    assert actual_history == expected_history
    assert not [name for name in os.listdir(out) if name.startswith(".tmp")]


def test_ctrl_c_in_the_cli_saves_nothing_half_written(tmp_path):
    config = write_config(tmp_path, KILL_RUN)
    out = tmp_path / "run"
    process = _train(config, out)
    _wait_for_progress(process, out / "pretrain_last.npz", None)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate()
    assert process.returncode == 130, err.decode()
    assert "interrupted at step" in err.decode() and "the last checkpoint is" in err.decode()
    assert "Traceback" not in err.decode()
    assert not [name for name in os.listdir(out) if name.startswith(".")]
    load_checkpoint(out / "pretrain_last")
