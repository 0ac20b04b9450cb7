"""Checkpoints that lose no work: `<name>.npz` holds the arrays, `<name>.json` the configuration and state.

- Safe to load: arrays are read with `allow_pickle=False`, so a checkpoint cannot run code.
- Atomic: each file is written to a temporary name in the same folder and renamed into place, so a crash
  mid-write leaves the previous checkpoint intact. The JSON records the SHA-256 of the arrays file; a pair that
  does not match (a crash between the two renames, a copied file) is refused with a clear error.
- Validated: parameter names and shapes (strict `load_state_dict`), the optimizer's buffers, and the model
  configuration are checked before anything is changed.
- Complete: model, optimizer and schedule state, every random generator and the caller's own state (step,
  history), so that a resumed run on NumPy continues bit for bit as if never interrupted.
"""

import hashlib
import io
import json
import os
import tempfile

from .backend import numpy, random_state, set_random_state
from .nn.module import _host

__all__ = ["save_checkpoint", "load_checkpoint", "read_checkpoint", "CheckpointError"]

FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint is missing, incomplete, corrupted, or does not fit the model it is loaded into."""


def _paths(path):
    base = str(path)
    for suffix in (".npz", ".json"):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
    return base + ".npz", base + ".json"


def _write_atomically(path, data):
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    umask = os.umask(0)
    os.umask(umask)
    try:
        os.chmod(temporary, 0o666 & ~umask)  # mkstemp makes private files; a checkpoint is an ordinary file
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise


def save_checkpoint(path, model, optimizer=None, scheduler=None, state=None):
    """Save model (+ optimizer, scheduler, random generators, and `state`, a JSON-friendly dict of the
    caller's own, e.g. {"step": 500, "history": ...}) to `path`.npz / `path`.json. Returns the JSON path."""
    npz_path, json_path = _paths(path)
    arrays = {f"model/{name}": _host(value) for name, value in model.state_dict().items()}
    meta = {"format": FORMAT_VERSION, "model_config": model.config.to_dict(), "random_state": random_state(),
            "state": state or {}}
    if optimizer is not None:
        optimizer_state = optimizer.state_dict()
        for i, buffers in enumerate(optimizer_state["state"]):
            for name, value in buffers.items():
                arrays[f"optimizer/{i}/{name}"] = _host(value)
        meta["optimizer"] = {"type": type(optimizer).__name__, "step": optimizer_state["step"],
                             "lr": optimizer_state["lr"], "n_params": len(optimizer_state["state"])}
    if scheduler is not None:
        meta["scheduler"] = scheduler.state_dict()
    buffer = io.BytesIO()
    numpy.savez(buffer, **arrays)
    data = buffer.getvalue()
    meta["arrays_sha256"] = hashlib.sha256(data).hexdigest()
    _write_atomically(npz_path, data)
    _write_atomically(json_path, json.dumps(meta).encode())
    return json_path


def read_checkpoint(path):
    """(meta dict, {name: host array}) after checking that both files exist and belong together."""
    npz_path, json_path = _paths(path)
    for required in (json_path, npz_path):
        if not os.path.exists(required):
            raise CheckpointError(f"checkpoint {path!r}: {required} does not exist")
    with open(json_path) as file:
        try:
            meta = json.load(file)
        except json.JSONDecodeError as error:
            raise CheckpointError(f"checkpoint {json_path}: not valid JSON ({error})") from error
    if meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {json_path}: format {meta.get('format')!r}, expected {FORMAT_VERSION}")
    with open(npz_path, "rb") as file:
        data = file.read()
    if hashlib.sha256(data).hexdigest() != meta.get("arrays_sha256"):
        raise CheckpointError(f"checkpoint {path!r}: {npz_path} does not match {json_path} (SHA-256 differs): the "
                              "pair was not written together, or a file was changed or truncated")
    try:
        with numpy.load(io.BytesIO(data), allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except ValueError as error:  # e.g. an object array, which only unpickling could read
        raise CheckpointError(f"checkpoint {npz_path}: refused to load ({error})") from error
    return meta, arrays


def load_checkpoint(path, model=None, optimizer=None, scheduler=None, restore_random_state=True):
    """Load a checkpoint. With no `model`, builds a Transformer from the saved configuration.
    Returns (model, the caller's `state` dict). Raises CheckpointError on any mismatch, changing nothing."""
    from .model import ModelConfig, Transformer

    meta, arrays = read_checkpoint(path)
    config = ModelConfig.from_dict(meta["model_config"])
    if model is None:
        model = Transformer(config)
    elif model.config != config:
        differing = [f"{k}: saved {v!r}, model {getattr(model.config, k)!r}" for k, v in config.to_dict().items()
                     if getattr(model.config, k) != v]
        raise CheckpointError(f"checkpoint {path!r} was saved from a different model configuration: "
                              + "; ".join(differing))
    model_state = {name[len("model/"):]: value for name, value in arrays.items() if name.startswith("model/")}
    optimizer_state = None
    if optimizer is not None:  # checked before anything is loaded, so a refusal changes nothing
        if "optimizer" not in meta:
            raise CheckpointError(f"checkpoint {path!r} holds no optimizer state")
        saved = meta["optimizer"]
        if saved["type"] != type(optimizer).__name__ or saved["n_params"] != len(optimizer.params):
            raise CheckpointError(f"checkpoint {path!r}: optimizer {saved['type']} over {saved['n_params']} "
                                  f"parameters, not {type(optimizer).__name__} over {len(optimizer.params)}")
        buffers = [{} for _ in range(saved["n_params"])]
        for name, value in arrays.items():
            if name.startswith("optimizer/"):
                _, index, buffer = name.split("/")
                buffers[int(index)][buffer] = value
        optimizer_state = {"step": saved["step"], "lr": saved["lr"], "state": buffers}
    if scheduler is not None and "scheduler" not in meta:
        raise CheckpointError(f"checkpoint {path!r} holds no schedule state")
    try:
        model.load_state_dict(model_state)
        if optimizer is not None:
            optimizer.load_state_dict(optimizer_state)
    except ValueError as error:
        raise CheckpointError(f"checkpoint {path!r}: {error}") from error
    if scheduler is not None:
        scheduler.load_state_dict(meta["scheduler"])
    if restore_random_state:
        set_random_state(meta["random_state"])
    return model, meta["state"]
