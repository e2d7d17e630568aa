"""Settings that reproduce the reference implementation: bfloat16 logits, EOS outside the loss,
Dr. GRPO's constant L, old log-probs from the training forward."""

import dataclasses

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from arca_jax import config, lora, qwen3, sampling, trainer
from arca_jax.batch import build_batch
from arca_jax.grpo import (Batch, GRPOConfig, loss_fn, policy_logprobs, raw_normalizer,
                           token_logprobs)
from arca_jax.grpo.signals import completion_valid
from fixtures import random_adapter, random_params, tiny_config

CFG = tiny_config()


@pytest.fixture(scope="module")
def model():
    params = random_params(CFG, seed=0, scale=6.0)  # |logits| ~ 10
    tree = random_adapter(CFG, lora.LoraConfig(rank=4, alpha=8.0), seed=1, scale=0.2)
    rng = np.random.default_rng(0)
    B, T = 4, 10
    ids = rng.integers(1, CFG.vocab_size, (B, T)).astype(np.int32)
    cm = np.zeros((B, T), np.int32)
    for b, n in enumerate([5, 3, 6, 1]):
        cm[b, 4:4 + n] = 1
    batch = Batch(input_ids=jnp.asarray(ids), attention_mask=jnp.ones((B, T), jnp.int32),
                  completion_mask=jnp.asarray(cm),
                  advantages=jnp.asarray(rng.normal(size=B), jnp.float32))
    return params, tree, batch


def _np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_logits_dtype_rounds_before_log_softmax(model, dtype):
    params, _, batch = model
    h = qwen3.forward(params, batch.input_ids, config=CFG).hidden
    targets = jnp.roll(batch.input_ids, -1, axis=1)
    lp, ent = token_logprobs(params, h, targets, config=CFG, chunk_size=4, logits_dtype=dtype)
    logits = np.einsum("btd,dv->btv", np.asarray(h, np.float64),
                       np.asarray(params["lm_head"]["kernel"], np.float64))
    if dtype == "bfloat16":  # the oracle: round the float32 logits to bfloat16, then float64 math
        logits = logits.astype(np.float32).astype(ml_dtypes.bfloat16).astype(np.float64)
    ls = _np_log_softmax(logits)
    want = np.take_along_axis(ls, np.asarray(targets)[..., None], -1)[..., 0]
    np.testing.assert_allclose(np.asarray(lp), want, atol=2e-5 if dtype == "float32" else 1e-3)
    np.testing.assert_allclose(np.asarray(ent), -(np.exp(ls) * ls).sum(-1), atol=1e-3)
    if dtype == "bfloat16":  # and it is really different from float32 logits
        lp32, _ = token_logprobs(params, h, targets, config=CFG, chunk_size=4)
        assert np.abs(np.asarray(lp32) - np.asarray(lp)).max() > 1e-3


def test_logits_dtype_reaches_every_salience(model):
    """Surprisal and divergence weights change with bfloat16 logits; ARCA's do not read logits."""
    params, tree, batch = model
    from arca_jax.grpo import all_method_weights

    w = {d: all_method_weights(tree, params, batch, config=CFG, lora_scale=2.0,
                               grpo_config=GRPOConfig(logits_dtype=d))
         for d in ("float32", "bfloat16")}
    for m in ("surprisal", "entropy_reduction", "divergence"):
        assert np.abs(np.asarray(w["float32"][m]) - np.asarray(w["bfloat16"][m])).max() > 1e-4, m
    np.testing.assert_array_equal(np.asarray(w["float32"]["arca"]), np.asarray(w["bfloat16"]["arca"]))
    with pytest.raises(ValueError, match="logits_dtype"):
        GRPOConfig(logits_dtype="float16")


def _sample_output(tokens, mask):
    tokens = jnp.asarray(tokens, jnp.int32)
    mask = jnp.asarray(mask, jnp.int32)
    return sampling.SampleOutput(tokens=tokens, mask=mask,
                                 logps=-jnp.arange(1, tokens.size + 1, dtype=jnp.float32
                                                   ).reshape(tokens.shape) * mask,
                                 lengths=mask.sum(-1), finished=jnp.array([True, False]),
                                 num_steps=jnp.int32(3))


def test_build_batch_masks_eos_out_of_the_loss_only():
    eos = 7
    out = _sample_output([[5, 6, eos], [4, 4, 4]], [[1, 1, 1], [1, 1, 1]])
    pid, pmask = jnp.array([[1, 2], [0, 3]]), jnp.array([[1, 1], [0, 1]])
    kept = build_batch(pid, pmask, out)
    masked = build_batch(pid, pmask, out, mask_tokens=(eos,))
    np.testing.assert_array_equal(kept.completion_mask, [[0, 0, 1, 1, 1], [0, 0, 1, 1, 1]])
    np.testing.assert_array_equal(masked.completion_mask, [[0, 0, 1, 1, 0], [0, 0, 1, 1, 1]])
    np.testing.assert_array_equal(masked.attention_mask, kept.attention_mask)  # still attended
    assert float(masked.sample_logps[0, 4]) == 0.0 and float(kept.sample_logps[0, 4]) == -3.0


@pytest.mark.parametrize("rule,pad,want", [("train", 0, ()), ("mask", 0, (2,)),
                                           ("mask_if_pad", 0, ()), ("mask_if_pad", 2, (2,))])
def test_eos_rule_follows_the_pad_token(rule, pad, want):
    cfg = config.load(None, [f"rollout.eos_token={rule}"])
    model = trainer.Model(config=None, params=None, tokenizer=None, eos_id=2, pad_id=pad)
    assert trainer.rollout_mod.masked_tokens(cfg, model) == want


def test_dr_grpo_normaliser_is_the_generation_budget(model):
    _, _, batch = model
    cfg = config.load(None, ["grpo.loss_aggregation=dr_grpo", "rollout.max_new_tokens=37"])
    g = trainer.objective_config(cfg)
    assert g.max_completion_length == 37
    B = batch.input_ids.shape[0]
    assert float(raw_normalizer(completion_valid(batch), g)) == B * 37  # not B * T (T = 10)
    pinned = config.load(None, ["grpo.loss_aggregation=dr_grpo", "grpo.max_completion_length=5"])
    assert trainer.objective_config(pinned).max_completion_length == 5


def test_old_logps_from_the_training_forward_give_ratio_one(model):
    """With old_logps = policy_logprobs (the training forward, no dropout), the clipped
    surrogate's gradient at the first update equals the on-policy gradient and nothing is
    clipped."""
    params, tree, batch = model
    g = GRPOConfig(weighting="arca", num_iterations=2, clip_eps=0.2)
    old = policy_logprobs(tree, params, batch, config=CFG, lora_scale=2.0, grpo_config=g)
    grad = jax.grad(lambda t, b, gc: loss_fn(t, params, b, config=CFG, lora_scale=2.0,
                                            grpo_config=gc)[0])
    g_ppo = grad(tree, batch.replace(old_logps=old), g)
    g_on = grad(tree, batch, dataclasses.replace(g, num_iterations=1))
    for a, b in zip(jax.tree_util.tree_leaves(g_ppo), jax.tree_util.tree_leaves(g_on)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-4)
    _, stats = loss_fn(tree, params, batch.replace(old_logps=old), config=CFG, lora_scale=2.0,
                       grpo_config=g)
    assert float(stats.clip_count) == 0.0
