"""`qwen3.cpu_layers`, a decode step's layers and head as one C++ call: every decode step's logits
and the whole cache equal those of XLA's operations (`matmul="xla"`, the "reduce" attention) for
shapes off the kernels' 16 lanes (hidden sizes, head sizes, the MLP width off its panels: the
SwiGLU's own phase), head groups of one to four, more rows than a register block, rows at
different cache positions behind left padding, a merged adapter, an untied head; the softmax
statistics against numpy, and the draws that use them; `applies` holds only for the packed,
float32, single-shard, dense case without a separate low-rank adapter; bad shapes give a clear
error."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arca_jax import draw, lora, qwen3, sampling
from arca_jax.qwen3 import cpu_kernels, cpu_layers
from fixtures import prefill_and_decode, shifted_adapter

pytestmark = pytest.mark.skipif(not cpu_kernels.available(),
                                reason=f"CPU kernels: {cpu_kernels.error()}")


def _config(D, F, N, K, H, L=2, tied=True):
    return qwen3.Qwen3Config(vocab_size=61, hidden_size=D, intermediate_size=F,
                             num_hidden_layers=L, num_attention_heads=N, num_key_value_heads=K,
                             head_dim=H, tie_word_embeddings=tied)


def _decode(config, params, tree, scale, *, matmul, decode_attention, B, P, steps, seed):
    """Prefill (left-padded prompts), then `steps` decode steps fed random tokens:
    (logits [steps + 1, B, V], the final cache)."""
    rng = np.random.default_rng(seed)
    ids = jnp.asarray(rng.integers(1, config.vocab_size, (B, P)), jnp.int32)
    pad = rng.integers(0, P - 1, B)
    mask = jnp.asarray(np.arange(P)[None, :] >= pad[:, None], jnp.int32)
    feed = rng.integers(1, config.vocab_size, (B, steps)).astype(np.int32)
    w = qwen3.inference_weights(params, config, lora=tree, lora_scale=scale,
                                merge_lora=tree is not None, matmul=matmul,
                                decode_attention=decode_attention)
    return prefill_and_decode(w, config, ids, mask, feed, slots=P + steps + 3)


@pytest.mark.parametrize("D, F, N, K, H, B, adapter, tied", [
    (48, 80, 4, 2, 12, 3, None, True),    # D and H off the 16 lanes, F on its panels
    (64, 72, 4, 4, 32, 9, None, False),   # G = 1; F off the panels (its own SwiGLU phase); rows
                                          # past a block; an untied head
    (40, 96, 8, 2, 32, 14, "merged", True),  # G = 4, the rotation on whole vectors, an adapter
    (32, 48, 2, 1, 16, 1, None, True)],   # one row
    ids=["odd-sizes", "mlp-off-panels-untied", "four-heads-merged", "one-row"])
def test_decode_steps_equal_xla_operations(D, F, N, K, H, B, adapter, tied):
    config = _config(D, F, N, K, H, tied=tied)
    params = qwen3.init_params(config, jax.random.PRNGKey(D + F), jnp.float32)
    tree, scale = None, 1.0
    if adapter:
        lcfg = lora.LoraConfig(rank=3, alpha=6.0, targets=("q_proj", "k_proj", "v_proj", "o_proj",
                                                          "gate_proj", "up_proj", "down_proj"))
        tree, scale = shifted_adapter(config, lcfg, seed=2, shift=0.05), lcfg.scaling
    kw = dict(B=B, P=7, steps=5, seed=B + H)
    got, got_cache = _decode(config, params, tree, scale, matmul="cpu-kernel",
                             decode_attention="cpu-kernel", **kw)
    want, want_cache = _decode(config, params, tree, scale, matmul="xla",
                               decode_attention="reduce", **kw)
    w = qwen3.inference_weights(params, config, lora=tree, lora_scale=scale,
                                merge_lora=tree is not None, matmul="cpu-kernel",
                                decode_attention="cpu-kernel")
    assert cpu_layers.applies(w, jnp.float32)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    # a later layer's keys pass the residual stream's rounding through the k norm, which
    # magnifies it where a head's vector is short (up to 2e-5 here, against 4e-7 in layer 0)
    for a, b in zip(got_cache.k, want_cache.k):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=5e-5)
    for a, b in zip(got_cache.v, want_cache.v):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5)
    np.testing.assert_array_equal(got_cache.index, want_cache.index)


def test_the_sampler_draws_the_tokens_of_xla_operations():
    config = _config(48, 80, 4, 2, 12)
    params = qwen3.init_params(config, jax.random.PRNGKey(4), jnp.float32)
    ids = jnp.asarray(np.random.default_rng(5).integers(1, 61, (10, 5)), jnp.int32)
    outs = {m: sampling.generate(params, ids, jnp.ones_like(ids), config=config,
                                 rng=jax.random.PRNGKey(6), max_new_tokens=12, eos_id=(3, 7),
                                 group_size=2, matmul=m, decode_attention=a)
            for m, a in (("cpu-kernel", "cpu-kernel"), ("xla", "reduce"))}
    np.testing.assert_array_equal(outs["cpu-kernel"].tokens, outs["xla"].tokens)
    np.testing.assert_allclose(outs["cpu-kernel"].logps, outs["xla"].logps, rtol=0, atol=1e-5)


def test_applies_to_the_packed_float32_single_shard_case_only():
    config = _config(48, 80, 4, 2, 12)
    params = qwen3.init_params(config, jax.random.PRNGKey(0), jnp.float32)
    lcfg = lora.LoraConfig(rank=2, alpha=4.0, targets=("q_proj",))
    tree = shifted_adapter(config, lcfg, seed=1, shift=0.1)
    packed = qwen3.inference_weights(params, config, matmul="cpu-kernel",
                                     decode_attention="cpu-kernel")
    assert cpu_layers.applies(packed, jnp.float32)
    assert not cpu_layers.applies(packed, jnp.bfloat16)  # the cache's dtype
    reduce = qwen3.inference_weights(params, config, matmul="cpu-kernel", decode_attention="reduce")
    assert not cpu_layers.applies(reduce, jnp.float32)
    low_rank = qwen3.inference_weights(params, config, lora=tree, lora_scale=lcfg.scaling,
                                       matmul="cpu-kernel", decode_attention="cpu-kernel")
    assert not cpu_layers.applies(low_rank, jnp.float32)
    merged = qwen3.inference_weights(params, config, lora=tree, lora_scale=lcfg.scaling,
                                     merge_lora=True, matmul="cpu-kernel",
                                     decode_attention="cpu-kernel")
    assert cpu_layers.applies(merged, jnp.float32)
    unpacked = qwen3.inference_weights(params, config, matmul="xla", decode_attention="cpu-kernel")
    assert not cpu_layers.applies(unpacked, jnp.float32)
    half = qwen3.inference_weights(jax.tree_util.tree_map(lambda p: p.astype(jnp.bfloat16),
                                                          params), config, matmul="xla")
    assert not cpu_layers.applies(half, jnp.bfloat16)


def test_mismatched_shapes_are_a_clear_error():
    config = _config(48, 80, 4, 2, 12, L=1)
    params = qwen3.init_params(config, jax.random.PRNGKey(0), jnp.float32)
    w = qwen3.inference_weights(params, config, matmul="cpu-kernel", decode_attention="cpu-kernel")
    B, S = 2, 9
    k = jnp.zeros((B, 2, 12, S))
    v = jnp.zeros((B, 2, S + 1, 12))  # one slot too many
    with pytest.raises(Exception, match="decode layers"):
        jax.block_until_ready(cpu_layers.decode_layers(
            jnp.zeros((B, 48)), w, (k,), (v,), bias=jnp.zeros((B, S)),
            cos=jnp.ones((B, 12)), sin=jnp.zeros((B, 12)), index=jnp.zeros((B,), jnp.int32),
            filled=jnp.int32(1), eps=1e-6, block=qwen3.SOFTMAX_BLOCK))


def test_softmax_statistics_and_the_draws_that_use_them():
    config = qwen3.Qwen3Config(vocab_size=300, hidden_size=32, intermediate_size=48,
                               num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                               head_dim=16)  # 300: the last block of 128 is partial
    params = qwen3.init_params(config, jax.random.PRNGKey(7), jnp.float32)
    w = qwen3.inference_weights(params, config, matmul="cpu-kernel", decode_attention="cpu-kernel")
    B = 5
    ids = jnp.asarray(np.random.default_rng(8).integers(1, 300, (B, 4)), jnp.int32)
    mask = jnp.ones_like(ids)
    step = jax.jit(qwen3.inference_forward, static_argnames="config")
    out = step(w, ids, config=config, positions=qwen3.default_positions(mask), attention_mask=mask,
               cache=qwen3.KVCache.init(config, B, 6, transposed_keys=True))
    assert out.softmax is None  # a prefill: XLA's operations
    out = step(w, ids[:, :1], config=config, positions=jnp.full((B, 1), 4, jnp.int32),
               attention_mask=jnp.ones((B, 1), jnp.int32), cache=out.cache)
    logits = np.asarray(out.logits, np.float64)
    np.testing.assert_array_equal(out.softmax.max, np.asarray(out.logits).max(-1))
    e = np.exp(logits - logits.max(-1, keepdims=True))
    e = np.pad(e, ((0, 0), (0, 384 - 300)))
    np.testing.assert_allclose(out.softmax.block_sums, e.reshape(B, 3, 128).sum(-1), rtol=2e-6)
    u = jnp.asarray(np.random.default_rng(9).uniform(0.01, 1.0, B), jnp.float32)
    for settings in (sampling.SamplingConfig(max_new_tokens=1),
                     sampling.SamplingConfig(max_new_tokens=1, temperature=0.7),
                     sampling.SamplingConfig(max_new_tokens=1, greedy=True),
                     sampling.SamplingConfig(max_new_tokens=1, top_k=20)):
        with_stats = draw.choose_tokens(out.logits, u, settings, out.softmax)
        without = draw.choose_tokens(out.logits, u, settings)
        np.testing.assert_array_equal(with_stats.tokens, without.tokens)
        np.testing.assert_allclose(with_stats.logps, without.logps, rtol=0, atol=1e-6)
        np.testing.assert_allclose(with_stats.sampled_logps, without.sampled_logps, rtol=0,
                                   atol=1e-6)
