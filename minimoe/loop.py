"""What every training loop shares — pretraining (minimoe.train) and GRPO (minimoe.rl) are both built from it:

- `optimizer_step`: backward, gradient clipping, the optimizer's step, the schedule's step;
- `RunFolder`: the folder a run writes to — created and checked writable before any work, locked against a second
  process, and never taken over from an earlier run unless that run is resumed or overwritten on purpose;
- `TrainingRun`: one run's bookkeeping — resuming (model, optimizer, schedule, data generator, history), the
  checkpoint schedule, the divergence guard and a clear word on Ctrl-C.

"Good" means finite. A checkpoint is written only when the step's loss and the weights are finite. A loss is
computed from the weights *before* the step's update, so a checkpoint is known to reproduce a finite loss only
once the next step's loss is in: when the loss turns NaN/inf right after a checkpoint, that checkpoint is moved
aside to `<name>.diverged.npz` and the one before it (`<name>.prev.npz`) is put back as `<name>.npz`. The error
then names a checkpoint whose weights really gave a finite loss.
"""

import math
import os
import sys
import time

import numpy as np

from .checkpoint import (CheckpointError, NonFiniteCheckpointError, checkpoint_files, load_checkpoint,
                         read_checkpoint_file, remove_temporary_files, save_checkpoint)
from .optim import clip_grad_norm_

__all__ = ["TrainingDiverged", "RunFolderError", "RunFolder", "TrainingRun", "optimizer_step", "checkpoint_due"]


class TrainingDiverged(RuntimeError):
    """The loss or the weights became NaN or infinite."""


class RunFolderError(RuntimeError):
    """A run folder cannot be used: not writable, locked by another process, or holding a run of its own."""


def optimizer_step(model, optimizer, scheduler, loss, grad_clip):
    """Backward, clip, step, schedule. Returns the gradient norm (a 0-d tensor, still on the device).
    The caller updates the routing bias (DeepSeek-V3's auxiliary-loss-free balancing) once per step."""
    optimizer.zero_grad()
    loss.backward()
    grad_norm = clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    scheduler.step()
    return grad_norm


def checkpoint_due(step, every, total):
    """Save after every `every` steps (0: never periodically) and always after the last step."""
    return step == total or (every > 0 and step % every == 0)


# ---------------------------------------------------------------------------------------------------------------
# the run folder
# ---------------------------------------------------------------------------------------------------------------

_held_locks = {}  # absolute folder -> how many RunFolder holders in this process (the CLI's and the loop's)


