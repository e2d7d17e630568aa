"""GRPO objective pieces: hand-checked estimators, clip and KL terms, chunked log-probs,
aggregations, the shared base forward (counted in the jaxpr), dropout keys, config checks."""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arca_jax import lora, qwen3
from arca_jax.grpo import (Batch, GRPOConfig, advantages, clipped_policy_loss, forwards_needed,
                           k3_kl, loss_fn, loss_normalizer, policy_logprobs, token_logprobs)
from fixtures import random_adapter, random_params, tiny_config

FAST = {"xla_backend_optimization_level": 0}
CFG = tiny_config(num_hidden_layers=3)
LSCALE = 2.0


@pytest.fixture(scope="module")
def model():
    @jax.jit
    def init():
        params = random_params(CFG, seed=0, scale=4.0)  # peakier
        tree = random_adapter(CFG, lora.LoraConfig(rank=4, alpha=8.0), seed=1, scale=0.2)
        return params, tree

    params, tree = init()
    B, T = 6, 12
    rng = np.random.default_rng(0)
    ids = rng.integers(1, CFG.vocab_size, (B, T)).astype(np.int32)
    am = np.ones((B, T), np.int32)
    cm = np.zeros((B, T), np.int32)
    for b, n in enumerate([7, 5, 1, 3, 6, 0]):  # completion lengths (last row: none)
        cm[b, 5:5 + n] = 1
        am[b, 5 + n:] = 0
    batch = Batch(input_ids=jnp.asarray(ids), attention_mask=jnp.asarray(am),
                  completion_mask=jnp.asarray(cm),
                  advantages=jnp.asarray(rng.normal(size=B), jnp.float32))
    return params, tree, batch


def _loss(tree, params, batch, g, **kw):
    return jax.jit(loss_fn, static_argnames=("config", "lora_scale", "grpo_config",
                                             "lora_dropout"), compiler_options=FAST)(
        tree, params, batch, config=CFG, lora_scale=LSCALE, grpo_config=g, **kw)


# ------------------------------------ estimators ----------------------------------------------


def test_advantage_estimators_hand_checked():
    r = jnp.array([[1.0, 0.0, 0.0, 1.0], [2.0, 2.0, 2.0, 2.0], [3.0, 0.0, 0.0, 0.0]])
    # group 0: mean 0.5, unbiased std sqrt(1/3)
    # group 2: mean 0.75, unbiased std sqrt((2.25^2 + 3 * 0.75^2) / 3) = 1.5
    s0, s2 = math.sqrt(1 / 3), math.sqrt((2.25 ** 2 + 3 * 0.75 ** 2) / 3)
    np.testing.assert_allclose(advantages(r, "grpo"), [
        [0.5 / s0, -0.5 / s0, -0.5 / s0, 0.5 / s0], [0, 0, 0, 0],
        [2.25 / s2, -0.75 / s2, -0.75 / s2, -0.75 / s2]], rtol=1e-6)
    np.testing.assert_allclose(advantages(r, "rloo"), [
        [1 - 1 / 3, 0 - 2 / 3, 0 - 2 / 3, 1 - 1 / 3], [0, 0, 0, 0], [3, -1, -1, -1]], rtol=1e-6)
    np.testing.assert_allclose(advantages(r, "dr_grpo"), [
        [0.5, -0.5, -0.5, 0.5], [0, 0, 0, 0], [2.25, -0.75, -0.75, -0.75]], rtol=1e-6)
    # grpo_batch_std: the group means' deviations over the unbiased std of all 12 rewards
    sb = math.sqrt(sum((x - 13 / 12) ** 2 for x in (1, 0, 0, 1, 2, 2, 2, 2, 3, 0, 0, 0)) / 11)
    np.testing.assert_allclose(advantages(r, "grpo_batch_std"), [
        [0.5 / sb, -0.5 / sb, -0.5 / sb, 0.5 / sb], [0, 0, 0, 0],
        [2.25 / sb, -0.75 / sb, -0.75 / sb, -0.75 / sb]], rtol=1e-6)
    # values: 0.8660254 for group 0 under grpo, checked by hand
    assert abs(float(advantages(r, "grpo")[0, 0]) - 0.8660254) < 1e-6
    # std floor: a tiny spread is not blown up beyond 1 / eps
    assert float(jnp.max(jnp.abs(advantages(jnp.array([[0.0, 1e-9]]), eps=1e-6)))) < 1e-3
    assert np.all(np.asarray(advantages(jnp.ones((3, 1)), "grpo")) == 0)
    assert np.all(np.asarray(advantages(jnp.ones((3, 1)), "rloo")) == 0)
    with pytest.raises(ValueError, match="estimator"):
        advantages(r, "ppo")


