"""Checks shared by the tests and the lessons: each prints a one-line comparison and raises when it fails.

    check_close(mine, reference, name="softmax")   # softmax: max |diff| 2.2e-16 (atol 1e-10, rtol 1e-10)  ok
    check_shape(x, (B, T, C), name="logits")

    with exercise("one_hot"):                      # a lesson's exercise: the checks of a student's answer
        check_close(one_hot(ids, 5), expected)
"""

import contextlib
import os

import numpy as np

from .autograd import Tensor
from .backend import backend_of

__all__ = ["check_close", "check_shape", "to_numpy", "exercise", "ExerciseNotDone", "STRICT_ENV"]

STRICT_ENV = "MINIMOE_LESSON_STRICT"


def to_numpy(value):
    """A host NumPy array from a Tensor, a backend array, a torch tensor or anything array-like."""
    if isinstance(value, Tensor):
        return value.numpy()
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch tensor, without importing torch
        return value.detach().cpu().numpy()
    try:
        return backend_of(value).to_numpy(value)
    except TypeError:
        return np.asarray(value)


def check_close(actual, expected, atol=1e-10, rtol=1e-10, name="value", quiet=False):
    """Assert that two arrays (or tensors) have the same shape and agree elementwise within
    |actual - expected| ≤ atol + rtol·|expected|. Prints one line; raises AssertionError otherwise."""
    a, e = to_numpy(actual), to_numpy(expected)
    if a.shape != e.shape:
        raise AssertionError(f"{name}: shape {a.shape} differs from the expected {e.shape}")
    if a.size == 0:
        return
    a64, e64 = a.astype(np.float64), e.astype(np.float64)
    difference = np.abs(a64 - e64)
    both_nan = np.isnan(a64) & np.isnan(e64)
    excess = np.where(both_nan, 0.0, difference - (atol + rtol * np.abs(e64)))
    worst = float(np.nanmax(np.where(both_nan, 0.0, difference)))
    ok = bool(np.all(excess <= 0))
    if not quiet or not ok:
        print(f"{name}: max |diff| {worst:.3g} (atol {atol:g}, rtol {rtol:g})  {'ok' if ok else 'MISMATCH'}")
    if not ok:
        at = np.unravel_index(np.nanargmax(np.nan_to_num(excess, nan=np.inf)), excess.shape)
        raise AssertionError(f"{name}: mismatch at index {tuple(int(i) for i in at)}: got {float(a64[at])!r}, "
                             f"expected {float(e64[at])!r} (max |diff| {worst:.3g})")


def check_shape(value, shape, name="value"):
    """Assert that `value` has exactly `shape`. Prints one line; raises AssertionError otherwise."""
    actual = tuple(value.shape)
    ok = actual == tuple(shape)
    print(f"{name}: shape {actual}  {'ok' if ok else f'MISMATCH, expected {tuple(shape)}'}")
    if not ok:
        raise AssertionError(f"{name}: shape {actual}, expected {tuple(shape)}")


class ExerciseNotDone(AssertionError):
    """Strict mode met an exercise whose stub is still unfilled (it raised NotImplementedError)."""


@contextlib.contextmanager
def exercise(name):
    """Run the checks of one lesson exercise inside `with exercise(name): ...`.

    The stub a student fills in raises NotImplementedError until it is written. While it does, this prints
    "<name>: not done yet" and lets the notebook run on. A wrong answer fails its check and raises, as it should.
    With the environment variable MINIMOE_LESSON_STRICT=1 (the tests set it when they run the solutions) an
    unfilled stub raises ExerciseNotDone instead. When every check passes it prints "<name>: passed".
    """
    try:
        yield
    except NotImplementedError as error:
        if os.environ.get(STRICT_ENV) == "1":
            raise ExerciseNotDone(f"exercise {name!r} is not done: its code raised NotImplementedError "
                                  f"({error}), but {STRICT_ENV}=1 requires every exercise to pass") from error
        print(f"{name}: not done yet. Fill in the stub above, run it, then run this cell again.")
        return
    print(f"{name}: passed")
