"""The rollout sampler against transformers, against the uncached forward, and against its own
distributional promises (temperature, top-p, rng), plus the GRPO batch layout."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arca_jax import draw, lora, prompts, qwen3, sampling
from arca_jax.batch import build_batch
from arca_jax.grpo.logprobs import sequence_logps
from fixtures import (hf_greedy, left_padded_batch, random_checkpoint, shifted_adapter,
                      slow_except, tiny_hf_config)

MODELS = {
    # GQA ratio 2, tied embeddings.
    "tied_gqa2": dict(hidden=32, heads=4, kv_heads=2, head_dim=16, layers=2, tied=True, theta=1e4),
    # GQA ratio 1, untied head, head_dim != hidden / heads, 3 layers.
    "untied_gqa1": dict(hidden=48, heads=3, kv_heads=3, head_dim=8, layers=3, tied=False, theta=5e5),
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def model(request, tmp_path_factory):
    """(transformers model, Qwen3Config, float32 params) of one random tiny model."""
    cfg = tiny_hf_config(**MODELS[request.param])
    return random_checkpoint(cfg, seed=7 + len(request.param), path=tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The first model only: for the tests that need one model, not every model."""
    cfg = tiny_hf_config(**MODELS["tied_gqa2"])
    return random_checkpoint(cfg, seed=3, path=tmp_path_factory.mktemp("tiny"))


PAD = 0
LENGTHS = [7, 3, 5, 1]  # left-padded to 7


def _prompts(vocab, lengths=LENGTHS, seed=1):
    ids, mask = left_padded_batch(vocab, lengths, max(lengths), seed=seed)
    return ids.astype(np.int32), mask.astype(np.int32)




def _mask_through_eos(tokens, eos):
    """1 up to and including the first EOS of each row."""
    is_eos = np.isin(tokens, list(eos))
    before = np.cumsum(is_eos, axis=1) - is_eos  # EOS strictly before this column
    return (before == 0).astype(np.int32)


# --------------------------------------------------------------------------------------------
# Exactness


def test_greedy_matches_transformers_with_left_padding_and_eos(model):
    m, config, params = model
    ids, mask = _prompts(config.vocab_size)
    n = 12
    free = hf_greedy(m, ids, mask, n, eos=None, pad=PAD)
    # an EOS that ends row 0 mid-way and leaves some other row running to the end
    eos = next(int(t) for t in free[0, 2:8] if not (free[1:] == t).any(axis=1).all())
    ref = hf_greedy(m, ids, mask, n, eos=eos, pad=PAD)
    ref_mask = _mask_through_eos(ref, [eos])
    assert 0 < ref_mask.sum(1).min() and ref_mask.sum(1).min() < n and ref_mask.sum(1).max() == n

    out = sampling.generate(params, ids, mask, config=config, rng=jax.random.PRNGKey(0),
                            max_new_tokens=n, greedy=True, eos_id=eos, pad_id=PAD)
    np.testing.assert_array_equal(np.asarray(out.tokens), ref)
    np.testing.assert_array_equal(np.asarray(out.mask), ref_mask)
    np.testing.assert_array_equal(np.asarray(out.lengths), ref_mask.sum(1))
    np.testing.assert_array_equal(np.asarray(out.finished), ref_mask.sum(1) < n)
    assert int(out.num_steps) == n  # a row without EOS kept the loop running to the end


@pytest.mark.parametrize("adapter,attention,block", [
    ("none", "reduce", None), ("lora", "reduce", None), ("none", "dot", None),
    ("lora", "reduce", 4), ("none", "dot", 4), ("lora", "pallas", None),
    pytest.param("lora", "cpu-kernel", None, marks=pytest.mark.skipif(
        not qwen3.cpu_kernels.available(), reason="CPU kernels not built"))])
