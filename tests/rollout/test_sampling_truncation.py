"""Top-k / top-p / min-p truncation and the log-probs of the distribution actually sampled, against
a numpy transcription of transformers' warpers (temperature, then top-k, top-p, min-p) and the
warpers themselves."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arca_jax import draw, sampling
from arca_jax.batch import build_batch
from fixtures import random_params, tiny_config


def _reference_dist(logits, temperature, top_k, top_p, min_p=0.0):
    """transformers' order: scores / T; TopK keeps scores >= k-th largest; TopP sorts ascending and
    removes tokens whose cumulative probability is <= 1 - top_p (keeping at least one); MinP
    removes tokens of probability below min_p times the largest."""
    s = np.asarray(logits, np.float64) / temperature
    if top_k:
        kth = np.sort(s, axis=-1)[:, -top_k][:, None]
        s = np.where(s < kth, -np.inf, s)
    if top_p < 1.0:
        order = np.argsort(s, axis=-1, kind="stable")
        srt = np.take_along_axis(s, order, -1)
        p = np.exp(srt - srt.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        remove = np.cumsum(p, -1) <= 1 - top_p
        remove[:, -1] = False
        s_sorted = np.where(remove, -np.inf, srt)
        s = np.empty_like(s)
        np.put_along_axis(s, order, s_sorted, -1)
    if min_p > 0.0:
        s = np.where(np.exp(s - s.max(-1, keepdims=True)) < min_p, -np.inf, s)
    p = np.exp(s - s.max(-1, keepdims=True))
    return p / p.sum(-1, keepdims=True)


CASES = [(1.0, 0, 1.0, 0.0), (0.7, 0, 1.0, 0.0), (1.0, 5, 1.0, 0.0), (0.8, 7, 1.0, 0.0),
         (1.0, 0, 0.8, 0.0), (0.9, 10, 0.7, 0.0), (1.3, 3, 0.95, 0.0), (1.0, 0, 1.0, 0.1),
         (0.8, 0, 0.9, 0.05), (0.9, 10, 0.7, 0.2), (1.0, 0, 1.0, 1.0)]


@pytest.mark.parametrize("temperature,top_k,top_p,min_p", CASES)
def test_sampled_logps_are_the_truncated_renormalised_distribution(temperature, top_k, top_p,
                                                                   min_p):
    rng = np.random.default_rng(0)
    B, V = 64, 300
    logits = rng.normal(0, 3.0, (B, V)).astype(np.float32)
    settings = sampling.SamplingConfig(max_new_tokens=1, temperature=temperature, top_k=top_k,
                                       top_p=top_p, min_p=min_p)
    u = jnp.asarray(1.0 - rng.random(B), jnp.float32)
    choice = jax.jit(draw.choose_tokens, static_argnums=2)(jnp.asarray(logits), u, settings)
    ref = _reference_dist(logits, temperature, top_k, top_p, min_p)
    tok = np.asarray(choice.tokens)
    assert (ref[np.arange(B), tok] > 0).all()  # never a truncated-away token
    np.testing.assert_allclose(np.asarray(choice.sampled_logps), np.log(ref[np.arange(B), tok]),
                               atol=2e-5)
    plain = logits - logits.max(-1, keepdims=True)
    plain = plain - np.log(np.exp(plain).sum(-1, keepdims=True))
    np.testing.assert_allclose(np.asarray(choice.logps), plain[np.arange(B), tok], atol=2e-5)


@pytest.mark.parametrize("temperature,top_k,top_p,min_p", [
    (1.0, 4, 1.0, 0.0), (0.8, 6, 0.8, 0.0), (0.8, 0, 0.7, 0.0), (1.0, 0, 0.9, 0.1)])
def test_draws_follow_the_truncated_distribution(temperature, top_k, top_p, min_p):
    """Total variation between the empirical distribution of 40,000 draws of one row and the
    reference is within sampling noise."""
    rng = np.random.default_rng(1)
    V, n = 40, 40_000
    logits = rng.normal(0, 2.0, (1, V)).astype(np.float32)
    settings = sampling.SamplingConfig(max_new_tokens=1, temperature=temperature, top_k=top_k,
                                       top_p=top_p, min_p=min_p)
    u = jnp.asarray(1.0 - rng.random(n), jnp.float32)
    tok = np.asarray(jax.jit(draw.choose_tokens, static_argnums=2)(
        jnp.broadcast_to(jnp.asarray(logits), (n, V)), u, settings).tokens)
    emp = np.bincount(tok, minlength=V) / n
    ref = _reference_dist(logits, temperature, top_k, top_p, min_p)[0]
    assert 0.5 * np.abs(emp - ref).sum() < 0.015
    assert emp[ref == 0].sum() == 0


@pytest.mark.parametrize("temperature,top_k,top_p,min_p", [
    (0.7, 0, 0.9, 0.0), (1.0, 0, 1.0, 0.05), (0.8, 20, 0.9, 0.1), (1.2, 0, 0.8, 0.02)])
def test_truncation_equals_transformers_warpers(temperature, top_k, top_p, min_p):
    """The sampled log-probs are transformers' own warpers' (Temperature, TopK, TopP, MinP in
    `generate`'s order) log-softmax at the drawn tokens, which they keep: the same kept mass, so
    (the kept sets being prefixes by weight) the same tokens kept."""
    import torch
    from transformers.generation.logits_process import (LogitsProcessorList, MinPLogitsWarper,
                                                        TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)

    rng = np.random.default_rng(5)
    B, V = 64, 500
    logits = rng.normal(0, 3.0, (B, V)).astype(np.float32)
    warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)]
                                  + ([TopKLogitsWarper(top_k)] if top_k else [])
                                  + ([TopPLogitsWarper(top_p)] if top_p < 1 else [])
                                  + ([MinPLogitsWarper(min_p)] if min_p > 0 else []))
    scores = warpers(None, torch.from_numpy(logits.copy()))
    ref = torch.log_softmax(scores.double(), -1).numpy()
    settings = sampling.SamplingConfig(max_new_tokens=1, temperature=temperature, top_k=top_k,
                                       top_p=top_p, min_p=min_p)
    u = jnp.asarray(1.0 - rng.random(B), jnp.float32)
    c = jax.jit(draw.choose_tokens, static_argnums=2)(jnp.asarray(logits), u, settings)
    tok = np.asarray(c.tokens)
    assert np.isfinite(ref[np.arange(B), tok]).all()
    np.testing.assert_allclose(np.asarray(c.sampled_logps), ref[np.arange(B), tok], atol=2e-5)


def test_top_k_keeps_ties_with_the_kth_token():
    logits = jnp.asarray([[5.0, 3.0, 3.0, 3.0, 1.0, 0.0]])
    settings = sampling.SamplingConfig(max_new_tokens=1, top_k=2)
    seen = set()
    for u in np.linspace(0.01, 1.0, 50):
        seen.add(int(draw.choose_tokens(logits, jnp.asarray([u], jnp.float32),
                                            settings).tokens[0]))
    assert seen == {0, 1, 2, 3}  # the three tokens tied at the 2nd value stay, as transformers


def test_greedy_sampled_logps_are_zero_and_bad_top_k_refused():
    logits = jnp.asarray([[0.0, 2.0, 1.0]])
    c = draw.choose_tokens(logits, jnp.ones((1,)), sampling.SamplingConfig(1, greedy=True))
    assert int(c.tokens[0]) == 1 and float(c.sampled_logps[0]) == 0.0
    with pytest.raises(ValueError, match="top_k"):
        sampling.SamplingConfig(1, top_k=-1)
    for bad in (-0.1, 1.5):
        with pytest.raises(ValueError, match="min_p"):
            sampling.SamplingConfig(1, min_p=bad)


def test_generate_returns_both_logps_and_the_batch_carries_them():
    cfg = tiny_config(vocab_size=50, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                      tie_word_embeddings=True)
    params = random_params(cfg, seed=0)
    ids = jnp.asarray(np.random.default_rng(0).integers(1, 50, (3, 4)), jnp.int32)
    mask = jnp.ones((3, 4), jnp.int32)
    out = sampling.generate(params, ids, mask, config=cfg, rng=jax.random.PRNGKey(1),
                            max_new_tokens=5, top_k=3)
    lp, slp = np.asarray(out.logps), np.asarray(out.sampled_logps)
    assert slp.shape == (3, 5) and (slp >= lp - 1e-6).all() and (slp < 0).any()
    batch = build_batch(ids, mask, out)
    np.testing.assert_allclose(np.asarray(batch.behaviour_logps)[:, 4:], slp * np.asarray(out.mask))


@pytest.mark.parametrize("V,m", [(7, 7), (50, 10), (300, 100), (4096, 100)])
def test_threshold_top_k_equals_a_stable_sort(V, m):
    """The top-k draw's candidate search on CPU (`draw.threshold_top_k`) returns the m largest
    values and their ids as a stable numpy sort does (ties in index order, -0.0 equal to +0.0),
    on rows full of ties, with -inf and +inf entries, signed zeros and a row of one value; and
    equals `lax.top_k` where no zero is signed."""
    rng = np.random.default_rng(V)
    x = (np.round(rng.normal(size=(6, V)) * 2) / 2).astype(np.float32)  # many ties
    x[x == 0] = 0.0  # rounding leaves -0.0 too, which lax.top_k puts after +0.0
    x[0] = 1.0
    x[1, ::3] = -np.inf
    x[2, V // 2] = np.inf
    top_k = jax.jit(draw.threshold_top_k, static_argnums=1)
    vals, ids = top_k(jnp.asarray(x), m)
    ref_vals, ref_ids = jax.lax.top_k(jnp.asarray(x), m)
    np.testing.assert_array_equal(np.asarray(ids), np.asarray(ref_ids))
    np.testing.assert_array_equal(np.asarray(vals), np.asarray(ref_vals))
    x[3, : V // 2] = -0.0
    x[3, V // 2:] = 0.0
    x[4, ::2] = -0.0
    vals, ids = top_k(jnp.asarray(x), m)
    order = np.argsort(-x, axis=1, kind="stable")[:, :m]
    np.testing.assert_array_equal(np.asarray(ids), order)
    np.testing.assert_array_equal(np.asarray(vals), np.take_along_axis(x, order, 1))


def _check_nucleus(kept, w, top_p, slack=1e-5):
    """kept [V] bool is the nucleus of weights w [V] as a stable sort by decreasing weight gives
    it (ties in index order): the first n tokens of that order, the mass before the last of them
    below top_p * total and the mass before the next one not, both up to `slack` * total (float32
    sums of the tail's tiny weights may round either way)."""
    w = w.astype(np.float64)
    order = np.argsort(-w, kind="stable")
    before = np.cumsum(w[order]) - w[order]
    bound, tol = top_p * w.sum(), slack * w.sum()
    n = int(kept.sum())
    assert n >= 1 and kept[order[:n]].all(), "not a prefix of the stable order"
    assert before[n - 1] < bound + tol
    assert n == w.size or before[n] >= bound - tol


@pytest.mark.parametrize("top_p", [1e-7, 0.3, 0.9, 0.999])
def test_nucleus_without_sorting_equals_a_stable_sort(top_p):
    """`draw._nucleus` (a bitwise search for the lightest kept weight, no sort) keeps the tokens a
    stable sort by decreasing weight keeps, on rows with ties at the bound, weights that
    underflow to 0, one token, all tokens equal; the draw's total is the nucleus mass and its
    tokens lie in it."""
    rng = np.random.default_rng(int(top_p * 1000))
    B, V = 48, 1000
    logits = rng.normal(0, 3.0, (B, V)).astype(np.float32)
    logits[:16] = np.round(logits[:16])  # many ties among the largest
    logits[16:20, ::2] = -200.0  # exp underflows to 0
    logits[20] = 0.0  # all tied
    logits[21] = -np.inf
    logits[21, 7] = 0.0  # one token
    scaled = jnp.asarray(logits - logits.max(-1, keepdims=True))
    w = np.asarray(jnp.exp(scaled))
    kept = np.asarray(jax.jit(draw._nucleus, static_argnums=1)(jnp.asarray(w), top_p))
    u = jnp.asarray(1.0 - rng.random(B), jnp.float32)
    d = jax.jit(draw._truncated_inverse_cdf, static_argnums=(2, 3))(scaled, u, top_p, 0.0)
    for b in range(B):
        _check_nucleus(kept[b], w[b], top_p)
        assert kept[b, int(d.index[b])]
        np.testing.assert_allclose(float(d.total[b]), w[b][kept[b]].astype(np.float64).sum(),
                                   rtol=1e-5)
    assert kept[20].sum() == int(np.ceil(top_p * V))  # all tied: the first ceil(p V)
    assert kept[21].tolist() == (np.arange(V) == 7).tolist()


def test_nucleus_keeps_ties_at_the_bound_in_index_order():
    """Weights [1, e^-1 x 4, e^-5] with the bound inside the tied run: the first two ties are kept
    (the mass before the third reaches the bound), as a stable sort keeps them."""
    scaled = jnp.asarray([[0.0, -1.0, -1.0, -1.0, -1.0, -5.0]], jnp.float32)
    w = np.exp(np.asarray(scaled[0], np.float64))
    top_p = float((1 + 1.5 * w[1]) / w.sum())
    kept = np.asarray(draw._nucleus(jnp.exp(scaled), top_p))[0]
    assert kept.tolist() == [True, True, True, False, False, False]
    seen = {int(draw._truncated_inverse_cdf(scaled, jnp.asarray([u], jnp.float32), top_p,
                                            0.0).index[0])
            for u in np.linspace(0.01, 1.0, 60)}
    assert seen == {0, 1, 2}


@pytest.mark.parametrize("top_p", [1.0, 0.9])
def test_top_k_draws_do_not_depend_on_the_candidate_search(monkeypatch, top_p):
    """A top-k draw picks the same tokens with the same log-probs whether its candidates come
    from `threshold_top_k` (CPU) or `lax.top_k` (elsewhere), ties included."""
    rng = np.random.default_rng(7)
    logits = jnp.asarray(np.round(rng.normal(0, 2, (64, 300)) * 4) / 4, jnp.float32)
    u = jnp.asarray(1.0 - rng.random(64), jnp.float32)
    settings = sampling.SamplingConfig(max_new_tokens=1, top_k=20, top_p=top_p, temperature=0.8)
    searches = {"threshold": draw.threshold_top_k, "lax": jax.lax.top_k}
    out = {}
    for name, search in searches.items():
        monkeypatch.setattr(draw, "top_candidates", search)
        out[name] = draw.choose_tokens(logits, u, settings)  # eager: a jit would keep one trace
    for a, b in zip(out["threshold"], out["lax"]):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("mesh_shape", [(2, 1, 4), (1, 2, 4), (4, 1, 2)])
@pytest.mark.parametrize("temperature,top_k,top_p,greedy,min_p", [
    (1.0, 0, 1.0, False, 0.0), (0.7, 0, 1.0, False, 0.0), (1.0, 5, 1.0, False, 0.0),
    (0.9, 10, 0.7, False, 0.0), (1.0, 0, 1.0, True, 0.0), (1.0, 300, 1.0, False, 0.0),
    (1.0, 0, 1.0, False, 0.05), (0.9, 10, 0.7, False, 0.2)])
def test_draw_on_vocabulary_shards_equals_whole_rows(mesh_shape, temperature, top_k, top_p,
                                                     greedy, min_p):
    """`choose_tokens(mesh=...)` with the logits' vocabulary split over "tensor": the tokens of
    the draw on whole rows (ties broken by token id as there: whole rows of tied logits), the
    log-probs within 1e-5, and no [B, V] array gathered in the compiled program (unless top-k's
    2k candidates outnumber a shard's tokens); a nucleus
    without top-k, or shards not holding whole blocks, keep the draw on whole rows."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    from arca_jax import parallel

    mesh = parallel.make_mesh(*mesh_shape)
    t = mesh_shape[2]
    B, V = 16, 4 * 2 * draw.CDF_BLOCK  # each shard holds whole blocks
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 3.0, (B, V)).astype(np.float32)
    logits[:4] = np.round(logits[:4])  # many ties among the largest
    u = jnp.asarray(rng.uniform(1e-6, 1.0, B).astype(np.float32))
    settings = sampling.SamplingConfig(max_new_tokens=1, temperature=temperature, top_k=top_k,
                                       top_p=top_p, greedy=greedy, min_p=min_p)
    assert draw.vocabulary_split(V, settings, mesh)
    rows = parallel.batch_spec(B, mesh)[0]
    placed = jax.device_put(jnp.asarray(logits), NamedSharding(mesh, P(rows, "tensor")))
    f = jax.jit(lambda x, u: draw.choose_tokens(x, u, settings, mesh=mesh, rows=rows))
    got = f(placed, jax.device_put(u, NamedSharding(mesh, P(rows))))
    want = draw.choose_tokens(jnp.asarray(logits), u, settings)
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
    np.testing.assert_allclose(np.asarray(got.logps), np.asarray(want.logps), atol=1e-5)
    np.testing.assert_allclose(np.asarray(got.sampled_logps), np.asarray(want.sampled_logps),
                               atol=1e-5)
    hlo = f.lower(placed, u).compile().as_text()
    # (top-k 300: each shard's 2k candidates are all its V / t tokens, the whole row gathered)
    for line in hlo.splitlines() if 2 * top_k <= V // t else ():
        if " all-gather(" in line or " all-gather-start(" in line:
            shape = line.split("=")[1].split("all-gather")[0]
            assert f",{V}]" not in shape and f"[{V}" not in shape, line
    assert not draw.vocabulary_split(V, sampling.SamplingConfig(1, top_p=0.9), mesh)
    assert not draw.vocabulary_split(V + t, sampling.SamplingConfig(1), mesh)
    assert not draw.vocabulary_split(V, settings, parallel.make_mesh(8, 1, 1))
