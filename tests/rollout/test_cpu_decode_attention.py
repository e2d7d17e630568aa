"""`cache_attention.attend_cpu`, the C++ decode attention: the values of `attend(..., "reduce")`
(its cache layout) over random caches with masked slots, head groups of every size the kernel
splits into, head sizes off its 16 lanes, and `filled` short of the cache (slots past it are
skipped, as no row sees them); a row that sees no slot averages the first `filled` values."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arca_jax.qwen3 import cache_attention, cpu_kernels

pytestmark = pytest.mark.skipif(not cpu_kernels.available(),
                                reason=f"CPU kernels: {cpu_kernels.error()}")
MIN = float(jnp.finfo(jnp.float32).min)


def _case(B, K, G, H, S, filled, seed):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(B, 1, K * G, H)).astype(np.float32)
    k = rng.normal(size=(B, K, H, S)).astype(np.float32)
    v = rng.normal(size=(B, K, S, H)).astype(np.float32)
    visible = rng.random((B, S)) < 0.7
    visible[:, filled:] = False  # no row sees a slot at or past `filled`
    visible[np.arange(B), rng.integers(0, filled, B)] = True
    bias = np.where(visible, 0.0, MIN).astype(np.float32)[:, None, :]
    return q, k, v, bias


@pytest.mark.parametrize("B, K, G, H, S, filled", [
    (3, 2, 2, 32, 96, 96), (2, 1, 5, 16, 40, 33), (2, 3, 1, 12, 20, 7), (1, 2, 4, 40, 17, 17),
    (4, 1, 8, 64, 130, 100), (1, 1, 3, 256, 48, 1)],
    ids=["demo", "five-heads", "narrow-head", "odd-slots", "eight-heads", "one-slot"])
def test_values_equal_the_reduce_attention(B, K, G, H, S, filled):
    q, k, v, bias = _case(B, K, G, H, S, filled, seed=B * S + H)
    want = cache_attention.attend(*map(jnp.asarray, (q, k, v, bias)), "reduce")
    got = jax.jit(cache_attention.attend_cpu)(*map(jnp.asarray, (q, k, v, bias)),
                                              jnp.int32(filled))
    assert got.shape == (B, 1, K * G * H) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=2e-6)


def test_a_row_that_sees_nothing_averages_the_values():
    q, k, v, bias = _case(2, 1, 2, 16, 24, 24, seed=0)
    bias[1] = MIN  # row 1 sees no slot: a softmax of equal scores
    got = np.asarray(cache_attention.attend_cpu(*map(jnp.asarray, (q, k, v, bias)),
                                                jnp.int32(24)))
    want = cache_attention.attend(*map(jnp.asarray, (q, k, v, bias)), "reduce")
    np.testing.assert_allclose(got, np.asarray(want), rtol=1e-5, atol=2e-6)
    np.testing.assert_allclose(got[1, 0, :16], v[1, 0].mean(0), rtol=1e-5, atol=1e-6)