def test_cached_decoding_equals_uncached_forward_at_every_step(tiny, adapter, attention, block,
                                                                monkeypatch):
    """Prefill, then one token at a time through the cache, against one uncached causal forward
    over the whole sequence (whose logits at t are those of the prefix up to t). With `block`, the
    decode steps attend over the filled blocks of 4 slots only (`cache_attention.DECODE_BLOCK`) of a
    cache with spare slots, crossing block boundaries as the cache fills. "pallas": the GPU
    decode kernel (here in Pallas' interpreter) reading each row's own slots, left padding
    excluded."""
    if block is not None:
        monkeypatch.setattr(qwen3.cache_attention, "DECODE_BLOCK", block)
        monkeypatch.setattr(qwen3.cache_attention, "REDUCE_MIN_BLOCKS", 2)
    _, config, params = tiny
    ids, mask = _prompts(config.vocab_size)
    tree, scale = None, 1.0
    if adapter == "lora":  # a partial adapter: fused groups with missing members
        lcfg = lora.LoraConfig(rank=3, alpha=6.0, targets=("q_proj", "v_proj", "o_proj", "up_proj"))
        tree = shifted_adapter(config, lcfg, seed=4, shift=0.2)
        scale = lcfg.scaling
    steps = 6
    B, P = ids.shape
    feed = np.random.default_rng(5).integers(1, config.vocab_size, (B, steps)).astype(np.int32)
    seq = np.concatenate([ids, feed], 1)
    seq_mask = np.concatenate([mask, np.ones_like(feed)], 1)
    ref = np.asarray(qwen3.forward(params, jnp.asarray(seq), config=config,
                                   attention_mask=jnp.asarray(seq_mask), lora=tree, lora_scale=scale).logits)

    step = jax.jit(qwen3.inference_forward, static_argnames="config")
    weights = qwen3.inference_weights(params, config, lora=tree, lora_scale=scale,
                                      decode_attention=attention)
    out = step(weights, jnp.asarray(ids), config=config,
               positions=qwen3.default_positions(jnp.asarray(mask)), attention_mask=jnp.asarray(mask),
               cache=qwen3.KVCache.init(config, B, qwen3.cache_size(P + steps + (9 if block else 0),
                                                                    attention),
                                        transposed_keys=qwen3.transposed_keys(attention)))
    for i in range(steps + 1):
        np.testing.assert_allclose(np.asarray(out.logits), ref[:, P - 1 + i], atol=1e-4, rtol=0)
        if i == steps:
            break
        position = mask.sum(1, keepdims=True) + i  # each row's running count
        out = step(weights, jnp.asarray(feed[:, i:i + 1]), config=config,
                   positions=jnp.asarray(position, jnp.int32),
                   attention_mask=jnp.ones((B, 1), jnp.int32), cache=out.cache)
    assert np.all(np.asarray(out.cache.index) == P + steps)
    transposed = attention in ("reduce", "cpu-kernel")
    layout = (B, config.num_key_value_heads) + ((config.head_dim, out.cache.size)
                                                if transposed else
                                                (out.cache.size, config.head_dim))
    assert out.cache.transposed_keys == transposed
    assert all(k.shape == layout for k in out.cache.k)


@pytest.mark.parametrize("chunk_knob, needed, chunk, slots", [
    (128, 640, 128, 640), (256, 640, 256, 768), (1024, 640, 1024, 1024),  # the H200 runs' cache
    (32, 40, 32, 64), (64, 40, 64, 64), (128, 40, 64, 64), (128, 9, 16, 16)])
