"""Checkpoints that lose no work: one file, `<name>.npz`, replaced by one atomic rename.

Format 2 (this module writes it):
- `<name>.npz` is an ordinary NumPy archive: the arrays (`model/<parameter>`, `optimizer/<i>/<buffer>`), the
  metadata as UTF-8 JSON bytes in the uint8 entry `__meta__` (format, model class and configuration, optimizer and
  schedule state, random generators, the caller's own `state`), and in `__sha256__` one SHA-256 over all of it:
  every array's name, dtype, shape and bytes, then the metadata bytes. Editing a weight or a configuration field
  (`n_activated_experts`, `rope_theta`, ...) makes the file refuse to load.
- Safe to load: arrays are read with `allow_pickle=False`, so a checkpoint cannot run code.
- Atomic, and the previous one kept: everything is serialised and checked in memory first (a state that JSON cannot
  hold, or a non-finite weight, is refused before the disk is touched); the bytes go to a temporary file
  `.tmp-<name>.npz-*` in the same folder, are flushed to disk (fsync) and read back and verified; then the current
  `<name>.npz` becomes `<name>.prev.npz` and the temporary file becomes `<name>.npz` (two renames; at every instant
  one complete, verified checkpoint exists under one of the two names).
- Loading takes the newest *valid* file — `<name>.npz`, else `<name>.prev.npz` — and warns, naming the refused file
  and why. A file is valid when it is a readable archive, its hash matches, its format is known and every weight
  is finite.
- Format 1 (before December 2026: `<name>.npz` arrays + `<name>.json` metadata with the SHA-256 of the arrays file)
  still loads, its hash checked; saving over it writes format 2 and keeps the format 1 pair as the previous
  checkpoint (`<name>.prev.npz` + `<name>.prev.json`).
- Complete: model, optimizer and schedule state, every random generator and the caller's own state (step,
  history), so that a resumed run on NumPy continues bit for bit as if never interrupted.
"""

import glob
import hashlib
import io
import json
import os
import tempfile
import warnings
import zipfile

import numpy as np

from .backend import backend_of, random_state, set_random_state
from .model import ModelConfig, Transformer

__all__ = ["save_checkpoint", "load_checkpoint", "read_checkpoint", "read_checkpoint_file", "checkpoint_files", "remove_temporary_files",
           "register_model_class", "weights_digest", "CheckpointError", "NonFiniteCheckpointError", "FORMAT_VERSION"]

