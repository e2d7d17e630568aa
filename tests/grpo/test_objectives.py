"""The objective variants against numpy transcriptions of their papers' formulas:

- GSPO (Zheng et al. 2025, arXiv 2507.18071): the sequence ratio s_i = exp(mean_t log-ratio),
  clipped per sequence (eq. 5-7), in the GSPO-token form (eq. 13-14) that lets token weights act;
- truncated / masked importance sampling between the sampler and the trainer (TIS, MIS) as TRL's
  GRPOTrainer defines them: ratio exp(old - behaviour) per token or exp(sum) per sequence,
  min(ratio, C) or 0 above C, multiplying the per-token policy loss;
- dual clipping (Ye et al. 2020) as verl writes it: for A < 0, min(-A c, max(-A r, -A clip(r)));
- CISPO (MiniMax-M1) as TRL writes it: -sg[min(r, cap)] A log pi;
- high-entropy token selection (Wang et al. 2025, "Beyond the 80/20 Rule") as TRL's
  ``get_high_entropy_mask`` computes it: ``torch.quantile`` of the valid tokens' entropies.

Loss values and gradients on random batches with ragged masks: the pure per-token functions
against numpy, ``loss_fn`` on a tiny model (its LoRA gradient against the numpy dL/dlog-prob
pulled back through the log-probs' VJP), and the train step in jit / pmap / mesh with
microbatching equal to one batch.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arca_jax import credit, lora, qwen3
from arca_jax.grpo import (Batch, GRPOConfig, LossStats, TrainState, all_method_weights,
                           behaviour_weights, cispo_policy_loss, clipped_policy_loss,
                           completion_valid,
                           high_entropy_mask, loss_fn, make_mesh, make_train_step,
                           policy_logprobs, replicate, shard_params, unreplicate)
from fixtures import grad_recorder, random_adapter, random_params, slow_except, tiny_config

FAST = {"xla_backend_optimization_level": 0}
CFG = tiny_config(vocab_size=60, tie_word_embeddings=True)
LCFG = lora.LoraConfig(rank=4, alpha=8.0)
USER = "test_objectives_arca_x_surprisal"


# ------------------------------------ numpy transcriptions ------------------------------------


def np_surrogate(logps, old, adv, valid, clip_low, clip_high, level, ratio_max=None):
    """Per-token clipped surrogate -min(r A, clip(r) A), the value of r, the clipped flag and
    d(loss_t)/d(log pi_t). token: r_t = pi_t / pi_old_t. sequence (GSPO-token): r_t has the value
    s_i = (pi(y_i) / pi_old(y_i))^(1/|y_i|) and d r_t / d log pi_t = s_i. ratio_max c: verl's
    dual clip, min(-A c, that loss) where A < 0."""
    A = np.broadcast_to(np.asarray(adv, np.float64)[:, None], logps.shape)
    if level == "token":
        r = np.exp(logps - old)
    else:
        n = np.maximum(valid.sum(1), 1)
        s = np.exp(np.where(valid, logps - old, 0.0).sum(1) / n)
        r = np.broadcast_to(s[:, None], logps.shape)
    loss = -np.minimum(r * A, np.clip(r, 1 - clip_low, 1 + clip_high) * A)
    clipped = ((A > 0) & (r > 1 + clip_high)) | ((A < 0) & (r < 1 - clip_low))
    if ratio_max is not None:
        loss = np.where(A < 0, np.minimum(-A * ratio_max, loss), loss)
        clipped = clipped | ((A < 0) & (r > ratio_max))
    dloss = np.where(clipped, 0.0, -A * r)
    return loss, r, clipped, dloss


def np_cispo(logps, old, adv, valid, cap, level):
    """TRL's CISPO per token: -clamp(r, max=cap).detach() A log pi (r as in ``np_surrogate``),
    r's value, the capped flag and d(loss_t)/d(log pi_t) = -min(r, cap) A."""
    A = np.broadcast_to(np.asarray(adv, np.float64)[:, None], logps.shape)
    if level == "token":
        r = np.exp(logps - old)
    else:
        n = np.maximum(valid.sum(1), 1)
        r = np.broadcast_to(np.exp(np.where(valid, logps - old, 0.0).sum(1) / n)[:, None],
                            logps.shape)
    w = np.minimum(r, cap)
    return -w * A * logps, r, r > cap, -w * A


