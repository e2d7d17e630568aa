"""The jitted train step: single device vs pmap vs mesh (8 forced host devices), gradient
accumulation, the non-finite skip, the learning-rate metric and the dropout key."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from arca_jax import lora
from arca_jax.grpo import (GRPOConfig, StepMetrics, TrainState, loss_fn, make_mesh,
                           make_optimizer, make_train_step, param_partition_spec, replicate,
                           shard_params, unreplicate)
from fixtures import grad_recorder, ragged_batch, random_adapter, random_params, tiny_config

FAST = {"xla_backend_optimization_level": 0}
# vocab 60: divisible by fsdp = 4 but not by 8; tied embeddings
CFG = tiny_config(vocab_size=60, tie_word_embeddings=True)
LCFG = lora.LoraConfig(rank=4, alpha=8.0)


@pytest.fixture(scope="module")
def model():
    @jax.jit
    def init():
        params = random_params(CFG, seed=0, scale=2.0)
        tree = random_adapter(CFG, LCFG, seed=1, scale=0.2)
        return params, tree

    params, tree = init()
    batch = ragged_batch(CFG.vocab_size)
    return params, tree, batch


def _copy(tree):
    return jax.tree_util.tree_map(jnp.array, tree)  # fresh buffers (the step donates its state)


def _max_diff(a, b):
    """Largest per-leaf relative L2 difference."""
    return max(float(jnp.linalg.norm(x - y) / jnp.maximum(jnp.linalg.norm(y), 1e-30))
               for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))



def test_jit_pmap_mesh_agree(model):
    """Same loss, gradients (SGD with lr 1: the update is -grad) and updated LoRA in all modes;
    arca with a KL term, so both forwards and all statistics are exercised."""
    params, tree, batch = model
    assert jax.device_count() == 8
    g = GRPOConfig(weighting="arca", sharpening=2.0, kl_beta=0.05)
    opt = grad_recorder()
    grads = jax.jit(jax.grad(lambda t: loss_fn(t, params, batch, config=CFG,
                                               lora_scale=LCFG.scaling, grpo_config=g)[0]),
                    compiler_options=FAST)(tree)

    out = {}
    step = make_train_step(CFG, g, opt, lora_scale=LCFG.scaling, mode="jit",
                           compiler_options=FAST)
    s, m = step(TrainState.create(_copy(tree), opt, jax.random.PRNGKey(3)), params, batch)
    out["jit"] = (s.lora, m, s.opt_state)
    assert isinstance(m, StepMetrics) and isinstance(m.loss, jax.Array)
    assert int(s.step) == 1 and int(m.skipped) == 0

    step = make_train_step(CFG, g, opt, lora_scale=LCFG.scaling, mode="pmap", microbatches=2)
    s, m = step(replicate(TrainState.create(_copy(tree), opt, jax.random.PRNGKey(3))),
                replicate(params), batch)
    assert s.step.shape == (8,)
    out["pmap"] = (unreplicate(s.lora), m, unreplicate(s.opt_state))

    mesh = make_mesh(data=2, fsdp=4)
    sp = shard_params(params, mesh)
    emb = sp["embed_tokens"]["embedding"]
    assert emb.sharding.spec == jax.sharding.PartitionSpec("fsdp", None)  # V = 60 over 4
    # microbatches=2 on pmap and mesh: accumulation under sharding is part of the comparison
    step = make_train_step(CFG, g, opt, lora_scale=LCFG.scaling, mode="mesh", mesh=mesh,
                           microbatches=2, compiler_options=FAST)
    s, m = step(TrainState.create(_copy(tree), opt, jax.random.PRNGKey(3)), sp, batch)
    out["mesh"] = (s.lora, m, s.opt_state)

    # gradients (the recorder's state) and updated adapters, relative L2 error per leaf
    assert _max_diff(out["jit"][2], grads) < 1e-5
    ref_m = out["jit"][1]
    for mode in ("pmap", "mesh"):
        lora_new, m, g_mode = out[mode]
        assert _max_diff(lora_new, out["jit"][0]) < 1e-5, mode
        assert _max_diff(g_mode, out["jit"][2]) < 1e-5, mode
        for field in ("loss", "grad_norm", "weight_gini", "effective_token_ratio", "kl",
                      "residual_norm_mean", "residual_norm_max", "entropy", "completion_length",
                      "clip_fraction"):
            a, b = float(getattr(m, field)), float(getattr(ref_m, field))
            assert abs(a - b) <= 1e-5 * max(1.0, abs(b)), (mode, field, a, b)
    assert float(ref_m.kl) > 0 and float(ref_m.residual_norm_max) > 0
    assert 0 < float(ref_m.weight_gini) < 1


def test_partition_specs_replicate_indivisible_dims():
    P = jax.sharding.PartitionSpec
    assert param_partition_spec(["embed_tokens", "embedding"], (60, 32), 4) == P("fsdp", None)
    assert param_partition_spec(["embed_tokens", "embedding"], (61, 32), 4) == P(None, "fsdp")
    assert param_partition_spec(["embed_tokens", "embedding"], (61, 30), 4) == P()
    assert param_partition_spec(["lm_head", "kernel"], (32, 64), 8) == P(None, "fsdp")
    assert param_partition_spec(["lm_head", "kernel"], (32, 60), 8) == P("fsdp", None)
    kern = ["layers", "mlp", "down_proj", "kernel"]
    assert param_partition_spec(kern, (2, 48, 32), 8) == P(None, "fsdp", None)
    assert param_partition_spec(kern, (2, 45, 32), 8) == P(None, None, "fsdp")
    assert param_partition_spec(kern, (2, 45, 30), 8) == P()
    assert param_partition_spec(["layers", "input_layernorm", "scale"], (2, 32), 4) == P()


@pytest.fixture(scope="module")
def token_mean_steps():
    g = GRPOConfig(weighting="surprisal", loss_aggregation="token_mean", kl_beta=0.02)
    opt = make_optimizer(1e-2, warmup_steps=1, total_steps=10)
    one = make_train_step(CFG, g, opt, lora_scale=LCFG.scaling, compiler_options=FAST)
    four = make_train_step(CFG, g, opt, lora_scale=LCFG.scaling, microbatches=4,
                           compiler_options=FAST)
    return opt, one, four


def test_accumulation_equals_large_batch_and_lr_metric(model, token_mean_steps):
    """token_mean is the aggregation where per-microbatch means would differ: the global
    normaliser makes 4 microbatches equal one batch. Two AdamW steps (warmup: lr 0, then 1e-2)."""
    params, tree, batch = model
    opt, one, four = token_mean_steps
    res = {}
    for name, step in (("one", one), ("four", four)):
        s = TrainState.create(_copy(tree), opt, jax.random.PRNGKey(0))
        lrs, losses = [], []
        for _ in range(2):
            s, m = step(s, params, batch)
            lrs.append(float(m.learning_rate))
            losses.append(float(m.loss))
        res[name] = (s, lrs, losses, m)
    (s1, lr1, l1, m1), (s4, lr4, l4, m4) = res["one"], res["four"]
    assert lr1 == lr4 and lr1[0] == 0.0 and abs(lr1[1] - 1e-2) < 1e-9
    np.testing.assert_allclose(l1, l4, rtol=1e-5)
    assert _max_diff(s1.lora, s4.lora) < 1e-5
    assert _max_diff(s1.lora, tree) > 1e-3  # the second step moved the adapter
    # Adam's first moment (the gradient, as lr was 0 at step 1 and the params unchanged)
    mu1, mu4 = (optax.tree_utils.tree_get(x.opt_state, "mu") for x in (s1, s4))
    assert _max_diff(mu4, mu1) < 1e-5
    for field in ("grad_norm", "weight_gini", "effective_token_ratio", "kl", "entropy"):
        np.testing.assert_allclose(float(getattr(m1, field)), float(getattr(m4, field)),
                                   rtol=1e-5, atol=1e-7)
    assert int(s1.step) == 2


def test_non_finite_gradient_skips_update(model, token_mean_steps):
    params, tree, batch = model
    opt, one, _ = token_mean_steps
    s = TrainState.create(_copy(tree), opt, jax.random.PRNGKey(0))
    s, _ = one(s, params, batch)  # one good step first: opt_state and step are non-trivial
    before = jax.tree_util.tree_map(np.asarray, s)
    bad = batch.replace(advantages=batch.advantages.at[3].set(jnp.nan))
    s, m = one(s, params, bad)
    assert int(m.skipped) == 1 and int(m.skipped_steps) == 1
    assert not np.isfinite(float(m.grad_norm))
    after = jax.tree_util.tree_map(np.asarray, s)
    assert int(after.skipped_steps) == 1 and int(after.step) == int(before.step) == 1
    for a, b in zip(jax.tree_util.tree_leaves(after.replace(skipped_steps=0)),
                    jax.tree_util.tree_leaves(before.replace(skipped_steps=0))):
        np.testing.assert_array_equal(a, b)
    s, m = one(s, params, batch)  # training continues
    assert int(m.skipped) == 0 and int(s.step) == 2 and int(s.skipped_steps) == 1


def test_dropout_key_is_fold_in_of_rng_and_step(model):
    params, tree, batch = model
    g = GRPOConfig(weighting="uniform")
    opt = grad_recorder()
    step = make_train_step(CFG, g, opt, lora_scale=LCFG.scaling, lora_dropout=0.3,
                           compiler_options=FAST)
    rng = jax.random.PRNGKey(42)
    s = TrainState.create(_copy(tree), opt, rng)
    s = s.replace(step=jnp.asarray(5, jnp.int32))
    f = jax.jit(jax.value_and_grad(lambda t, k: loss_fn(t, params, batch, config=CFG,
                                                        lora_scale=LCFG.scaling, grpo_config=g,
                                                        lora_dropout=0.3, rng=k)[0]),
                compiler_options=FAST)
    loss5, grads5 = f(tree, jax.random.fold_in(rng, 5))
    loss6, _ = f(tree, jax.random.fold_in(rng, 6))
    s, m = step(s, params, batch)
    assert abs(float(m.loss) - float(loss5)) < 1e-6 and float(loss5) != float(loss6)
    assert _max_diff(s.opt_state, grads5) < 1e-5