FORMAT_VERSION = 2
MODEL_CLASSES = {"Transformer": Transformer}  # what a checkpoint may build; register_model_class adds more


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, corrupted, or does not fit the model it is loaded into."""


class NonFiniteCheckpointError(CheckpointError):
    """A checkpoint would hold (or holds) NaN or infinite weights."""


def register_model_class(cls):
    """Let checkpoints build `cls` (a Module built as cls(config); its config class is `cls.config_class` if it
    has one, else ModelConfig). Usable as a class decorator."""
    MODEL_CLASSES[cls.__name__] = cls
    return cls


def checkpoint_files(path):
    """(base, current, previous, legacy_json) paths of the checkpoint `path` (with or without `.npz`)."""
    base = str(path)
    for suffix in (".npz", ".json"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
    return base, base + ".npz", base + ".prev.npz", base + ".json"


def remove_temporary_files(path):
    """Delete the temporary files that writes of checkpoint `path` killed midway left behind. Returns them."""
    _, current, previous, _ = checkpoint_files(path)
    folder = os.path.dirname(os.path.abspath(current))
    leftovers = []
    for name in (current, previous):
        leftovers += glob.glob(os.path.join(glob.escape(folder), ".tmp-" + glob.escape(os.path.basename(name)) + "-*"))
    for leftover in leftovers:
        os.remove(leftover)
    return leftovers


def _to_host(value):
    """A host NumPy array from an array of any backend, or from a Python number (an optimizer's step count)."""
    try:
        return backend_of(value).to_numpy(value)
    except TypeError:
        return np.asarray(value)


def _digest(arrays, meta_bytes):
    """SHA-256 over every array (name, dtype, shape, bytes, in name order) and then the metadata bytes."""
    digest = hashlib.sha256()
    for name in sorted(arrays):
        array = np.ascontiguousarray(arrays[name])
        digest.update(json.dumps([name, array.dtype.str, list(array.shape)]).encode())
        digest.update(array.tobytes())
    digest.update(meta_bytes)
    return digest.hexdigest()


def weights_digest(model):
    """SHA-256 of a model's weights (names, dtypes, shapes, bytes): tells two sets of weights apart."""
    return _digest({name: _to_host(value) for name, value in model.state_dict().items()}, b"")


def _non_finite(arrays):
    """Names of the floating-point arrays that hold a NaN or an infinity."""
    return [name for name, a in arrays.items() if a.dtype.kind in "fc" and not np.isfinite(a).all()]


def _pack(model, optimizer, scheduler, state, path):
    """The checkpoint's bytes, built and checked in memory: nothing here touches the disk."""
    arrays = {f"model/{name}": _to_host(value) for name, value in model.state_dict().items()}
    meta = {"format": FORMAT_VERSION, "model_class": type(model).__name__, "model_config": model.config.to_dict(),
            "random_state": random_state(), "state": state or {}}
    if optimizer is not None:
        optimizer_state = optimizer.state_dict()
        for i, buffers in enumerate(optimizer_state["state"]):
            for name, value in buffers.items():
                arrays[f"optimizer/{i}/{name}"] = _to_host(value)
        meta["optimizer"] = {"type": type(optimizer).__name__, "step": optimizer_state["step"],
                             "lr": optimizer_state["lr"], "n_params": len(optimizer_state["state"])}
    if scheduler is not None:
        meta["scheduler"] = scheduler.state_dict()
    bad = _non_finite(arrays)
    if bad:
        raise NonFiniteCheckpointError(f"save_checkpoint({str(path)!r}): refused to save non-finite values in "
                                       f"{', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}; nothing was written")
    try:
        meta_bytes = json.dumps(meta, sort_keys=True).encode()  # a NaN in a logged history is fine
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"save_checkpoint({str(path)!r}): the metadata cannot be stored as JSON ({error}); "
                              "convert NumPy scalars with float()/int(); nothing was written") from None
    entries = dict(arrays, __meta__=np.frombuffer(meta_bytes, dtype=np.uint8),
                   __sha256__=np.frombuffer(_digest(arrays, meta_bytes).encode(), dtype=np.uint8))
    buffer = io.BytesIO()
    np.savez(buffer, **entries)
    return buffer.getvalue()


def _fsync_folder(folder):
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:  # folders cannot be opened on every platform; the renames are still atomic there
        return
    try:
        os.fsync(handle)
    finally:
        os.close(handle)


def _write_temporary(folder, name, data):
    """Write `data` to a new temporary file in `folder`, flushed to disk. Returns its path."""
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=f".tmp-{name}-")
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(temporary, 0o666 & ~umask)  # mkstemp makes private files; a checkpoint is an ordinary file
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
    except BaseException:
        os.remove(temporary)
        raise
    return temporary