def np_importance(before, behaviour, valid, method, level, cap):
    """TRL: ratio = exp((old - sampling) * mask) per token, exp(sum) per sequence; truncate:
    min(ratio, C); mask: ratio set to 0 where above C. Returns (weights, (sum, units, above,
    max))."""
    d = np.where(valid, before - behaviour, 0.0)
    if level == "token":
        ratio, units = np.exp(d), valid
    else:
        ratio, units = np.exp(d.sum(1)), valid.any(1)
    w = np.minimum(ratio, cap) if method == "tis" else np.where(ratio > cap, 0.0, ratio)
    if level == "sequence":
        w = np.broadcast_to(w[:, None], valid.shape)
    w = np.where(valid, w, 0.0)
    r = ratio[units]
    return w, (r.sum(), units.sum(), (r > cap).sum(), r.max() if r.size else 0.0)


def np_entropy_mask(entropies, valid, rho):
    """TRL's high-entropy mask: valid tokens whose entropy is >= torch.quantile(valid entropies,
    1 - rho) (all False without a valid token)."""
    import torch

    v = np.asarray(valid, bool)
    if not v.any():
        return np.zeros_like(v)
    thr = torch.quantile(torch.from_numpy(np.asarray(entropies, np.float32)[v]), 1.0 - rho).item()
    return v & (np.asarray(entropies, np.float32) >= thr)


def np_entropies(params, tree, batch):
    """[B, T] the entropy (nats, float64) of the adapted policy's distribution that scores each
    input token (the logits at t - 1; 0 at t = 0), from the model's logits."""
    out = qwen3.forward(params, batch.input_ids, config=CFG, attention_mask=batch.attention_mask,
                        lora=tree, lora_scale=LCFG.scaling, attention="einsum")
    z = np.asarray(out.logits, np.float64)
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    h = -(np.exp(logp) * logp).sum(-1)
    return np.concatenate([np.zeros_like(h[:, :1]), h[:, :-1]], axis=1)


def np_loss(logps, old, behaviour, adv, weights, valid, g: GRPOConfig, entropies=None):
    """The loss and dL/d log pi [B, T] of ``loss_fn`` (module doc of arca_jax.grpo.objective)
    with kl_beta = 0, in float64 (``entropies`` [B, T]: for top_entropy_quantile < 1)."""
    logps = np.asarray(logps, np.float64)
    v = np.asarray(valid, bool)
    A = np.broadcast_to(np.asarray(adv, np.float64)[:, None], logps.shape)
    if old is None:  # on-policy: ratio 1, -A log pi
        pg, dpg, before = -A * logps, -A, logps
    else:
        old = np.where(v, np.asarray(old, np.float64), logps)
        if g.policy_loss == "cispo":
            pg, _, _, dpg = np_cispo(logps, old, adv, v, g.cispo_cap, g.ratio_level)
        else:
            pg, _, _, dpg = np_surrogate(logps, old, adv, v, g.clip_eps, g.clip_high,
                                         g.ratio_level, g.clip_ratio_max)
        before = old
    if g.behaviour_correction != "none":
        w_is, _ = np_importance(before, np.asarray(behaviour, np.float64), v,
                                g.behaviour_correction, g.correction_level, g.correction_cap)
        pg, dpg = pg * w_is, dpg * w_is
    if g.top_entropy_quantile < 1.0:
        keep = np_entropy_mask(entropies, v, g.top_entropy_quantile)
        pg, dpg = pg * keep, dpg * keep
    n = v.sum(1, keepdims=True)
    coef = np.asarray(weights, np.float64) * (1.0 if g.loss_aggregation == "sequence" else n)
    z = {"sequence": v.any(1).sum(), "token_mean": v.sum(),
         "dr_grpo": v.shape[0] * (g.max_completion_length or v.shape[1])}[g.loss_aggregation]
    z = max(z, 1)
    return np.sum(np.where(v, coef * pg, 0.0)) / z, np.where(v, coef * dpg, 0.0) / z