# ------------------------------------ clip and KL ---------------------------------------------


def test_clipped_surrogate_hand_checked():
    # (ratio, A) -> (loss, clipped, d loss / d logp) with clip [0.8, 1.3]
    cases = [
        (1.0, 1.0, -1.0, False, -1.0),      # on policy: -A, gradient -A * ratio
        (1.5, 1.0, -1.3, True, 0.0),        # above 1 + high with A > 0: clipped, no gradient
        (1.5, -1.0, 1.5, False, 1.5),       # above with A < 0: unclipped (pessimistic branch)
        (0.5, 1.0, -0.5, False, -0.5),      # below with A > 0: unclipped
        (0.5, -2.0, 1.6, True, 0.0),        # below 1 - low with A < 0: clipped at 0.8 * -2
        (1.2, 2.0, -2.4, False, -2.4),      # inside the range
    ]
    ratio = jnp.array([c[0] for c in cases])
    adv = jnp.array([c[1] for c in cases])
    old = jnp.zeros_like(ratio)
    logp = jnp.log(ratio)
    loss, r, clipped = clipped_policy_loss(logp, old, adv, 0.2, 0.3)
    np.testing.assert_allclose(loss, [c[2] for c in cases], rtol=1e-6)
    np.testing.assert_allclose(r, ratio, rtol=1e-6)
    assert list(np.asarray(clipped)) == [c[3] for c in cases]
    grad = jax.grad(lambda lp: jnp.sum(clipped_policy_loss(lp, old, adv, 0.2, 0.3)[0]))(logp)
    np.testing.assert_allclose(grad, [c[4] for c in cases], rtol=1e-6, atol=1e-7)


def test_k3_kl_hand_checked():
    logp = jnp.array([-1.0, -1.0, -2.0])
    ref = jnp.array([-1.0, -1.0 + math.log(2.0), -2.0 - math.log(2.0)])
    # d = ref - logp: 0, log 2, -log 2 -> e^d - d - 1 = 0, 1 - log 2, 0.5 + log 2 - 1
    np.testing.assert_allclose(k3_kl(logp, ref), [0.0, 1 - math.log(2), math.log(2) - 0.5],
                               rtol=1e-6, atol=1e-7)
    # d/dlogp = 1 - e^d: 0, -1, 0.5
    np.testing.assert_allclose(jax.grad(lambda x: jnp.sum(k3_kl(x, ref)))(logp), [0, -1, 0.5],
                               rtol=1e-6, atol=1e-7)


# ------------------------------------ chunked log-probs ---------------------------------------


