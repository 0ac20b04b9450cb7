"""The set-up every lesson's configuration cell calls first, so that a lesson prints the same numbers on a quiet
laptop, a busy one, or a CI runner with any number of cores.

    import minimoe.lesson
    SCALE = minimoe.lesson.setup()  # one BLAS thread, seeds, reads MINIMOE_LESSON_SCALE

It also holds the two helpers of the lessons' timing cells: `best_times` (interleaved repeats, the minimum) and
`timing_claims` (the prose's claim checked with a margin, or a plain "too noisy to time right now").

Why one BLAS thread: a matrix product split over several threads adds its partial sums in an order that depends on
the thread count, so the last bits of a float differ between 1 and 2 cores — and a sampled reasoning run amplifies
last bits into different answers (a lesson's pass@8 read 0.990 on two threads and 1.000 on one). On a machine
already running other work, BLAS threads that wait for each other also make a lesson several times slower; the
small matrices of the lessons gain nothing from a second thread.
"""

import math
import os
import time

from threadpoolctl import threadpool_limits

import minimoe  # imports NumPy first: threadpoolctl limits only the BLAS libraries already loaded

SCALE_ENV = "MINIMOE_LESSON_SCALE"

_blas_limit = None  # the threadpoolctl limiter; held so that the limit stays set for the kernel's lifetime


def setup(seed=0):
    """Pin BLAS to one thread, seed minimoe's generators with `seed`, and return the lesson's knob:
    float($MINIMOE_LESSON_SCALE), 1 when unset; a value that is not a positive number raises ValueError."""
    global _blas_limit
    _blas_limit = threadpool_limits(1, user_api="blas")
    minimoe.manual_seed(seed)
    text = os.environ.get(SCALE_ENV, "1")
    try:
        scale = float(text)
    except ValueError:
        raise ValueError(f"minimoe.lesson.setup: {SCALE_ENV}={text!r} is not a number; "
                         "expected e.g. 1, 3 or 10") from None
    if not scale > 0:
        raise ValueError(f"minimoe.lesson.setup: {SCALE_ENV}={text!r}; expected a positive number (1 is the default)")
    return scale


def best_times(candidates, repeats=5):
    """The shortest wall time, in seconds, of each zero-argument callable in `candidates` (a dict name -> fn).

    The callables run in turn, round after round (one warm-up round, then `repeats` timed ones), so that a burst of
    load from another program slows all of them alike instead of one; and the minimum is the run least disturbed,
    the closest a busy machine gets to the cost of the code itself (a median or a mean still carries the noise)."""
    best = {name: math.inf for name in candidates}
    for timed_round in range(repeats + 1):
        for name, fn in candidates.items():
            start = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - start
            if timed_round:
                best[name] = min(best[name], elapsed)
    return best


def timing_claims(claims):
    """Print each claim of a timing cell (a dict statement -> bool, measured with a margin) and return whether all
    of them hold. When one does not, say so plainly instead of failing: a timing on a shared machine is evidence,
    not a proof, and another program may have run at the wrong moment — rerun the cell when the machine is quiet."""
    for statement, holds in claims.items():
        print(f"{'holds' if holds else 'DOES NOT HOLD'}: {statement}")
    if all(claims.values()):
        return True
    print("This machine is too noisy to time right now (another program is competing for the cores): the "
          "measurements below are not trustworthy. Rerun this cell when the machine is quiet.")
    return False