def test_pallas_cache_is_split_in_the_chunks_asked_for(monkeypatch, chunk_knob, needed, chunk,
                                                       slots):
    """`PALLAS_CHUNK` is the chunk the kernel splits the cache into (the cache is allocated in
    whole chunks; a shorter cache is one chunk), and every split gives `attend`'s rows."""
    from jax.experimental.pallas.ops.gpu import decode_attention as kernel

    ca = qwen3.cache_attention
    monkeypatch.setattr(ca, "PALLAS_CHUNK", chunk_knob)
    monkeypatch.setattr(ca, "PALLAS_BLOCK", 16)
    assert ca.pallas_chunk(needed) == chunk and qwen3.cache_size(needed, "pallas") == slots
    assert qwen3.cache_size(needed, "dot") == needed
    splits = []
    real = kernel.decode_attn_unbatched

    def spy(*args, **kw):
        splits.append(kw["k_splits"])
        return real(*args, **kw)

    monkeypatch.setattr(kernel, "decode_attn_unbatched", spy)
    if slots > 128:
        return  # the split only (interpreting the kernel over long caches is slow)
    B, K, G, H = 2, 2, 2, 16
    rng = np.random.default_rng(needed + chunk)
    q, k, v = (jnp.asarray(rng.standard_normal(s), jnp.float32)
               for s in ((B, 1, K * G, H), (B, K, slots, H), (B, K, slots, H)))
    index = jnp.asarray([needed - 1, needed - 2], jnp.int32)
    first = jnp.asarray([3, 0], jnp.int32)  # row 0 left-padded
    pos = jnp.arange(slots)[None]
    valid = (pos >= first[:, None]) & (pos <= index[:, None])
    bias = jnp.where(valid, 0.0, jnp.finfo(jnp.float32).min)[:, None]
    out = ca.attend_pallas(q, k, v, valid, index)
    assert splits == [slots // chunk]
    np.testing.assert_allclose(np.asarray(out), np.asarray(ca.attend(q, k, v, bias, "dot")),
                               atol=1e-5, rtol=1e-5)


def test_cache_key_layout_must_match_the_decode_attention(tiny):
    """A cache laid out for another decode attention is refused with the way to make the right
    one, not read in the wrong layout."""
    _, config, params = tiny
    ids, mask = _prompts(config.vocab_size)
    B, P = ids.shape
    weights = qwen3.inference_weights(params, config, decode_attention="reduce")
    with pytest.raises(ValueError, match="transposed_keys"):
        qwen3.inference_forward(weights, jnp.asarray(ids), config=config,
                                positions=qwen3.default_positions(jnp.asarray(mask)),
                                attention_mask=jnp.asarray(mask),
                                cache=qwen3.KVCache.init(config, B, P + 2))


def test_logps_equal_teacher_forced_forward(tiny):
    _, config, params = tiny
    ids, mask = _prompts(config.vocab_size)
    free = sampling.generate(params, ids, mask, config=config, rng=jax.random.PRNGKey(1),
                             max_new_tokens=10, greedy=True)
    eos = int(np.asarray(free.tokens)[0, 3])
    out = sampling.generate(params, ids, mask, config=config, rng=jax.random.PRNGKey(11),
                            max_new_tokens=10, eos_id=eos)
    batch = build_batch(ids, mask, out)
    ref = np.asarray(sequence_logps(params, batch, config=config))
    cm = np.asarray(batch.completion_mask).astype(bool)
    np.testing.assert_allclose(np.asarray(batch.sample_logps)[cm], ref[cm], atol=1e-4, rtol=0)
    assert np.all(np.asarray(out.logps)[np.asarray(out.mask) == 0] == 0)
    assert np.all(np.asarray(out.logps)[np.asarray(out.mask) == 1] < 0)


def test_bfloat16_params_sample_in_bfloat16(tiny):
    """The rollout dtype: cache and activations follow the bfloat16 parameters, and the sampled
    tokens' logps agree with the float32 teacher-forced forward to bfloat16 accuracy."""
    _, config, params = tiny
    params16 = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params)
    ids, mask = _prompts(config.vocab_size)
    weights = qwen3.inference_weights(params16, config)
    settings = sampling.SamplingConfig(max_new_tokens=8)
    state = sampling.prefill_jit(weights, jnp.asarray(ids), jnp.asarray(mask), config=config,
                                 settings=settings, rng=jax.random.PRNGKey(9))
    assert all(k.dtype == jnp.bfloat16 for k in state.cache.k)
    out = sampling.finish(sampling.decode_jit(weights, state, config=config, settings=settings))
    assert out.logps.dtype == jnp.float32 and int(out.num_steps) == 8
    batch = build_batch(ids, mask, out)
    ref = np.asarray(sequence_logps(params, batch, config=config))
    cm = np.asarray(batch.completion_mask).astype(bool)
    np.testing.assert_allclose(np.asarray(batch.sample_logps)[cm], ref[cm], atol=0.1)