def save_checkpoint(path, model, optimizer=None, scheduler=None, state=None):
    """Save model (+ optimizer, scheduler, random generators, and `state`, a JSON-friendly dict of the
    caller's own, e.g. {"step": 500, "history": ...}) to `path`.npz, keeping the one it replaces as
    `path`.prev.npz. Returns the path written. Raises CheckpointError, writing nothing, when the weights are
    not finite or `state` is not JSON."""
    data = _pack(model, optimizer, scheduler, state, path)
    base, current, previous, legacy_json = checkpoint_files(path)
    previous_json = base + ".prev.json"
    folder = os.path.dirname(os.path.abspath(current))
    os.makedirs(folder, exist_ok=True)
    remove_temporary_files(path)
    temporary = _write_temporary(folder, os.path.basename(current), data)
    try:
        read_checkpoint_file(temporary)  # read back what reached the disk before it replaces anything
        if os.path.exists(current) and _valid(current):  # a damaged file never pushes out a good previous one
            if os.path.exists(legacy_json):  # format 1: its metadata goes along, first
                os.replace(legacy_json, previous_json)
            elif os.path.exists(previous_json):
                os.remove(previous_json)
            os.replace(current, previous)
        os.replace(temporary, current)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        if not os.path.exists(current) and os.path.exists(previous):
            os.replace(previous, current)  # put back the checkpoint the failed write had moved aside
        raise
    _fsync_folder(folder)
    if os.path.exists(legacy_json):
        os.remove(legacy_json)  # the metadata of a format 1 file that was not valid, now replaced
    return current


# ---------------------------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------------------------

def read_checkpoint_file(file):
    """(meta, arrays) of one format 2 file, or of a format 1 pair; CheckpointError naming the reason if invalid.
    No fallback: `read_checkpoint` is what loading uses."""
    with open(file, "rb") as handle:
        data = handle.read()
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except ValueError as error:  # e.g. an object array, which only unpickling could read
        raise CheckpointError(f"{file}: refused to load ({error})") from None
    except (zipfile.BadZipFile, OSError, EOFError, KeyError) as error:
        raise CheckpointError(f"{file}: not a readable .npz archive, truncated or damaged ({error})") from None
    if "__meta__" not in arrays:
        meta = _check_format_1(file, data)
    else:
        meta_bytes, saved = arrays.pop("__meta__").tobytes(), arrays.pop("__sha256__", np.zeros(0, np.uint8))
        if _digest(arrays, meta_bytes) != saved.tobytes().decode("ascii", "replace"):
            raise CheckpointError(f"{file}: SHA-256 differs: the file was changed or damaged after it was written")
        meta = json.loads(meta_bytes)
        if meta.get("format") != FORMAT_VERSION:
            raise CheckpointError(f"{file}: format {meta.get('format')!r}; this minimoe reads formats 1 and "
                                  f"{FORMAT_VERSION}")
    missing = sorted({"model_config", "random_state", "state"} - set(meta))
    if missing:
        raise CheckpointError(f"{file}: the metadata lacks {', '.join(missing)}")
    bad = _non_finite(arrays)
    if bad:
        raise NonFiniteCheckpointError(f"{file}: non-finite values (NaN or inf) in {', '.join(bad[:5])}")
    return meta, arrays


def _check_format_1(file, data):
    """The metadata of a format 1 checkpoint (arrays file + `.json` beside it), its hash checked."""
    json_file = file[: -len(".npz")] + ".json"
    if not os.path.exists(json_file):
        raise CheckpointError(f"{file}: holds no metadata (`__meta__`), and no format 1 file {json_file} is "
                              "beside it")
    with open(json_file) as handle:
        try:
            meta = json.load(handle)
        except json.JSONDecodeError as error:
            raise CheckpointError(f"{json_file}: not valid JSON ({error})") from None
    if not isinstance(meta, dict) or meta.get("format") != 1:
        raise CheckpointError(f"{json_file}: not a format 1 checkpoint")
    if hashlib.sha256(data).hexdigest() != meta.get("arrays_sha256"):
        raise CheckpointError(f"{file} does not match {json_file} (SHA-256 differs): the pair was not written "
                              "together, or a file was changed or truncated")
    return meta


def _valid(file):
    try:
        read_checkpoint_file(file)
    except CheckpointError:
        return False
    return True