def np_gspo(logps, old, adv, valid, clip_low, clip_high):
    """GSPO's objective itself (eq. 5-7), to be minimised: -1/#rows sum_i min(s_i A_i,
    clip(s_i) A_i), and its gradient in log pi: -A_i s_i / |y_i| per token unless clipped."""
    v = np.asarray(valid, bool)
    n = v.sum(1)
    rows = n > 0
    s = np.exp(np.where(v, logps - old, 0.0).sum(1) / np.maximum(n, 1))
    A = np.asarray(adv, np.float64)
    J = np.minimum(s * A, np.clip(s, 1 - clip_low, 1 + clip_high) * A)
    clipped = ((A > 0) & (s > 1 + clip_high)) | ((A < 0) & (s < 1 - clip_low))
    grad = np.where(v & ~clipped[:, None], (-A * s / np.maximum(n, 1))[:, None], 0.0)
    return -J[rows].sum() / rows.sum(), grad / rows.sum()


def ragged_valid(rng, B, T):
    v = np.zeros((B, T), bool)
    for b in range(B):
        n = int(rng.integers(0, T + 1)) if b else 0  # row 0 empty
        start = int(rng.integers(0, T - n + 1))
        v[b, start:start + n] = True
    v[1] = False
    v[1, T // 2] = True  # one token
    v[2, ::2] = True  # holes
    return v


# ------------------------------------ per-token functions -------------------------------------


def random_ratios(seed, noise, B=9, T=12):
    """(valid [B, T] ragged, logps, old logps = logps + N(0, noise), advantages [B]) in float32."""
    rng = np.random.default_rng(seed)
    valid = ragged_valid(rng, B, T)
    logps = (-rng.exponential(1.0, (B, T))).astype(np.float32)
    old = (logps + rng.normal(0, noise, (B, T))).astype(np.float32)
    return valid, logps, old, rng.normal(size=B).astype(np.float32)


@pytest.mark.parametrize("level,ratio_max", [("token", None), ("sequence", None),
                                             ("token", 1.35), ("sequence", 1.06)])
def test_surrogate_against_numpy(level, ratio_max):
    valid, logps, old, adv = random_ratios(0, 0.25)
    B, T = valid.shape
    w = np.random.default_rng(1).random((B, T)).astype(np.float32) * valid
    clip = (0.2, 0.28) if level == "token" else (0.03, 0.04)

    def f(lp):
        loss, ratio, clipped = clipped_policy_loss(lp, old, jnp.broadcast_to(adv[:, None], (B, T)),
                                                   *clip, level=level, valid=valid,
                                                   ratio_max=ratio_max)
        return jnp.sum(jnp.where(valid, w * loss, 0.0)), (loss, ratio, clipped)

    (val, (loss, ratio, clipped)), grad = jax.jit(jax.value_and_grad(f, has_aux=True))(logps)
    want_loss, want_r, want_clipped, want_d = np_surrogate(
        logps.astype(np.float64), old.astype(np.float64), adv, valid, *clip, level, ratio_max)
    np.testing.assert_allclose(np.where(valid, loss, 0), np.where(valid, want_loss, 0),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.where(valid, ratio, 0), np.where(valid, want_r, 0), rtol=1e-5)
    assert np.array_equal(np.asarray(clipped) & valid, want_clipped & valid)
    assert 0 < (want_clipped & valid).sum() < valid.sum()  # both branches are exercised
    if ratio_max is not None:  # and the dual clip's
        A = np.broadcast_to(adv[:, None], (B, T))
        assert ((A < 0) & (want_r > ratio_max) & valid).any()
    np.testing.assert_allclose(float(val), np.sum(w * np.where(valid, want_loss, 0)), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(grad), w * np.where(valid, want_d, 0), rtol=1e-5,
                               atol=1e-7)
    if level == "sequence" and ratio_max is None:  # uniform weights: GSPO's objective, gradient
        n = valid.sum(1, keepdims=True)
        wu = np.where(valid, 1.0 / np.maximum(n, 1), 0.0).astype(np.float32)
        gs = jax.grad(lambda lp: jnp.sum(jnp.where(valid, wu * clipped_policy_loss(
            lp, old, jnp.broadcast_to(adv[:, None], (B, T)), *clip, level=level,
            valid=valid)[0], 0.0)))(logps)
        rows = valid.any(1).sum()
        want_J, want_g = np_gspo(logps.astype(np.float64), old.astype(np.float64), adv, valid,
                                 *clip)
        np.testing.assert_allclose(float(jnp.sum(jnp.where(valid, wu * loss, 0.0))) / rows,
                                   want_J, rtol=1e-5)
        np.testing.assert_allclose(np.asarray(gs) / rows, want_g, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("method", ["tis", "mis"])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_behaviour_weights_against_numpy(method, level):
    rng = np.random.default_rng(1)
    B, T = 9, 12
    valid = ragged_valid(rng, B, T)
    before = (-rng.exponential(1.0, (B, T))).astype(np.float32)
    beh = (before + rng.normal(0, 0.5 if level == "token" else 0.15, (B, T))).astype(np.float32)
    beh = np.where(valid, beh, 0.0).astype(np.float32)
    cap = 1.5
    w, stats = jax.jit(lambda a, b: behaviour_weights(a, b, valid, method=method, level=level,
                                                      cap=cap))(before, beh)
    want_w, want_stats = np_importance(before.astype(np.float64), beh.astype(np.float64), valid,
                                       method, level, cap)
    np.testing.assert_allclose(np.asarray(w), want_w, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose([float(x) for x in stats], want_stats, rtol=1e-5)
    assert 0 < want_stats[2] < want_stats[1]  # some units above the cap, not all
    if method == "tis":
        assert np.asarray(w).max() <= cap
    # detached: no gradient flows into the numerator
    g = jax.grad(lambda a: jnp.sum(behaviour_weights(a, beh, valid, method=method, level=level,
                                                     cap=cap)[0]))(before)
    assert not np.any(np.asarray(g))


# ------------------------------------ loss_fn on a tiny model ---------------------------------


@pytest.fixture(scope="module")
def model():
    params, tree = jax.jit(lambda: (random_params(CFG, seed=0, scale=2.0),
                                    random_adapter(CFG, LCFG, seed=1, scale=0.2)))()
    B, T = 16, 10
    rng = np.random.default_rng(0)
    ids = rng.integers(1, CFG.vocab_size, (B, T)).astype(np.int32)
    am = np.ones((B, T), np.int32)
    cm = np.zeros((B, T), np.int32)
    for b in range(B):
        n = int(rng.integers(1, 6)) if b != 5 else 0  # row 5 has no completion token
        cm[b, 4:4 + n] = 1
        am[b, 4 + n:] = 0
    cm[3, 5] = 0  # a hole (still attended to)
    batch = Batch(input_ids=jnp.asarray(ids), attention_mask=jnp.asarray(am),
                  completion_mask=jnp.asarray(cm),
                  advantages=jnp.asarray(rng.normal(size=B).astype(np.float32)))
    valid = np.asarray(completion_valid(batch))
    lp = np.asarray(policy_logprobs(tree, params, batch, config=CFG, lora_scale=LCFG.scaling))
    old = np.where(valid, lp + rng.normal(0, 0.2, lp.shape), 0.0).astype(np.float32)
    beh = np.where(valid, old + rng.normal(0, 0.3, lp.shape), 0.0).astype(np.float32)
    batch = batch.replace(old_logps=jnp.asarray(old), behaviour_logps=jnp.asarray(beh))
    return params, tree, batch


@pytest.fixture(scope="module")
def user_weighting():
    credit.register(USER, needs=("residual_norms", "logps"),
                    fn=lambda residual_norms, logps: residual_norms * -logps)
    yield USER
    credit.unregister(USER)


def _grad_diff(a, b):
    return max(float(np.linalg.norm(np.asarray(x) - np.asarray(y))
                     / max(np.linalg.norm(np.asarray(y)), 1e-30))
               for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


CASES = [
    # GSPO exactly (uniform weights): also checked against GSPO's own sequence objective
    dict(weighting="uniform", ratio_level="sequence", clip_eps=0.03, clip_eps_high=0.04),
    # GSPO-token with ARCA's weights
    dict(weighting="arca", sharpening=2.0, ratio_level="sequence", clip_eps=0.03,
         clip_eps_high=0.04),
    dict(weighting="arca", behaviour_correction="tis", correction_level="token",
         correction_cap=1.3),
    dict(weighting="surprisal", behaviour_correction="mis", correction_level="sequence",
         correction_cap=1.2, loss_aggregation="token_mean"),
    dict(weighting="user", ratio_level="sequence", clip_eps=0.03, behaviour_correction="tis",
         correction_level="sequence", correction_cap=1.1, loss_aggregation="dr_grpo"),
    dict(weighting="divergence", behaviour_correction="mis", correction_level="token",
         correction_cap=1.4, on_policy=True),
    # dual clipping (verl's clip_ratio_c, TRL's delta) with ARCA's weights
    dict(weighting="arca", clip_eps=0.1, clip_ratio_max=1.15),
    # CISPO, per token with token-mean aggregation (as MiniMax-M1), and per sequence with ARCA
    dict(weighting="uniform", policy_loss="cispo", cispo_cap=1.1, loss_aggregation="token_mean"),
    dict(weighting="arca", policy_loss="cispo", cispo_cap=1.05, ratio_level="sequence"),
    # the 80/20 rule's high-entropy tokens, on policy and off (with a correction)
    dict(weighting="uniform", top_entropy_quantile=0.2, on_policy=True),
    dict(weighting="arca", top_entropy_quantile=0.5, behaviour_correction="tis",
         correction_level="token", correction_cap=1.3, loss_aggregation="token_mean"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_loss_fn_against_numpy(model, user_weighting, case):
    params, tree, batch = model
    case = dict(case)
    on_policy = case.pop("on_policy", False)
    if case["weighting"] == "user":
        case["weighting"] = user_weighting
    g = GRPOConfig(**case)
    if on_policy:
        batch = batch.replace(old_logps=None)
    f = jax.jit(jax.value_and_grad(lambda t: loss_fn(t, params, batch, config=CFG,
                                                     lora_scale=LCFG.scaling, grpo_config=g),
                                   has_aux=True), compiler_options=FAST)
    (loss, stats), grads = f(tree)

    logps, vjp = jax.vjp(lambda t: policy_logprobs(t, params, batch, config=CFG,
                                                   lora_scale=LCFG.scaling, grpo_config=g), tree)
    w = all_method_weights(tree, params, batch, config=CFG, lora_scale=LCFG.scaling,
                           grpo_config=g, methods=(g.weighting,))[g.weighting]
    valid = np.asarray(completion_valid(batch))
    old = None if batch.old_logps is None else np.asarray(batch.old_logps)
    ent = np_entropies(params, tree, batch) if g.top_entropy_quantile < 1.0 else None
    want, dlogp = np_loss(np.asarray(logps), old, np.asarray(batch.behaviour_logps),
                          np.asarray(batch.advantages), np.asarray(w), valid, g, ent)
    np.testing.assert_allclose(float(loss), want, rtol=2e-5, atol=1e-7)
    (want_grads,) = vjp(jnp.asarray(dlogp, jnp.float32))
    assert _grad_diff(grads, want_grads) < 1e-4
    if g.weighting == "uniform" and g.ratio_level == "sequence":  # GSPO's own objective
        J, gJ = np_gspo(np.asarray(logps, np.float64), np.where(valid, old, np.asarray(logps)),
                        np.asarray(batch.advantages), valid, g.clip_eps, g.clip_high)
        np.testing.assert_allclose(float(loss), J, rtol=2e-5, atol=1e-7)
        assert _grad_diff(grads, vjp(jnp.asarray(gJ, jnp.float32))[0]) < 1e-4

    # the statistics: clipped tokens, and the behaviour ratio as numpy computes it
    if old is not None:
        lp64, old64 = np.asarray(logps, np.float64), np.where(valid, old, np.asarray(logps))
        if g.policy_loss == "cispo":
            _, _, clipped, _ = np_cispo(lp64, old64, np.asarray(batch.advantages), valid,
                                        g.cispo_cap, g.ratio_level)
        else:
            _, _, clipped, _ = np_surrogate(lp64, old64, np.asarray(batch.advantages), valid,
                                            g.clip_eps, g.clip_high, g.ratio_level,
                                            g.clip_ratio_max)
        assert float(stats.clip_count) == (clipped & valid).sum() > 0
        if g.clip_ratio_max is not None:  # some tokens only the dual clip stops
            r = np.exp(np.asarray(logps, np.float64) - np.where(valid, old, np.asarray(logps)))
            A = np.asarray(batch.advantages)[:, None]
            assert (valid & (A < 0) & (r > g.clip_ratio_max)).any()
    m = stats.metrics()
    if g.behaviour_correction == "none":
        assert float(m["behaviour_ratio_mean"]) == float(m["behaviour_ratio_max"]) == 0.0
    else:
        before = np.asarray(logps) if old is None else np.where(valid, old, 0.0)
        _, (s, units, above, mx) = np_importance(before.astype(np.float64),
                                                 np.asarray(batch.behaviour_logps, np.float64),
                                                 valid, g.behaviour_correction,
                                                 g.correction_level, g.correction_cap)
        np.testing.assert_allclose(float(m["behaviour_ratio_mean"]), s / units, rtol=1e-4)
        np.testing.assert_allclose(float(m["behaviour_ratio_max"]), mx, rtol=1e-4)
        np.testing.assert_allclose(float(m["behaviour_capped_fraction"]), above / units)
        assert 0 < above < units


def test_defaults_unchanged_and_sequence_level_is_token_level_on_policy(model):
    """ratio_level only matters off-policy: without old_logps both levels give the same loss
    and gradients bit for bit; the default config's loss is the one without the new settings."""
    params, tree, batch = model
    on = batch.replace(old_logps=None)
    out = {}
    for level in ("token", "sequence"):
        g = GRPOConfig(weighting="arca", ratio_level=level)
        out[level] = jax.jit(jax.value_and_grad(
            lambda t: loss_fn(t, params, on, config=CFG, lora_scale=LCFG.scaling,
                              grpo_config=g)[0]), compiler_options=FAST)(tree)
    assert float(out["token"][0]) == float(out["sequence"][0])
    for a, b in zip(jax.tree_util.tree_leaves(out["token"][1]),
                    jax.tree_util.tree_leaves(out["sequence"][1])):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    assert GRPOConfig() == GRPOConfig(ratio_level="token", behaviour_correction="none")


def test_settings_are_validated(model):
    params, tree, batch = model
    for bad in (dict(ratio_level="seq"), dict(behaviour_correction="is"),
                dict(correction_level="row"), dict(correction_cap=0.0)):
        with pytest.raises(ValueError, match=next(iter(bad))):
            GRPOConfig(**bad)
    with pytest.raises(ValueError, match="behaviour_logps"):
        loss_fn(tree, params, batch.replace(behaviour_logps=None), config=CFG,
                lora_scale=LCFG.scaling, grpo_config=GRPOConfig(behaviour_correction="tis"))
    with pytest.raises(ValueError, match="valid"):
        clipped_policy_loss(jnp.zeros((1, 2)), jnp.zeros((1, 2)), jnp.zeros((1, 2)), 0.2, 0.2,
                            level="sequence")


# ------------------------------------ the train step ------------------------------------------



def _copy(tree):
    return jax.tree_util.tree_map(jnp.array, tree)


STEP_CASES = [
    dict(weighting="user", ratio_level="sequence", clip_eps=0.03, behaviour_correction="tis",
         correction_level="sequence", correction_cap=1.1),
    dict(weighting="arca", sharpening=2.0, behaviour_correction="mis", correction_level="token",
         correction_cap=1.3, loss_aggregation="token_mean", kl_beta=0.05),
]


@pytest.mark.parametrize("rho", [0.2, 0.5])
def test_high_entropy_mask_in_one_batch_on_every_layout(model, rho):
    """top_entropy_quantile's threshold runs over the whole batch however its rows are placed:
    the train step on one device, under pmap (8 devices, the quantile gathered over them) and on
    a mesh (data 2 x fsdp 4) takes the same update as ``loss_fn`` on the whole batch."""
    params, tree, batch = model
    g = GRPOConfig(weighting="arca", top_entropy_quantile=rho)
    opt = grad_recorder()
    (loss, _), grads = jax.jit(jax.value_and_grad(
        lambda t: loss_fn(t, params, batch, config=CFG, lora_scale=LCFG.scaling, grpo_config=g),
        has_aux=True), compiler_options=FAST)(tree)

    def state():
        return TrainState.create(_copy(tree), opt, jax.random.PRNGKey(3))

    out = {}
    s, m = make_train_step(CFG, g, opt, lora_scale=LCFG.scaling, mode="pmap")(
        replicate(state()), replicate(params), batch)
    out["pmap"] = (unreplicate(s.opt_state), m)
    mesh = make_mesh(data=2, fsdp=4)
    s, m = make_train_step(CFG, g, opt, lora_scale=LCFG.scaling, mode="mesh", mesh=mesh,
                           compiler_options=FAST)(state(), shard_params(params, mesh), batch)
    out["mesh"] = (s.opt_state, m)
    for name, (recorded, m) in out.items():
        assert _grad_diff(recorded, grads) < 1e-5, name
        assert abs(float(m.loss) - float(loss)) <= 1e-5 * max(1.0, abs(float(loss))), name
    # the mask acts: the loss differs from the unmasked one
    full = loss_fn(tree, params, batch, config=CFG, lora_scale=LCFG.scaling,
                   grpo_config=GRPOConfig(weighting="arca"))[0]
    assert abs(float(full) - float(loss)) > 1e-4


def test_high_entropy_mask_against_torch_quantile():
    """``high_entropy_mask`` keeps what TRL's mask keeps (``torch.quantile``, linear
    interpolation) on ragged masks, tied entropies, one valid token and none."""
    rng = np.random.default_rng(11)
    B, T = 9, 12
    valid = ragged_valid(rng, B, T)
    ent = rng.exponential(1.0, (B, T)).astype(np.float32)
    ent[4] = np.round(ent[4])  # ties
    for rho in (0.05, 0.2, 0.5, 0.8, 1.0):
        got = np.asarray(jax.jit(high_entropy_mask, static_argnums=2)(ent, valid, 1.0 - rho))
        assert np.array_equal(got, np_entropy_mask(ent, valid, rho)), rho
        if rho < 1.0:
            assert 0 < got.sum() < valid.sum()
    one = np.zeros((B, T), bool)
    one[2, 3] = True
    assert np.array_equal(np.asarray(high_entropy_mask(ent, one, 0.8)), one)
    assert not np.asarray(high_entropy_mask(ent, np.zeros((B, T), bool), 0.8)).any()
    with pytest.raises(ValueError, match="top_entropy_quantile"):
        GRPOConfig(top_entropy_quantile=0.0)


@pytest.mark.parametrize("case", slow_except(STEP_CASES), ids=["gspo-tis-seq-user", "mis-token-arca"])
def test_train_step_jit_microbatches_pmap_mesh_agree(model, user_weighting, case):
    params, tree, batch = model
    case = dict(case)
    if case["weighting"] == "user":
        case["weighting"] = user_weighting
    g = GRPOConfig(**case)
    opt = grad_recorder()
    (loss, stats), grads = jax.jit(jax.value_and_grad(
        lambda t: loss_fn(t, params, batch, config=CFG, lora_scale=LCFG.scaling, grpo_config=g),
        has_aux=True), compiler_options=FAST)(tree)
    want_m = stats.metrics()

    def state():
        return TrainState.create(_copy(tree), opt, jax.random.PRNGKey(3))

    out = {}
    for name, kw in (("jit", {}), ("jit-mb2", dict(microbatches=2))):
        step = make_train_step(CFG, g, opt, lora_scale=LCFG.scaling, compiler_options=FAST, **kw)
        s, m = step(state(), params, batch)
        out[name] = (s.opt_state, m)
    step = make_train_step(CFG, g, opt, lora_scale=LCFG.scaling, mode="pmap", microbatches=2)
    s, m = step(replicate(state()), replicate(params), batch)
    out["pmap-mb2"] = (unreplicate(s.opt_state), m)
    mesh = make_mesh(data=2, fsdp=4)
    step = make_train_step(CFG, g, opt, lora_scale=LCFG.scaling, mode="mesh", mesh=mesh,
                           microbatches=2, compiler_options=FAST)
    s, m = step(state(), shard_params(params, mesh), batch)
    out["mesh-mb2"] = (s.opt_state, m)

    fields = ("loss", "clip_fraction", "weight_gini", "effective_token_ratio", "kl",
              "behaviour_ratio_mean", "behaviour_ratio_max", "behaviour_capped_fraction")
    for name, (recorded, m) in out.items():
        assert _grad_diff(recorded, grads) < 1e-5, name
        assert abs(float(m.loss) - float(loss)) <= 1e-5 * max(1.0, abs(float(loss))), name
        for f in fields[1:]:
            a, b = float(getattr(m, f)), float(want_m[f])
            assert abs(a - b) <= 1e-5 * max(1.0, abs(b)), (name, f, a, b)
    assert 0 < float(want_m["behaviour_capped_fraction"]) < 1
    assert float(want_m["behaviour_ratio_max"]) > 1.0


def test_loss_stats_combine_exactly():
    """Two halves' statistics combine into the whole's: sums add, maxima take the max."""
    a = LossStats(*[jnp.float32(i + 1) for i in range(len(LossStats.__dataclass_fields__))])
    b = a.replace(is_ratio_max=jnp.float32(100.0), residual_norm_max=jnp.float32(0.5))
    c = a.combine(b)
    assert float(c.is_ratio_sum) == 2 * float(a.is_ratio_sum)
    assert float(c.is_ratio_max) == 100.0 and float(c.residual_norm_max) == float(a.residual_norm_max)


@pytest.mark.parametrize("level", ["token", "sequence"])
def test_cispo_against_numpy(level):
    """CISPO's loss, capped flags and gradient in log pi against TRL's formula: every token keeps
    a gradient, -min(r, cap) A, including those the PPO clip would have stopped."""
    valid, logps, old, adv = random_ratios(4, 0.3)
    B, T = valid.shape
    cap = 1.2 if level == "token" else 1.05
    A = jnp.broadcast_to(adv[:, None], (B, T))

    def f(lp):
        loss, ratio, capped = cispo_policy_loss(lp, old, A, cap, level=level, valid=valid)
        return jnp.sum(jnp.where(valid, loss, 0.0)), (loss, ratio, capped)

    (_, (loss, ratio, capped)), grad = jax.jit(jax.value_and_grad(f, has_aux=True))(logps)
    want_loss, want_r, want_capped, want_d = np_cispo(logps.astype(np.float64),
                                                      old.astype(np.float64), adv, valid, cap,
                                                      level)
    np.testing.assert_allclose(np.where(valid, loss, 0), np.where(valid, want_loss, 0),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.where(valid, ratio, 0), np.where(valid, want_r, 0), rtol=1e-5)
    assert np.array_equal(np.asarray(capped) & valid, want_capped & valid)
    assert 0 < (want_capped & valid).sum() < valid.sum()
    np.testing.assert_allclose(np.asarray(grad), np.where(valid, want_d, 0), rtol=1e-5, atol=1e-7)
    assert (np.abs(np.asarray(grad))[valid & (np.abs(adv)[:, None] > 0)] > 0).all()
    with pytest.raises(ValueError, match="cispo_cap"):
        GRPOConfig(policy_loss="cispo", cispo_cap=1.0)
    with pytest.raises(ValueError, match="clip_ratio_max"):
        GRPOConfig(policy_loss="cispo", clip_ratio_max=3.0)
    with pytest.raises(ValueError, match="policy_loss"):
        GRPOConfig(policy_loss="ppo")


def test_dual_clip_bound_must_lie_above_the_upper_clip():
    """clip_ratio_max at or below 1 + clip_eps_high would cut into the clip range: refused."""
    assert GRPOConfig(clip_eps=0.2, clip_ratio_max=3.0).clip_ratio_max == 3.0
    for bad in (1.2, 1.0, 0.5):
        with pytest.raises(ValueError, match="clip_ratio_max"):
            GRPOConfig(clip_eps=0.2, clip_ratio_max=bad)
    with pytest.raises(ValueError, match="clip_ratio_max"):
        GRPOConfig(clip_eps=0.2, clip_eps_high=0.5, clip_ratio_max=1.4)
