"""pass@k: the unbiased estimator against brute-force enumeration, and accuracy helpers."""
import itertools
import math

import numpy as np
import pytest

from arca_jax.tasks.metrics import greedy_accuracy, mean_pass_at_k, pass_at_k


def _brute(n, c, k):
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_matches_enumeration():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(_brute(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_k_large_n_is_stable():
    for n, c, k in [(1000, 10, 100), (2000, 1, 1000), (500, 250, 4)]:
        exact = 1.0 - math.comb(n - c, k) / math.comb(n, k)
        assert pass_at_k(n, c, k) == pytest.approx(exact, rel=1e-10)
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(10, 0, 5) == 0.0
    assert pass_at_k(10, 7, 4) == 1.0


@pytest.mark.parametrize("n, c, k", [(4, 5, 1), (4, -1, 1), (4, 1, 0), (4, 1, 5)])
def test_pass_at_k_rejects_bad_arguments(n, c, k):
    with pytest.raises(ValueError):
        pass_at_k(n, c, k)


def test_mean_pass_at_k_and_greedy_accuracy():
    rewards = np.array([[1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 0, 1]], dtype=np.float32)
    assert mean_pass_at_k(rewards, 1) == pytest.approx((0.25 + 0 + 0.75) / 3)
    assert mean_pass_at_k(rewards, 4) == pytest.approx(2 / 3)
    assert mean_pass_at_k(rewards, 2) == pytest.approx((0.5 + 0 + 1.0) / 3)
    with pytest.raises(ValueError):
        mean_pass_at_k(np.zeros(4), 1)
    assert greedy_accuracy([1.0, 0.0, 1.0, 1.0]) == 0.75
    assert greedy_accuracy(np.zeros((2, 3))) == 0.0
    assert greedy_accuracy([]) == 0.0