# --------------------------------------------------------------------------------------------
# Distributions


def _tv_threshold(p, n, delta=1e-6):
    """A bound that the total variation between n draws from p and p itself exceeds with
    probability below delta: E[TV] <= 1/2 sum_k sqrt(p_k (1 - p_k) / n) (Jensen), plus the
    McDiarmid deviation sqrt(log(1/delta) / (2 n)) (one draw moves the TV by at most 1/n)."""
    return 0.5 * np.sum(np.sqrt(p * (1 - p) / n)) + math.sqrt(math.log(1 / delta) / (2 * n))


def _tv(samples, p):
    counts = np.bincount(samples, minlength=len(p)) / len(samples)
    return 0.5 * np.abs(counts - p).sum()


def _softmax(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("temperature", slow_except([1.0, 0.6], keep=1))
def test_samples_follow_the_softmax(tiny, temperature):
    _, config, params = tiny
    n = 6000
    ids, mask = _prompts(config.vocab_size, lengths=[5], seed=2)
    rows_ids, rows_mask = prompts.repeat_groups(ids, mask, n)  # one prompt, n rows
    out = sampling.generate(params, rows_ids, rows_mask, config=config, rng=jax.random.PRNGKey(2),
                            max_new_tokens=2, temperature=temperature)
    tokens = np.asarray(out.tokens)

    logits = qwen3.forward(params, jnp.asarray(ids), config=config,
                           attention_mask=jnp.asarray(mask)).logits[0, -1]
    p = _softmax(np.asarray(logits) / temperature)
    limit = _tv_threshold(p, n)
    assert _tv(tokens[:, 0], p) < limit
    # the test has power: the untempered / over-tempered softmax is rejected at the same n
    wrong = _softmax(np.asarray(logits) / (temperature * 1.5))
    assert _tv(tokens[:, 0], wrong) > _tv_threshold(wrong, n)

    # column 1 comes from the decode loop, with its own uniforms: conditioned on the most common
    # first token it follows the model's next-token softmax
    first = np.bincount(tokens[:, 0]).argmax()
    rows = tokens[:, 0] == first
    seq = np.concatenate([ids, [[first]]], 1)
    logits2 = qwen3.forward(params, jnp.asarray(seq), config=config,
                            attention_mask=jnp.ones_like(jnp.asarray(seq))).logits[0, -1]
    p2 = _softmax(np.asarray(logits2) / temperature)
    assert rows.sum() > 300
    assert _tv(tokens[rows, 1], p2) < _tv_threshold(p2, int(rows.sum()))


def _nucleus(logits, top_p):
    """Tokens of the top-p nucleus: sorted by decreasing probability, kept while the mass strictly
    before the token is below top_p (with float slack: the cached and uncached logits differ ~1e-6)."""
    p = _softmax(logits)
    order = np.argsort(-p, kind="stable")
    before = np.cumsum(p[order]) - p[order]
    return set(order[before < top_p + 1e-5].tolist())


def test_top_p_never_leaves_the_nucleus(tiny):
    _, config, params = tiny
    top_p = 0.5
    ids, mask = _prompts(config.vocab_size, lengths=[4, 6], seed=3)
    ids, mask = prompts.repeat_groups(ids, mask, 128)
    out = sampling.generate(params, ids, mask, config=config, rng=jax.random.PRNGKey(3),
                            max_new_tokens=4, top_p=top_p)
    batch = build_batch(ids, mask, out)
    logits = np.asarray(qwen3.forward(params, batch.input_ids, config=config,
                                      attention_mask=batch.attention_mask).logits)
    P = ids.shape[1]
    tokens = np.asarray(out.tokens)
    sizes = []
    for b in range(tokens.shape[0]):
        for i in range(tokens.shape[1]):
            nucleus = _nucleus(logits[b, P + i - 1], top_p)
            sizes.append(len(nucleus))
            assert tokens[b, i] in nucleus, (b, i)
    assert max(sizes) < config.vocab_size / 2  # the nucleus cuts the vocabulary: about half of
    # the probability mass lies outside it, so a sampler ignoring top_p fails the loop above
    assert len(np.unique(tokens[:, 0])) > 1  # and still samples
    # a vanishing nucleus is the argmax
    tiny_p = sampling.generate(params, ids[:4], mask[:4], config=config, rng=jax.random.PRNGKey(4),
                               max_new_tokens=4, top_p=1e-7)
    greedy = sampling.generate(params, ids[:4], mask[:4], config=config, rng=jax.random.PRNGKey(4),
                               max_new_tokens=4, greedy=True)
    np.testing.assert_array_equal(np.asarray(tiny_p.tokens), np.asarray(greedy.tokens))


def test_same_rng_same_samples_other_rng_other_samples(tiny):
    _, config, params = tiny
    ids, mask = _prompts(config.vocab_size)
    run = lambda key: sampling.generate(params, ids, mask, config=config,  # noqa: E731
                                        rng=jax.random.PRNGKey(key), max_new_tokens=8)
    a, b, c = run(5), run(5), run(6)
    np.testing.assert_array_equal(np.asarray(a.tokens), np.asarray(b.tokens))
    np.testing.assert_array_equal(np.asarray(a.logps), np.asarray(b.logps))
    assert (np.asarray(a.tokens) != np.asarray(c.tokens)).any()
    # columns use distinct uniforms: a step does not repeat the previous step's draw
    assert len({tuple(col) for col in np.asarray(a.tokens).T}) > 1


def test_merged_adapter_samples_the_same_tokens(tiny):
    _, config, params = tiny
    lcfg = lora.LoraConfig(rank=4, alpha=8.0)
    tree = shifted_adapter(config, lcfg, seed=7, shift=0.1)
    ids, mask = _prompts(config.vocab_size)
    kw = dict(config=config, rng=jax.random.PRNGKey(8), max_new_tokens=10)
    side = sampling.generate(params, ids, mask, lora=tree, lora_scale=lcfg.scaling, **kw)
    merged = sampling.generate(params, ids, mask, lora=tree, lora_scale=lcfg.scaling, merge_lora=True, **kw)
    premerged = sampling.generate(lora.merge(params, tree, lcfg), ids, mask, **kw)
    base = sampling.generate(params, ids, mask, **kw)
    np.testing.assert_array_equal(np.asarray(side.tokens), np.asarray(merged.tokens))
    np.testing.assert_array_equal(np.asarray(side.tokens), np.asarray(premerged.tokens))
    np.testing.assert_allclose(np.asarray(side.logps), np.asarray(merged.logps), atol=1e-4)
    assert (np.asarray(side.tokens) != np.asarray(base.tokens)).any()  # the adapter matters
    batch = build_batch(ids, mask, side)
    ref = np.asarray(sequence_logps(params, batch, config=config, lora=tree,
                                             lora_scale=lcfg.scaling))
    cm = np.asarray(batch.completion_mask).astype(bool)
    np.testing.assert_allclose(np.asarray(batch.sample_logps)[cm], ref[cm], atol=1e-4, rtol=0)


def test_stops_as_soon_as_every_row_has_eos(tiny):
    _, config, params = tiny
    ids, mask = _prompts(config.vocab_size)
    n = 16
    free = np.asarray(sampling.generate(params, ids, mask, config=config, rng=jax.random.PRNGKey(0),
                                        max_new_tokens=n, greedy=True).tokens)
    eos = tuple(sorted(set(free[:, 2].tolist())))  # every row has one of these by column 2
    out = sampling.generate(params, ids, mask, config=config, rng=jax.random.PRNGKey(0),
                            max_new_tokens=n, greedy=True, eos_id=eos, pad_id=PAD)
    steps = int(out.num_steps)
    assert steps <= 3 < n  # the loop ran 2 iterations at most, not 15
    expected_mask = _mask_through_eos(free, eos)
    np.testing.assert_array_equal(np.asarray(out.mask), expected_mask)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.where(expected_mask == 1, free, PAD))
    assert np.asarray(out.finished).all()
    assert steps == expected_mask.sum(1).max()


