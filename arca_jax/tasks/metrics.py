"""Evaluation metrics: the unbiased pass@k estimator and greedy accuracy."""
from __future__ import annotations

import numpy as np


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` are correct (Chen et al., 2021).

    ``1 - C(n - c, k) / C(n, k)`` in the numerically stable product form
    ``1 - prod_{i = n - c + 1}^{n} (1 - k / i)``; 1.0 when ``n - c < k``.
    Requires ``0 <= c <= n`` and ``1 <= k <= n``.
    """
    n, c, k = int(n), int(c), int(k)
    if not 0 <= c <= n:
        raise ValueError("need 0 <= c <= n, got n=%d c=%d" % (n, c))
    if not 1 <= k <= n:
        raise ValueError("need 1 <= k <= n, got n=%d k=%d" % (n, k))
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def mean_pass_at_k(rewards, k: int, threshold: float = 0.5) -> float:
    """Mean pass@k over prompts from a ``[num_prompts, n]`` array of rewards (correct: > threshold)."""
    r = np.asarray(rewards, dtype=np.float64)
    if r.ndim != 2 or r.shape[0] == 0:
        raise ValueError("rewards must have shape [num_prompts, n] with num_prompts >= 1, got %s" % (r.shape,))
    n = r.shape[1]
    correct = (r > threshold).sum(axis=1)
    return float(np.mean([pass_at_k(n, int(c), k) for c in correct]))


def greedy_accuracy(rewards, threshold: float = 0.5) -> float:
    """Fraction of (greedy) completions whose reward exceeds ``threshold``; 0.0 for an empty batch."""
    r = np.asarray(rewards, dtype=np.float64).reshape(-1)
    return float(np.mean(r > threshold)) if r.size else 0.0
