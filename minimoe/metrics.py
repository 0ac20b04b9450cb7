"""Evaluation metrics for sampled answers: pass@k.

pass@k asks: if the model may try k times, how often does at least one try succeed? Measuring it naively (draw
k samples, check, repeat) is noisy. The unbiased estimator of Chen et al. (2021, the Codex paper) draws n ≥ k
samples once, counts the c correct ones, and asks how many of the C(n, k) ways to choose k of them contain at
least one correct sample:

    pass@k = 1 − C(n−c, k) / C(n, k)          (the fraction of k-subsets made only of wrong samples, removed)

The binomial coefficients overflow float64 once n passes about a thousand (C(1100, 550) ≈ 10³²⁹), so we use
the product form

    C(n−c, k) / C(n, k) = Π_{i=n−c+1}^{n} (1 − k/i)

which multiplies c numbers in [0, 1]; a running product over i = n, n−1, … gives it for every c at once. If
fewer than k samples are wrong (n − c < k) every k-subset holds a correct one and pass@k = 1. Averaging pass@k
over problems gives the benchmark number.

Host NumPy is right here: the counts are host integers from an evaluation loop, not tensors.
"""

import numbers

import numpy as np  # host counts, not tensors

__all__ = ["pass_at_k"]


def _check_count(value, name):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"pass_at_k: {name} must be an integer, got {value!r}")
    return int(value)


def pass_at_k(n, c, k):
    """Unbiased pass@k for n samples of which c are correct: 1 − C(n−c, k)/C(n, k).

    n, k -- integers with 1 ≤ k ≤ n
    c    -- an integer 0 ≤ c ≤ n, or an array of them (one count per problem)
    Returns a float for an integer c, a float64 array of c's shape otherwise.
    """
    n, k = _check_count(n, "n"), _check_count(k, "k")
    if n < 1:
        raise ValueError(f"pass_at_k: need at least one sample, got n={n}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: k={k} must lie in 1..n={n} (pass@k needs at least k samples)")
    scalar = np.ndim(c) == 0
    counts = np.asarray(c)
    if counts.dtype.kind not in "iu":
        raise TypeError(f"pass_at_k: c must hold integers, got dtype {counts.dtype}")
    if counts.size and (counts.min() < 0 or counts.max() > n):
        raise ValueError(f"pass_at_k: every c must lie in 0..n={n}, got values from {counts.min()} "
                         f"to {counts.max()}")
    i = np.arange(n, 0, -1, dtype=np.float64)  # (n,)  n, n−1, …, 1
    # all_wrong[m] = Π over the m largest i of (1 − k/i) = C(n−m, k)/C(n, k): one running product serves every c.
    # Entries with n − m < k pass through factors ≤ 0; they are never used.
    all_wrong = np.concatenate([[1.0], np.cumprod(1.0 - k / i)])  # (n + 1,)
    result = np.where(n - counts < k, 1.0, 1.0 - all_wrong[counts])
    return float(result) if scalar else result