# --------------------------------------------------------------------------------------------
# Shapes and layout


def test_bucketing_helpers_and_shared_programs(tiny):
    assert [prompts.bucket_size(n) for n in (1, 2, 3, 16, 17, 100)] == [1, 2, 4, 16, 32, 128]
    assert prompts.bucket_size(3, minimum=16) == 16
    # generation columns (and the cache's slots past the prompt): multiples of 16, not powers
    # of two (80 new tokens: 80 columns, not 128)
    assert [prompts.new_token_columns(n) for n in (1, 16, 17, 80, 100)] == [16, 16, 32, 80, 112]
    ids = np.array([[0, 0, 0, 5, 6], [0, 0, 7, 8, 9]], np.int32)
    mask = (ids != 0).astype(np.int32)
    b = prompts.bucket_prompts(ids, mask, minimum=4)
    np.testing.assert_array_equal(np.asarray(b.ids), [[0, 0, 5, 6], [0, 7, 8, 9]])
    np.testing.assert_array_equal(np.asarray(b.mask), [[0, 0, 1, 1], [0, 1, 1, 1]])
    assert prompts.bucket_prompts(ids, mask, minimum=1).ids.shape == (2, 4)
    with pytest.raises(ValueError, match="left-padded"):
        prompts.bucket_prompts(ids[:, ::-1], mask[:, ::-1])
    with pytest.raises(ValueError, match="empty"):
        prompts.bucket_prompts(ids, 0 * mask)
    g = prompts.repeat_groups(ids, mask, 3)
    assert g.ids.shape == (6, 5) and (np.asarray(g.ids)[3:] == ids[1]).all()

    _, config, params = tiny
    pids, pmask = _prompts(config.vocab_size)
    kw = dict(config=config, rng=jax.random.PRNGKey(0), greedy=True)
    exact = sampling.generate(params, pids, pmask, max_new_tokens=5, bucket=False, **kw)
    assert exact.tokens.shape == (len(LENGTHS), 5)
    programs = getattr(sampling.decode_jit, "_cache_size", lambda: 0)  # jax's compile-cache size
    bucketed = sampling.generate(params, pids, pmask, max_new_tokens=5, **kw)
    before = programs()
    longer = sampling.generate(params, pids, pmask, max_new_tokens=7, **kw)  # same bucket: 16
    assert programs() == before  # no new program for another length in the bucket
    state = sampling.prefill_jit(qwen3.inference_weights(params, config), *map(jnp.asarray, (
        prompts.pad_prompts(pids, pmask, 16))), config=config, rng=jax.random.PRNGKey(0),
        settings=sampling.SamplingConfig(max_new_tokens=prompts.new_token_columns(17)))
    assert state.cache.size == 16 + 32 and state.tokens.shape == (len(LENGTHS), 32)
    assert bucketed.tokens.shape == (len(LENGTHS), 5) and int(bucketed.num_steps) == 5
    np.testing.assert_array_equal(np.asarray(exact.tokens), np.asarray(bucketed.tokens))
    np.testing.assert_array_equal(np.asarray(longer.tokens)[:, :5], np.asarray(bucketed.tokens))


