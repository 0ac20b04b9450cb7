"""pass@k against brute-force enumeration of every k-subset, against exact rational arithmetic for large n,
and on its edge cases and bad input."""

import itertools
import math
from fractions import Fraction

import numpy as np
import pytest

from minimoe.metrics import pass_at_k


def brute_force(n, c, k):
    """The share of k-subsets of n samples (the first c correct) that hold at least one correct sample."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in subset) for subset in subsets) / len(subsets)


@pytest.mark.parametrize("n", range(1, 9))
def test_matches_enumeration_of_all_subsets(n):
    for c in range(n + 1):
        for k in range(1, n + 1):
            assert pass_at_k(n, c, k) == pytest.approx(brute_force(n, c, k), rel=1e-12, abs=1e-15), (n, c, k)


@pytest.mark.parametrize("n, c, k", [(200, 3, 100), (500, 37, 100), (1000, 1, 999), (1000, 999, 1),
                                     (300, 150, 150)])
def test_stable_for_large_n(n, c, k):
    exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
    assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-12)


def test_edge_cases():
    assert pass_at_k(10, 0, 5) == 0.0       # nothing correct
    assert pass_at_k(10, 10, 1) == 1.0      # everything correct
    assert pass_at_k(10, 1, 10) == 1.0      # k = n: the one correct sample is always drawn
    assert pass_at_k(10, 0, 10) == 0.0
    assert pass_at_k(10, 6, 5) == 1.0       # k > n − c: fewer than k wrong samples
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)  # pass@1 is the share of correct samples
    assert pass_at_k(1, 1, 1) == 1.0 and pass_at_k(1, 0, 1) == 0.0


def test_vectorised_over_c():
    n, k = 16, 4
    c = np.array([[0, 1, 5], [12, 13, 16]])
    result = pass_at_k(n, c, k)
    assert result.shape == (2, 3) and result.dtype == np.float64
    expected = [[pass_at_k(n, int(x), k) for x in row] for row in c]
    np.testing.assert_array_equal(result, expected)
    assert isinstance(pass_at_k(n, 3, k), float)
    assert isinstance(pass_at_k(n, np.int64(3), k), float)


@pytest.mark.parametrize("n, c, k, error, match", [
    (5, 2, 6, ValueError, "k=6"),
    (5, 2, 0, ValueError, "k=0"),
    (5, 6, 2, ValueError, "0..n=5"),
    (5, -1, 2, ValueError, "0..n=5"),
    (5, np.array([1, 7]), 2, ValueError, "0..n=5"),
    (0, 0, 1, ValueError, "n=0"),
    (5, 2.0, 2, TypeError, "integers"),
    (5, 2, 2.0, TypeError, "k must be an integer"),
    (True, 1, 1, TypeError, "n must be an integer"),
])
def test_bad_input(n, c, k, error, match):
    with pytest.raises(error, match=match):
        pass_at_k(n, c, k)
