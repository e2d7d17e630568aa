"""The sampler on Qwen3 mixture-of-experts models: greedy tokens against transformers'
`Qwen3MoeForCausalLM.generate`, cached decoding against the uncached forward (attention LoRA
included); expert and router adapters: tests/model/test_moe_lora.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arca_jax import lora, parallel, qwen3, sampling
from fixtures import (hf_greedy, left_padded_batch, random_checkpoint, random_params,
                      shifted_adapter, tiny_moe_hf_config)

MODELS = {
    # 4 experts, top-2 renormalised, every layer sparse, untied
    "e4k2_norm": dict(experts=4, top_k=2, norm_topk=True, layers=2),
    # 8 experts, top-3 raw probabilities, layer 1 dense (mlp_only_layers), tied
    "e8k3_mlp_only": dict(experts=8, top_k=3, norm_topk=False, layers=3, mlp_only=(1,), tied=True),
}
PAD = 0
LENGTHS = [7, 3, 5, 1]  # left-padded to 7


@pytest.fixture(scope="module", params=sorted(MODELS))
def model(request, tmp_path_factory):
    """(transformers model, Qwen3MoeConfig, float32 params) of one random tiny MoE model."""
    cfg = tiny_moe_hf_config(**MODELS[request.param])
    return random_checkpoint(cfg, seed=11 + len(request.param),
                             path=tmp_path_factory.mktemp(request.param))


def _prompts(vocab):
    ids, mask = left_padded_batch(vocab, LENGTHS, max(LENGTHS), seed=1)
    return ids.astype(np.int32), mask.astype(np.int32)




def _mask_through_eos(tokens, eos):
    is_eos = tokens == eos
    before = np.cumsum(is_eos, axis=1) - is_eos
    return (before == 0).astype(np.int32)


def test_greedy_matches_transformers_with_left_padding_and_eos(model):
    m, config, params = model
    assert isinstance(config, qwen3.Qwen3MoeConfig)
    ids, mask = _prompts(config.vocab_size)
    n = 12
    free = hf_greedy(m, ids, mask, n, eos=None, pad=PAD)
    eos = next(int(t) for t in free[0, 2:8] if not (free[1:] == t).any(axis=1).all())
    ref = hf_greedy(m, ids, mask, n, eos=eos, pad=PAD)
    ref_mask = _mask_through_eos(ref, eos)
    assert 0 < ref_mask.sum(1).min() < n and ref_mask.sum(1).max() == n

    out = sampling.generate(params, ids, mask, config=config, rng=jax.random.PRNGKey(0),
                            max_new_tokens=n, greedy=True, eos_id=eos, pad_id=PAD)
    np.testing.assert_array_equal(np.asarray(out.tokens), ref)
    np.testing.assert_array_equal(np.asarray(out.mask), ref_mask)
    np.testing.assert_array_equal(np.asarray(out.finished), ref_mask.sum(1) < n)


@pytest.mark.parametrize("adapter", ["none", "lora"])
def test_cached_decoding_equals_uncached_forward_at_every_step(model, adapter):
    """Prefill (T > 1: every prompt token routed), then T = 1 steps through the cache, against one
    uncached forward over the whole sequence; "lora": a partial attention adapter, low-rank."""
    _, config, params = model
    ids, mask = _prompts(config.vocab_size)
    tree, scale = None, 1.0
    if adapter == "lora":
        lcfg = lora.LoraConfig(rank=3, alpha=6.0, targets=("q_proj", "v_proj", "o_proj"))
        tree = shifted_adapter(config, lcfg, seed=4, shift=0.2)
        scale = lcfg.scaling
    steps = 5
    B, P = ids.shape
    feed = np.random.default_rng(5).integers(1, config.vocab_size, (B, steps)).astype(np.int32)
    seq = np.concatenate([ids, feed], 1)
    seq_mask = np.concatenate([mask, np.ones_like(feed)], 1)
    ref = np.asarray(qwen3.forward(params, jnp.asarray(seq), config=config,
                                   attention_mask=jnp.asarray(seq_mask), lora=tree,
                                   lora_scale=scale).logits)

    step = jax.jit(qwen3.inference_forward, static_argnames="config")
    weights = qwen3.inference_weights(params, config, lora=tree, lora_scale=scale)
    out = step(weights, jnp.asarray(ids), config=config,
               positions=qwen3.default_positions(jnp.asarray(mask)),
               attention_mask=jnp.asarray(mask),
               cache=qwen3.KVCache.init(config, B, P + steps, transposed_keys=qwen3.transposed_keys(
                   weights.decode_attention)))
    for i in range(steps + 1):
        np.testing.assert_allclose(np.asarray(out.logits), ref[:, P - 1 + i], atol=1e-4, rtol=0)
        if i == steps:
            break
        position = mask.sum(1, keepdims=True) + i
        out = step(weights, jnp.asarray(feed[:, i:i + 1]), config=config,
                   positions=jnp.asarray(position, jnp.int32),
                   attention_mask=jnp.ones((B, 1), jnp.int32), cache=out.cache)


def test_mesh_sampling_equals_one_device():
    """Rows split over "data" and "fsdp" (experts split over "fsdp": expert-parallel) sample what
    one device does (more meshes: tests/grpo/test_moe_expert_parallel.py)."""
    config = qwen3.Qwen3Config.from_hf(tiny_moe_hf_config(experts=4, top_k=2, layers=1))
    params = random_params(config, scale=3.0)
    ids, mask = _prompts(config.vocab_size)
    kw = dict(config=config, rng=jax.random.PRNGKey(0), max_new_tokens=8)
    one = sampling.generate(params, ids, mask, **kw)
    out = sampling.generate(params, ids, mask, mesh=parallel.make_mesh(data=2, fsdp=2, tensor=1),
                            **kw)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(one.tokens))
    np.testing.assert_allclose(np.asarray(out.logps), np.asarray(one.logps), atol=1e-5)
