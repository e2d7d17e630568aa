"""`draw.block_softmax_cpu`: the kernel's row max, block sums of exp((x - max) / t) and untempered
total equal a float64 numpy oracle (vocabularies off the 128-token blocks and the 16-lane vectors,
rows cut in several segments with the max in a later one, masked tokens at -inf, the serial and
the threaded path); `choose_tokens(cpu_kernel=True)` draws the tokens of XLA's reductions with
the same log-probabilities up to rounding; the sampler with packed weights uses it."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arca_jax import draw, qwen3, sampling
from arca_jax.qwen3 import cpu_kernels

pytestmark = pytest.mark.skipif(not cpu_kernels.available(),
                                reason=f"CPU kernels: {cpu_kernels.error()}")


def _oracle(x, t, block):
    x = x.astype(np.float64)
    m = x.max(-1)
    B, V = x.shape
    C = -(-V // block)
    e = np.exp((x - m[:, None]) / t)
    padded = np.pad(e, ((0, 0), (0, C * block - V)))
    return m, padded.reshape(B, C, block).sum(-1), np.exp(x - m[:, None]).sum(-1)


@pytest.mark.parametrize("B, V, t", [(16, 8192, 1.0), (3, 1000, 0.7), (2, 40000, 1.0),
                                     (4, 40007, 1.3), (1, 37, 1.0)],
                         ids=["decode", "odd-vocab", "segments", "segments-tempered", "serial"])
def test_block_softmax_equals_numpy(B, V, t):
    rng = np.random.default_rng(V)
    x = (rng.normal(size=(B, V)) * 4).astype(np.float32)
    x[:, rng.integers(0, V, size=V // 10)] = -np.inf  # masked tokens
    if V > 20000:
        x[0, -5] = 40.0  # the row's max in its last segment: the others' sums are rescaled
    got = jax.jit(draw.block_softmax_cpu, static_argnums=1)(jnp.asarray(x), t)
    m, sums, total = _oracle(x, t, draw.CDF_BLOCK)
    np.testing.assert_array_equal(np.asarray(got.max), m.astype(np.float32))
    assert got.sums.shape == sums.shape and got.total.shape == (B,)
    # rescaled segments: exp of a float32 difference of maxima, ~|difference| ulp
    np.testing.assert_allclose(np.asarray(got.sums), sums, rtol=5e-6, atol=1e-30)
    np.testing.assert_allclose(np.asarray(got.total), total, rtol=5e-6)


@pytest.mark.parametrize("t", [1.0, 0.6])
def test_choose_tokens_by_the_kernel_equals_xla(t):
    rng = np.random.default_rng(3)
    logits = jnp.asarray(rng.normal(size=(64, 1000)) * 3, jnp.float32)
    u = jnp.asarray(rng.uniform(1e-6, 1.0, size=64), jnp.float32)
    settings = sampling.SamplingConfig(max_new_tokens=1, temperature=t)
    choose = jax.jit(draw.choose_tokens, static_argnums=(2, 3))
    want, got = choose(logits, u, settings, False), choose(logits, u, settings, True)
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
    np.testing.assert_allclose(np.asarray(got.logps), np.asarray(want.logps), rtol=0, atol=2e-6)
    np.testing.assert_allclose(np.asarray(got.sampled_logps), np.asarray(want.sampled_logps),
                               rtol=0, atol=2e-6)
    lowered = choose.lower(logits, u, settings, True).as_text()
    assert "arca_block_softmax" in lowered
    for truncated in (sampling.SamplingConfig(max_new_tokens=1, top_k=5),
                      sampling.SamplingConfig(max_new_tokens=1, top_p=0.9),
                      sampling.SamplingConfig(max_new_tokens=1, greedy=True)):
        # truncated and greedy draws keep XLA's operations
        assert "arca_block_softmax" not in choose.lower(logits, u, truncated, True).as_text()


def test_the_sampler_with_packed_weights_draws_by_the_kernel():
    config = qwen3.Qwen3Config(vocab_size=300, hidden_size=32, intermediate_size=48,
                               num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                               head_dim=16)
    params = qwen3.init_params(config, jax.random.PRNGKey(0), jnp.float32)
    settings = sampling.SamplingConfig(max_new_tokens=4)
    ids, mask = jnp.ones((2, 3), jnp.int32), jnp.ones((2, 3), jnp.int32)
    for matmul, want in (("cpu-kernel", True), ("xla", False)):
        w = sampling.prepare_weights_jit(params, config, lora=None, lora_scale=jnp.float32(1.0),
                                         merge_lora=False, matmul=matmul)
        state = sampling.prefill_jit(w, ids, mask, config=config, settings=settings,
                                     rng=jax.random.PRNGKey(1))
        text = sampling.decode_jit.lower(w, state, config=config, settings=settings).as_text()
        assert ("arca_block_softmax" in text) == want