def read_checkpoint(path):
    """(meta dict, {name: host array}) of the newest valid checkpoint at `path`: `path`.npz, else
    `path`.prev.npz with a warning that names the refused file and why. CheckpointError if neither is valid."""
    _, current, previous, _ = checkpoint_files(path)
    refused = []
    for file in (current, previous):
        if not os.path.exists(file):
            refused.append(f"{file} does not exist")
            continue
        try:
            meta, arrays = read_checkpoint_file(file)
        except CheckpointError as error:
            refused.append(str(error))
            continue
        if refused and os.path.exists(current):
            warnings.warn(f"checkpoint {current} refused ({refused[0]}); loaded the previous one, {file}",
                          stacklevel=3)
        return meta, arrays
    raise CheckpointError(f"checkpoint {str(path)!r}: no valid file: " + "; ".join(refused))


def _build_model(meta, path):
    name = meta.get("model_class", "Transformer")  # format 1 only ever saved Transformers
    if name not in MODEL_CLASSES:
        raise CheckpointError(f"checkpoint {str(path)!r} holds a {name}; known model classes: {sorted(MODEL_CLASSES)}"
                              " (add one with minimoe.checkpoint.register_model_class)")
    cls = MODEL_CLASSES[name]
    try:
        return cls(getattr(cls, "config_class", ModelConfig).from_dict(meta["model_config"]))
    except (TypeError, ValueError) as error:
        raise CheckpointError(f"checkpoint {str(path)!r}: its model configuration is refused ({error})") from None


def _check_fits(model, meta, path):
    saved_class = meta.get("model_class", "Transformer")
    if saved_class != type(model).__name__:
        raise CheckpointError(f"checkpoint {str(path)!r} holds a {saved_class}, not a {type(model).__name__}")
    mine, saved = model.config.to_dict(), meta["model_config"]
    differing = [f"{k}: saved {saved.get(k)!r}, model {mine.get(k)!r}" for k in sorted(set(mine) | set(saved))
                 if mine.get(k) != saved.get(k)]
    if differing:
        raise CheckpointError(f"checkpoint {str(path)!r} was saved from a different model configuration: "
                              + "; ".join(differing))


def _optimizer_state(meta, arrays, optimizer, path):
    if "optimizer" not in meta:
        raise CheckpointError(f"checkpoint {str(path)!r} holds no optimizer state")
    saved = meta["optimizer"]
    if saved["type"] != type(optimizer).__name__ or saved["n_params"] != len(optimizer.params):
        raise CheckpointError(f"checkpoint {str(path)!r}: optimizer {saved['type']} over {saved['n_params']} "
                              f"parameters, not {type(optimizer).__name__} over {len(optimizer.params)}")
    buffers = [{} for _ in range(saved["n_params"])]
    for name, value in arrays.items():
        if name.startswith("optimizer/"):
            _, index, buffer = name.split("/")
            buffers[int(index)][buffer] = value
    return {"step": saved["step"], "lr": saved["lr"], "state": buffers}


def load_checkpoint(path, model=None, optimizer=None, scheduler=None, restore_random_state=True):
    """Load a checkpoint. With no `model`, builds one of the saved class from the saved configuration.
    Returns (model, the caller's `state` dict). Raises CheckpointError on any mismatch, changing nothing."""
    meta, arrays = read_checkpoint(path)
    if model is None:
        model = _build_model(meta, path)
    else:
        _check_fits(model, meta, path)
    model_state = {name[len("model/"):]: value for name, value in arrays.items() if name.startswith("model/")}
    # everything is checked before anything is loaded, so a refusal changes nothing
    optimizer_state = _optimizer_state(meta, arrays, optimizer, path) if optimizer is not None else None
    if scheduler is not None and "scheduler" not in meta:
        raise CheckpointError(f"checkpoint {str(path)!r} holds no schedule state")
    try:
        model.load_state_dict(model_state)
        if optimizer is not None:
            optimizer.load_state_dict(optimizer_state)
    except ValueError as error:
        raise CheckpointError(f"checkpoint {str(path)!r}: {error}") from error
    if scheduler is not None:
        scheduler.load_state_dict(meta["scheduler"])
    if restore_random_state:
        set_random_state(meta["random_state"])
    return model, meta["state"]