def test_build_batch_layout():
    prompt_ids = np.array([[0, 0, 4, 5], [1, 2, 3, 4]], np.int32)
    prompt_mask = np.array([[0, 0, 1, 1], [1, 1, 1, 1]], np.int32)
    out = sampling.SampleOutput(
        tokens=jnp.array([[9, 2, 0], [7, 8, 6]]), mask=jnp.array([[1, 1, 0], [1, 1, 1]]),
        logps=jnp.array([[-1.0, -2.0, 0.0], [-3.0, -4.0, -5.0]]), lengths=jnp.array([2, 3]),
        finished=jnp.array([True, False]), num_steps=jnp.array(3))
    b = build_batch(prompt_ids, prompt_mask, out)
    np.testing.assert_array_equal(b.input_ids, [[0, 0, 4, 5, 9, 2, 0], [1, 2, 3, 4, 7, 8, 6]])
    np.testing.assert_array_equal(b.attention_mask, [[0, 0, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(b.positions, [[0, 0, 0, 1, 2, 3, 3], [0, 1, 2, 3, 4, 5, 6]])
    np.testing.assert_array_equal(b.completion_mask, [[0, 0, 0, 0, 1, 1, 0], [0, 0, 0, 0, 1, 1, 1]])
    np.testing.assert_array_equal(b.sample_logps, [[0, 0, 0, 0, -1, -2, 0], [0, 0, 0, 0, -3, -4, -5]])


def test_inverse_cdf_never_picks_zero_weight_and_settings_are_checked():
    w = jnp.array([[0.0, 1.0, 0.0, 0.0, 2.0, 0.0]] * 4 + [[0.0] * 5 + [3.0]])
    u = jnp.array([1e-9, 0.33, 0.34, 1.0, 0.5])
    drawn = draw.inverse_cdf(jnp.log(w), u, block=4)  # 2 blocks, the second padded
    np.testing.assert_array_equal(drawn.index, [1, 1, 4, 4, 5])
    np.testing.assert_allclose(drawn.total, [3.0] * 5, rtol=1e-6)
    for bad in (dict(max_new_tokens=0), dict(max_new_tokens=4, temperature=0.0),
                dict(max_new_tokens=4, top_p=0.0), dict(max_new_tokens=4, top_p=1.5)):
        with pytest.raises(ValueError):
            sampling.SamplingConfig(**bad)
    assert sampling.SamplingConfig(max_new_tokens=4, temperature=0.0, greedy=True).greedy


def test_decode_attention_default_follows_backend(tiny):
    """On CPU the C++ kernel for float32 on one device (where it builds), else "reduce" (fewer
    kernels per step than "dot"); "pallas" on GPUs (measured fastest on an H200; on a mesh per
    device), "dot" on TPU."""
    _, config, params = tiny
    assert [qwen3.default_decode_attention(p, n) for p, n in (
        ("cpu", 1), ("cpu", 8), ("gpu", 1), ("gpu", 8), ("tpu", 1), ("tpu", 8))] == [
        "reduce", "reduce", "pallas", "pallas", "dot", "dot"]
    kernel = "cpu-kernel" if qwen3.cpu_kernels.available() else "reduce"
    assert [qwen3.default_decode_attention("cpu", n, d) for n, d in (
        (1, jnp.float32), (2, jnp.float32), (1, jnp.bfloat16))] == [kernel, "reduce", "reduce"]
    assert qwen3.default_decode_attention("gpu", 1, jnp.float32) == "pallas"
    assert qwen3.default_decode_attention() == qwen3.default_decode_attention(jax.default_backend())
    assert qwen3.inference_weights(params, config).decode_attention == (
        qwen3.default_decode_attention(dtype=jnp.float32))