def _alive(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # someone else's process, or a platform that cannot tell: assume it lives
    return True


class RunFolder:
    """A folder that one process at a time writes a run into. `with RunFolder(path):` creates it, checks that it
    is writable, and holds its lock file `.lock` (it holds the owner's process id; a lock left by a process that
    no longer exists is taken over, with a note). The same process may hold it more than once."""

    LOCK = ".lock"

    def __init__(self, path):
        self.path = str(path)
        self.lock = os.path.join(self.path, self.LOCK)
        self._key = os.path.abspath(self.path)

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()

    def acquire(self):
        if _held_locks.get(self._key):
            _held_locks[self._key] += 1
            return
        try:
            os.makedirs(self.path, exist_ok=True)
            self._remove_dead_probes()
            probe = os.path.join(self.path, f".tmp-lock-{os.getpid()}")
            with open(probe, "w") as file:  # the pid is in the file before the file becomes the lock
                file.write(str(os.getpid()))
        except OSError as error:
            raise RunFolderError(f"run folder {self.path}: cannot write there ({error.strerror or error})") from None
        try:
            while True:
                try:
                    os.link(probe, self.lock)  # atomic, and fails if the lock exists
                    break
                except FileExistsError:
                    self._take_over_if_stale()
        finally:
            os.remove(probe)
        _held_locks[self._key] = 1

    def _remove_dead_probes(self):
        """Probe files of processes killed while they took the lock."""
        for name in os.listdir(self.path):
            pid = name[len(".tmp-lock-"):]
            if name.startswith(".tmp-lock-") and pid.isdigit() and not _alive(int(pid)):
                os.remove(os.path.join(self.path, name))

    def _take_over_if_stale(self):
        try:
            with open(self.lock) as file:
                owner = int(file.read().strip() or -1)
        except FileNotFoundError:
            return  # released in the meantime: try again
        except (OSError, ValueError):
            owner = -1
        if owner > 0 and owner != os.getpid() and _alive(owner):  # our own pid, unregistered: a reused pid
            raise RunFolderError(f"run folder {self.path} is in use by process {owner} (lock file {self.lock}); "
                                 "wait for it to finish, or delete the lock file if that process is not a minimoe "
                                 "run")
        print(f"note: run folder {self.path}: taking over the lock of process {owner}, which no longer runs",
              file=sys.stderr)
        try:
            os.remove(self.lock)
        except FileNotFoundError:
            pass

    def release(self):
        count = _held_locks.get(self._key, 0)
        if count > 1:
            _held_locks[self._key] = count - 1
            return
        _held_locks.pop(self._key, None)
        try:
            os.remove(self.lock)
        except FileNotFoundError:
            pass

    def holds_run(self, *checkpoint_names):
        """The checkpoint files of these names that already exist in the folder."""
        found = []
        for name in checkpoint_names:
            base, current, previous, legacy = checkpoint_files(os.path.join(self.path, name))
            found += [f for f in (current, previous, legacy) if os.path.exists(f)]
        return found

    def clear(self, *checkpoint_names):
        """Delete the checkpoints of these names (what `overwrite` means), with their temporary files."""
        for file in self.holds_run(*checkpoint_names):
            os.remove(file)
        for name in checkpoint_names:
            remove_temporary_files(os.path.join(self.path, name))


# ---------------------------------------------------------------------------------------------------------------
# one run's bookkeeping
# ---------------------------------------------------------------------------------------------------------------

class TrainingRun:
    """The bookkeeping a training loop shares with every other: `with TrainingRun(...) as run:` locks the run
    folder (refusing one that holds this loop's checkpoint unless resuming or `overwrite`), `run.resume(history)`
    restores an interrupted run, `run.steps()` iterates over the steps still to do with a progress bar,
    `run.check_loss` is the divergence guard and `run.end_step` saves on the checkpoint schedule.

    who         -- the loop's name for messages ("pretrain", "train_grpo")
    config      -- the loop's settings: `seed`, `steps`, `checkpoint_every`, `to_dict()`; a run resumes only with
                   the settings it was saved with
    out_dir     -- the run folder, or None for no checkpoints; the checkpoint is `out_dir/<name>.npz`
    resume_from -- a checkpoint of an interrupted run to continue
    """

    def __init__(self, who, model, optimizer, scheduler, config, out_dir=None, name="last", resume_from=None,
                 overwrite=False, progress=True):
        self.who, self.model, self.optimizer, self.scheduler, self.config = who, model, optimizer, scheduler, config
        self.folder = RunFolder(out_dir) if out_dir else None
        self.checkpoint = os.path.join(out_dir, name) if out_dir else None
        self.resume_from, self.overwrite, self.progress = resume_from, overwrite, progress
        self.data_rng = np.random.default_rng(config.seed)  # draws the training data
        self.saved_state = {}  # the state the resumed checkpoint held (a loop keeps its own keys there)
        self.start_step = 0
        self.last_saved = None  # step of the newest checkpoint of this run
        self.step = 0
        self.bar = None
        self._started = time.perf_counter()

    def __enter__(self):
        if self.resume_from is not None and self.overwrite:
            raise ValueError(f"{self.who}: resume_from and overwrite exclude each other (overwrite would delete the "
                             "run to be resumed)")
        if self.folder is None:
            return self
        self.folder.acquire()
        try:
            self._claim_folder()
        except BaseException:
            self.folder.release()
            raise
        return self

    def _claim_folder(self):
        name = os.path.basename(self.checkpoint)
        existing = self.folder.holds_run(name)
        if existing and self.overwrite:
            self.folder.clear(name)
        elif existing and self.resume_from is None:
            raise RunFolderError(f"{self.who}: run folder {self.folder.path} already holds a run ({existing[0]}); "
                                 "resume it (resume_from / --resume) or replace it (overwrite=True / --overwrite)")
        remove_temporary_files(self.checkpoint)

    def __exit__(self, kind, error, traceback):
        if kind is KeyboardInterrupt:
            self.last_saved = self._newest_saved_step()  # from the disk: Ctrl-C may land right after a rename
            print(f"\n{self.who}: interrupted at step {self.step}; {self._where_last_checkpoint()}", file=sys.stderr)
        if self.folder is not None:
            self.folder.release()

    def _where_last_checkpoint(self):
        if self.checkpoint and self.last_saved is not None:
            return f"the last checkpoint is {self.checkpoint}.npz (step {self.last_saved})"
        return "there is no checkpoint to resume from"

    def resume(self, history):
        """`history` (a new run's), or the interrupted run's history with everything restored from its
        checkpoint (model, optimizer, schedule, random generators, the data generator)."""
        if self.resume_from is not None:
            _, state = load_checkpoint(self.resume_from, self.model, self.optimizer, self.scheduler)
            if state.get("config") != self.config.to_dict():
                saved, mine = state.get("config") or {}, self.config.to_dict()
                differing = [f"{k}: saved {saved.get(k)!r}, now {mine.get(k)!r}" for k in sorted(set(saved) | set(mine))
                             if saved.get(k) != mine.get(k)]
                raise ValueError(f"{self.who}: cannot resume from {self.resume_from!r}: it was saved with other "
                                 f"settings ({'; '.join(differing)})")
            self.start_step, history = state["step"], state["history"]
            self.data_rng.bit_generator.state = state["data_rng"]
            self.saved_state = state
            self.last_saved = self._newest_saved_step()
        self.step = self.start_step
        self._started = time.perf_counter() - history["seconds"]
        return history

    def steps(self, desc=None):
        """The step numbers still to do, 1-based (step k is the k-th update), with a progress bar if asked for."""
        total = self.config.steps
        steps = range(self.start_step + 1, total + 1)
        if self.progress:
            from tqdm.auto import tqdm  # imported only when shown: it costs a command-line run 0.15 s to start

            self.bar = steps = tqdm(steps, desc=desc or self.who, initial=self.start_step, total=total)
        try:
            for step in steps:
                self.step = step
                yield step
        finally:
            if self.bar is not None:
                self.bar.close()

    def show(self, **values):
        """Show the latest numbers next to the progress bar."""
        if self.bar is not None:
            self.bar.set_postfix(values)

    def check_loss(self, step, loss_value):
        """The divergence guard: stop with TrainingDiverged when the loss is NaN or infinite, naming a checkpoint
        whose weights gave a finite loss (see the module docstring)."""
        if math.isfinite(loss_value):
            return
        note = ""
        if self.checkpoint and self._set_aside(step - 1):
            note = (f" The checkpoint of step {step - 1} gives this loss; it was moved to "
                    f"{self.checkpoint}.diverged.npz.")
        raise TrainingDiverged(f"{self.who}: the loss became {loss_value} at step {step}; stopping "
                               f"({self._where_last_checkpoint()}).{note} Try a lower learning rate or a smaller "
                               "grad_clip.")

    def _step_of(self, file):
        try:
            return read_checkpoint_file(file)[0]["state"].get("step")
        except (CheckpointError, OSError):
            return None

    def _newest_saved_step(self):
        """The step of the checkpoint that loading would take now (None: none)."""
        if self.checkpoint is None:
            return None
        _, current, previous, _ = checkpoint_files(self.checkpoint)
        step = self._step_of(current)
        return step if step is not None else self._step_of(previous)

    def _set_aside(self, bad_step):
        """Move the checkpoint holding the weights of `bad_step` (they gave a non-finite loss) to
        `<name>.diverged.npz`, so that `<name>.npz` is the one before it. Returns whether there was one."""
        base, current, previous, _ = checkpoint_files(self.checkpoint)
        found = False
        for file in (current, previous):
            if self._step_of(file) == bad_step:
                os.replace(file, base + ".diverged.npz")
                found = True
        if not os.path.exists(current) and os.path.exists(previous):
            os.replace(previous, current)
        self.last_saved = self._newest_saved_step()
        return found

    def end_step(self, step, history, **state):
        """Record the wall time, then save a checkpoint if one is due (with `state`, the loop's own keys)."""
        history["seconds"] = time.perf_counter() - self._started
        if not self.checkpoint or not checkpoint_due(step, self.config.checkpoint_every, self.config.steps):
            return
        try:
            save_checkpoint(self.checkpoint, self.model, self.optimizer, self.scheduler,
                            {"step": step, "history": history, "config": self.config.to_dict(),
                             "data_rng": self.data_rng.bit_generator.state, **state})
        except NonFiniteCheckpointError as error:
            raise TrainingDiverged(f"{self.who}: the weights became non-finite at step {step}; stopping "
                                   f"({self._where_last_checkpoint()}). {error}") from None
        self.last_saved = step

    def finish(self, history):
        history["seconds"] = time.perf_counter() - self._started
        return history