@pytest.mark.parametrize("tied", [True, False])
def test_chunked_logprobs_equal_full_softmax(tied):
    cfg = tiny_config(vocab_size=53, hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tied)
    params = jax.jit(lambda k: qwen3.init_params(cfg, k))(jax.random.PRNGKey(2))
    h = 5.0 * jax.random.normal(jax.random.PRNGKey(3), (3, 11, 16))
    tg = jax.random.randint(jax.random.PRNGKey(4), (3, 11), 0, 53)
    w = jax.random.normal(jax.random.PRNGKey(5), (3, 11))
    valid = jnp.zeros((3, 11), bool).at[:, 8:].set(True)

    @functools.partial(jax.jit, compiler_options=FAST)
    def run(params, h):
        logits = qwen3.compute_logits(params, h, cfg)
        ref_lp = jnp.take_along_axis(jax.nn.log_softmax(logits), tg[..., None], -1)[..., 0]
        ref_ent = -jnp.sum(jax.nn.softmax(logits) * jax.nn.log_softmax(logits), -1)
        # 4 does not divide T = 11 (padding path); 64 > T
        chunked = [token_logprobs(params, h, tg, config=cfg, chunk_size=c) for c in (4, 11, 64)]
        g_ref = jax.grad(lambda x: jnp.sum(w * jnp.take_along_axis(
            jax.nn.log_softmax(qwen3.compute_logits(params, x, cfg)), tg[..., None],
            -1)[..., 0]))(h)
        g = jax.grad(lambda x: jnp.sum(w * token_logprobs(params, x, tg, config=cfg,
                                                          chunk_size=4)[0]))(h)
        g16 = jax.grad(lambda x: jnp.sum(w * token_logprobs(  # bf16-rounded cotangent
            params, x, tg, config=cfg, chunk_size=4, grad_dtype="bfloat16")[0]))(h)
        skipped = token_logprobs(params, h, tg, config=cfg, chunk_size=4, valid=valid)[0]
        return ref_lp, ref_ent, chunked, g_ref, g, g16, skipped

    ref_lp, ref_ent, chunked, g_ref, g, g16, skipped = run(params, h)
    assert float(jnp.max(jnp.abs(g16 - g_ref))) < 2e-2 * float(jnp.max(jnp.abs(g_ref)))
    for lp, ent in chunked:
        np.testing.assert_allclose(lp, ref_lp, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ent, ref_ent, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(g, g_ref, rtol=1e-5, atol=1e-6)
    # chunks without a valid position are skipped (0), the others unchanged
    np.testing.assert_allclose(skipped[:, 8:], ref_lp[:, 8:], rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(skipped[:, :8]) == 0)


# ------------------------------------ forwards ------------------------------------------------


def _count_layer_scans(jaxpr, length):
    """Number of scan primitives of the given length, searching nested jaxprs."""
    n = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "scan" and eqn.params["length"] == length:
            n += 1
        for v in eqn.params.values():
            for j in (v if isinstance(v, (list, tuple)) else [v]):
                inner = getattr(j, "jaxpr", j)  # ClosedJaxpr -> Jaxpr
                if hasattr(inner, "eqns"):
                    n += _count_layer_scans(inner, length)
    return n


@pytest.mark.parametrize("weighting,kl_beta,expected", [
    ("uniform", 0.0, 1), ("surprisal", 0.0, 1), ("entropy_reduction", 0.0, 1),
    ("divergence", 0.0, 2), ("arca", 0.0, 2), ("arca", 0.1, 2), ("uniform", 0.1, 2),
])
def test_only_needed_forwards_run_and_base_is_shared(model, weighting, kl_beta, expected):
    params, tree, batch = model
    g = GRPOConfig(weighting=weighting, kl_beta=kl_beta, logits_chunk=6,  # 2 chunks != 3 layers
                   scan_layers=True)  # one layer scan per forward
    assert len(forwards_needed(g)) == expected
    jaxpr = jax.make_jaxpr(lambda t: loss_fn(t, params, batch, config=CFG, lora_scale=LSCALE,
                                             grpo_config=g))(tree)
    assert _count_layer_scans(jaxpr.jaxpr, CFG.num_hidden_layers) == expected


# ------------------------------------ loss values ---------------------------------------------


def test_default_loss_is_paper_formula_and_aggregations(model):
    """Defaults: -mean_b A_b sum_t w_bt logp_bt; token_mean and dr_grpo with uniform weights are
    DAPO's token mean and Dr. GRPO's constant normaliser, checked from policy_logprobs."""
    params, tree, batch = model
    lp = np.asarray(jax.jit(policy_logprobs, static_argnames=("config", "lora_scale"))(
        tree, params, batch, config=CFG, lora_scale=LSCALE), np.float64)
    full = qwen3.forward(params, batch.input_ids, config=CFG, attention_mask=batch.attention_mask,
                         lora=tree, lora_scale=LSCALE).logits
    ref_lp = np.asarray(jnp.take_along_axis(jax.nn.log_softmax(full[:, :-1]),
                                            batch.input_ids[:, 1:, None], -1)[..., 0])
    m = np.asarray(batch.completion_mask * batch.attention_mask, bool)
    m[:, 0] = False
    np.testing.assert_allclose(lp[:, 1:][m[:, 1:]], ref_lp[m[:, 1:]], rtol=1e-5)
    A = np.asarray(batch.advantages, np.float64)
    n = m.sum(1)
    rows = n > 0
    per_row = np.array([-(A[b] * lp[b][m[b]].mean()) if n[b] else 0.0 for b in range(len(A))])

    loss, stats = _loss(tree, params, batch, GRPOConfig(weighting="uniform"))
    np.testing.assert_allclose(float(loss), per_row.sum() / rows.sum(), rtol=1e-5)
    tok = -(A[:, None] * lp * m).sum() / m.sum()
    loss, _ = _loss(tree, params, batch, GRPOConfig(weighting="uniform",
                                                    loss_aggregation="token_mean"))
    np.testing.assert_allclose(float(loss), tok, rtol=1e-5)
    loss, _ = _loss(tree, params, batch, GRPOConfig(weighting="uniform",
                                                    loss_aggregation="dr_grpo",
                                                    max_completion_length=20))
    np.testing.assert_allclose(float(loss), -(A[:, None] * lp * m).sum() / (6 * 20), rtol=1e-5)
    assert float(loss_normalizer(batch, GRPOConfig())) == 5  # the empty row does not count
    assert float(stats.tokens) == m.sum() and float(stats.rows) == 5
    assert abs(float(stats.metrics()["completion_length"]) - m.sum() / 5) < 1e-6

    # With old_logps equal to the current log-probs the ratio is 1: same gradient as without.
    g = GRPOConfig(weighting="surprisal", sharpening=2.0)
    f = jax.jit(jax.grad(lambda t, b: loss_fn(t, params, b, config=CFG, lora_scale=LSCALE,
                                              grpo_config=g)[0]), compiler_options=FAST)
    g0 = f(tree, batch)
    g1 = f(tree, batch.replace(old_logps=jnp.asarray(lp, jnp.float32)))
    for a, b in zip(jax.tree_util.tree_leaves(g0), jax.tree_util.tree_leaves(g1)):
        assert np.linalg.norm(a - b) <= 1e-5 * np.linalg.norm(b)


def test_dropout_only_in_gradient_forward_and_keyed(model):
    params, tree, batch = model
    g = GRPOConfig(weighting="arca")
    k1, k2 = jax.random.PRNGKey(7), jax.random.PRNGKey(8)
    run = jax.jit(lambda t, k: loss_fn(t, params, batch, config=CFG, lora_scale=LSCALE,
                                       grpo_config=g, lora_dropout=0.5, rng=k),
                  compiler_options=FAST)
    a, sa = run(tree, k1)
    b, _ = run(tree, k1)
    c, sc = run(tree, k2)
    assert float(a) == float(b) and float(a) != float(c)
    no_drop, s0 = _loss(tree, params, batch, g)
    assert float(no_drop) != float(a)
    # the residual (adapted - base) moves with the dropout mask: the adapted side is the
    # dropout forward, the base side is not (a dropped-out adapter still changes h)
    assert float(sa.residual_sum) != float(sc.residual_sum)
    with pytest.raises(ValueError, match="rng"):
        loss_fn(tree, params, batch, config=CFG, lora_scale=LSCALE, grpo_config=g,
                lora_dropout=0.5)


@pytest.mark.parametrize("weighting", ["arca", "divergence"])
def test_fresh_adapter_gives_exactly_uniform_weights(model, weighting):
    """B = 0: adapted and base forwards compute the same function (through different XLA
    fusions); the noise floor makes the residual / divergence exactly 0, so the weights fall back
    to uniform, as in the reference where both forwards use the same kernels."""
    params, tree, batch = model
    fresh = jax.tree_util.tree_map_with_path(
        lambda p, x: jnp.zeros_like(x) if "lora_b" in str(p) else x, tree)
    g = GRPOConfig(weighting=weighting, sharpening=2.0)
    _, stats = _loss(fresh, params, batch, g)
    assert float(stats.residual_sum) == 0.0 and float(stats.residual_norm_max) == 0.0
    assert abs(float(stats.gini_sum)) < 1e-6
    assert abs(float(stats.eff_sum) - float(stats.eff_rows)) < 1e-5  # every EffN/T is 1
    # without the floor, float32 rounding noise would decide the weights
    _, raw = _loss(fresh, params, batch, GRPOConfig(weighting=weighting, sharpening=2.0,
                                                     noise_floor=0.0))
    if weighting == "arca":
        assert float(raw.residual_norm_max) < 1e-4


def test_config_and_batch_validation(model):
    params, tree, batch = model
    for bad in (dict(weighting="attention"), dict(estimator="ppo"), dict(sharpening=0.0),
                dict(loss_aggregation="sum"), dict(num_iterations=0), dict(kl_beta=-1.0),
                dict(clip_eps=0.0), dict(logits_chunk=0), dict(noise_floor=-1.0)):
        with pytest.raises(ValueError):
            GRPOConfig(**bad)
    with pytest.raises(ValueError, match="old_logps"):
        loss_fn(tree, params, batch, config=CFG, lora_scale=LSCALE,
                grpo_config=GRPOConfig(num_iterations=2))
    # dict batches work like Batch
    d = {k: getattr(batch, k) for k in ("input_ids", "attention_mask", "completion_mask",
                                         "advantages")}
    g = GRPOConfig(weighting="uniform")
    np.testing.assert_allclose(float(_loss(tree, params, d, g)[0]),
                               float(_loss(tree, params, batch, g)[0]), rtol=1e-6)
    assert hash(g) == hash(GRPOConfig(weighting="uniform"))


# ------------------------------------ execution options ---------------------------------------


def test_execution_options_keep_loss_and_grads(model):
    """attention="sdpa-xla" (the cuDNN path's row layout), remat="projections" and a bf16 head
    backward change nothing beyond rounding (float32 model; the head option at bf16 rounding)."""
    params, tree, batch = model
    am = batch.attention_mask.at[0, :2].set(0).at[3, :1].set(0)  # left padding too
    batch = batch.replace(attention_mask=am)

    @functools.partial(jax.jit, static_argnames="g", compiler_options=FAST)
    def run(tree, g):
        return jax.value_and_grad(lambda t: loss_fn(t, params, batch, config=CFG, lora_scale=LSCALE,
                                                    grpo_config=g)[0])(tree)

    base = GRPOConfig(weighting="arca", sharpening=2.0, kl_beta=0.1)
    loss0, g0 = run(tree, base)
    for kw, tol in ((dict(attention="sdpa-xla"), 1e-4), (dict(remat="projections"), 1e-4),
                    (dict(attention="sdpa-xla", remat=True), 1e-4),
                    (dict(logits_grad_dtype="bfloat16"), 2e-2)):
        loss, g = run(tree, GRPOConfig(**{**dataclasses.asdict(base), **kw}))
        np.testing.assert_allclose(float(loss), float(loss0), rtol=1e-5)
        for a, b in zip(jax.tree_util.tree_leaves(g0), jax.tree_util.tree_leaves(g)):
            assert float(jnp.max(jnp.abs(a - b))) <= tol * float(jnp.max(jnp.abs(a))), kw
    for bad in (dict(attention="flash"), dict(remat="some"), dict(lora_dtype="float33"),
                dict(logits_grad_dtype=32)):
        with pytest.raises((ValueError, TypeError)):
            GRPOConfig(**bad)
