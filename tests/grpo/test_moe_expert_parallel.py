"""Expert parallelism of a Qwen3 mixture-of-experts model on 8 forced host devices: the expert
stacks split on E over "fsdp" (each device holds E / fsdp experts), the tokens sent to their
experts by all-to-all (no expert kernel gathered), and the results those of one device: the
forward's logits and routing statistics, the ARCA-weighted GRPO loss and its adapter gradient
through the mesh train step, the sampler's greedy tokens and log-probs; E not divisible by
"fsdp" falls back to replicated experts with the same results."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from arca_jax import lora, parallel, qwen3, sampling
from arca_jax.grpo import GRPOConfig, TrainState, make_train_step
from arca_jax.qwen3 import moe
from fixtures import (grad_recorder, left_padded_batch, ragged_batch, random_adapter,
                      random_params, slow_except, tiny_moe_hf_config, trees_close)

FAST = {"xla_backend_optimization_level": 0}
# 8 experts of width 24, top-3 raw probabilities, layer 1 dense (mlp_only_layers): E splits over
# fsdp 8, 4 and 2
CFG = qwen3.Qwen3Config.from_hf(tiny_moe_hf_config(experts=8, top_k=3, norm_topk=False, layers=3,
                                                   mlp_only=(1,)))
# 6 experts: not divisible by fsdp 4 (replicated fallback), by fsdp 2 (split 3 per device)
CFG6 = qwen3.Qwen3Config.from_hf(tiny_moe_hf_config(experts=6, top_k=2, layers=2))
LCFG = lora.LoraConfig(rank=4, alpha=8.0, targets=qwen3.ATTN_PROJS)
MESHES = [(1, 8, 1), (2, 4, 1), (2, 2, 2)]  # (data, fsdp, tensor)
STACK = ("layers", "mlp", "experts", "gate_proj", "kernel")  # [Ls, E, D, I]

_forward = jax.jit(qwen3.forward, static_argnames=("config", "mesh"))


@pytest.fixture(scope="module")
def model():
    # scale 1: at scale 3 (2) float32 rounding alone moves the step's gradient by 2.4e-5 (2e-5)
    # relative L2 between one device and a mesh, the meshes without an exchange (data 8; data 2,
    # tensor 2) as much as the expert-parallel ones; at scale 1 all are ~1e-6
    params = random_params(CFG, seed=0, scale=1.0)
    tree = random_adapter(CFG, LCFG, seed=1, scale=0.3)
    return params, tree, ragged_batch(CFG.vocab_size, B=8, T=10)


def _leaf(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def _spec(x) -> tuple:
    """An array's PartitionSpec as a tuple without trailing Nones."""
    spec = tuple(x.sharding.spec)
    while spec and spec[-1] is None:
        spec = spec[:-1]
    return spec


def _exchanges(hlo: str, rows: int, shape, config=CFG) -> int:
    """The all-to-alls in a compiled program that carry `moe.expert_parallel`'s [1, cap, D]
    chunks (XLA:CPU's dense exchange) for `rows` token rows on a (data, fsdp, tensor) mesh.
    (Without expert parallelism GSPMD partitions the grouped matmul itself, over the tokens,
    also without gathering expert kernels, so that alone does not show the exchange.)"""
    data, fsdp, _ = shape
    m = -(-rows // (data * fsdp))
    cap = m * min(config.num_experts_per_tok, config.num_experts // fsdp)
    chunk = f"f32[1,{cap},{config.hidden_size}]"
    return sum(1 for line in hlo.splitlines() if "all-to-all(" in line and chunk in line)


def _expert_gathers(hlo: str, E: int) -> list:
    """The all-gathers in a compiled program whose result holds E experts' [E, D, .] kernels."""
    return [line for line in hlo.splitlines() if "all-gather(" in line
            and re.search(rf"\[(\d+,)?{E},{CFG.hidden_size},", line)]


# ------------------------------------------ layouts -------------------------------------------


@pytest.mark.parametrize("shape", MESHES)
def test_expert_stacks_split_on_experts(model, shape):
    """Each device holds E / fsdp experts of every sparse layer, in training and sampling."""
    params, _, _ = model
    mesh = parallel.make_mesh(*shape)
    F, E = shape[1], CFG.num_experts
    placed = parallel.shard_params(params, mesh)
    for proj in ("gate_proj", "up_proj", "down_proj"):
        arr = placed["layers"]["mlp"]["experts"][proj]["kernel"]  # [Ls, E, in, out]
        assert _spec(arr) == (None, "fsdp")
        assert {s.data.shape[1] for s in arr.addressable_shards} == {E // F}
    weights = sampling.prepare_weights_jit(params, CFG, mesh=mesh)
    for layer in (weights.layers[0], weights.layers[2]):  # the sparse layers
        for arr in (layer.sparse_mlp.gate_up, layer.sparse_mlp.down):  # [E, ., .]
            assert {s.data.shape[0] for s in arr.addressable_shards} == {E // F}
    assert weights.layers[1].sparse_mlp is None and weights.mesh is mesh


def test_expert_shards_and_fallback():
    assert moe.expert_shards(8, parallel.make_mesh(1, 8, 1)) == 8
    assert moe.expert_shards(8, parallel.make_mesh(2, 2, 2)) == 2
    assert moe.expert_shards(6, parallel.make_mesh(2, 4, 1)) == 1  # replicated
    assert moe.expert_shards(6, parallel.make_mesh(4, 2, 1)) == 2
    assert moe.expert_shards(8, None) == 1
    spec = parallel.param_partition_spec(list(STACK), (2, 6, 32, 24), 4)
    assert spec == P()


# ------------------------------------------ forward -------------------------------------------


@pytest.mark.parametrize("shape", MESHES + [(4, 2, 1)])
def test_forward_equals_one_device_by_all_to_all(model, shape):
    """Logits and routing statistics as on one device; the compiled program exchanges tokens
    (all-to-all) and gathers no expert kernel."""
    params, _, batch = model
    mesh = parallel.make_mesh(*shape)
    kw = dict(config=CFG, attention_mask=batch.attention_mask)
    one = _forward(params, batch.input_ids, **kw)
    placed = parallel.shard_params(params, mesh)
    out = _forward(placed, batch.input_ids, mesh=mesh, **kw)
    for a, b in ((out.logits, one.logits), (out.expert_load, one.expert_load),
                 (out.aux_loss, one.aux_loss)):
        trees_close(a, b)
    hlo = _forward.lower(placed, batch.input_ids, mesh=mesh, **kw).compile().as_text()
    assert _exchanges(hlo, batch.input_ids.size, shape) >= 2  # there and back, per sparse layer
    assert _expert_gathers(hlo, CFG.num_experts) == []


@pytest.mark.parametrize("shape", [(2, 4, 1), (4, 2, 1)])
def test_forward_when_fsdp_does_not_divide_experts(shape):
    """6 experts: over fsdp 2, 3 per device; over fsdp 4, replicated (no exchange)."""
    params = random_params(CFG6, seed=4, scale=3.0)
    batch = ragged_batch(CFG6.vocab_size, B=8, T=6)
    mesh = parallel.make_mesh(*shape)
    kw = dict(config=CFG6, attention_mask=batch.attention_mask)
    one = _forward(params, batch.input_ids, **kw)
    placed = parallel.shard_params(params, mesh)
    split = moe.expert_shards(6, mesh) > 1
    assert _spec(_leaf(placed, STACK)) == ((None, "fsdp") if split else ())
    trees_close(_forward(placed, batch.input_ids, mesh=mesh, **kw).logits, one.logits)
    hlo = _forward.lower(placed, batch.input_ids, mesh=mesh, **kw).compile().as_text()
    assert (_exchanges(hlo, batch.input_ids.size, shape, CFG6) > 0) == split


def test_rows_not_divisible_by_devices(model):
    """B T = 3 x 5 rows over 8 devices: padded for the exchange, the padding dropped."""
    params, _, batch = model
    mesh = parallel.make_mesh(1, 8, 1)
    ids, mask = batch.input_ids[:3, :5], batch.attention_mask[:3, :5]
    one = _forward(params, ids, config=CFG, attention_mask=mask)
    out = _forward(parallel.shard_params(params, mesh), ids, config=CFG, attention_mask=mask,
                   mesh=mesh)
    trees_close(out.logits, one.logits)
    trees_close(out.expert_load, one.expert_load)


# ------------------------------------------ train step ----------------------------------------


def _step(params, tree, batch, **kw):
    g = GRPOConfig(weighting="arca", sharpening=2.0, router_aux_loss_coef=0.3)
    opt = grad_recorder()
    step = make_train_step(CFG, g, opt, lora_scale=LCFG.scaling, donate=False,
                           compiler_options=FAST, **kw)
    state, metrics = step(TrainState.create(jax.tree_util.tree_map(jnp.array, tree), opt,
                                            jax.random.PRNGKey(0)), params, batch)
    return metrics, state.opt_state, step


@pytest.mark.parametrize("shape", slow_except(MESHES))
def test_train_step_equals_one_device(model, shape):
    """The ARCA-weighted GRPO loss (with the load-balancing term), its adapter gradient and the
    routing metrics of the mesh step (policy and base forwards expert-parallel) equal one
    device's within 1e-5."""
    params, tree, batch = model
    one, g1, _ = _step(params, tree, batch)
    mesh = parallel.make_mesh(*shape)
    got, gm, step = _step(parallel.shard_params(params, mesh), tree, batch, mode="mesh", mesh=mesh)
    for a, b in ((got.loss, one.loss), (got.aux_loss, one.aux_loss),
                 (got.expert_load, one.expert_load)):
        trees_close(a, b)
    assert np.linalg.norm(np.asarray(jax.tree_util.tree_leaves(g1)[0])) > 0
    trees_close(gm, g1)
    state = TrainState.create(tree, grad_recorder(), jax.random.PRNGKey(0))
    hlo = step.jitted.lower(parallel.shard_lora(state, mesh, CFG.num_key_value_heads),
                            parallel.shard_params(params, mesh),
                            parallel.shard_batch(batch, mesh)).compile().as_text()
    assert _exchanges(hlo, batch.input_ids.size, shape) >= 2
    assert _expert_gathers(hlo, CFG.num_experts) == []


# ------------------------------------------ sampler -------------------------------------------


@pytest.mark.parametrize("shape", slow_except(MESHES))
def test_sampler_equals_one_device(model, shape):
    """Greedy tokens and log-probs of the sampler on the mesh (prefill and decode steps
    expert-parallel) equal one device's."""
    params, tree, _ = model
    ids, mask = left_padded_batch(CFG.vocab_size, lengths=[6, 3, 5, 1, 6, 2, 4, 6], total=6,
                                  seed=3)
    kw = dict(config=CFG, rng=jax.random.PRNGKey(0), max_new_tokens=8, greedy=True, lora=tree,
              lora_scale=LCFG.scaling)
    mesh = parallel.make_mesh(*shape)
    one = sampling.generate(params, ids, mask, **kw)
    out = sampling.generate(params, ids, mask, mesh=mesh, **kw)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(one.tokens))
    np.testing.assert_allclose(np.asarray(out.logps), np.asarray(one.logps), atol=1e-5)
    # a decode step exchanges tokens and gathers no expert kernel
    weights = sampling.prepare_weights_jit(params, CFG, lora=tree, lora_scale=LCFG.scaling,
                                           mesh=mesh)
    B = ids.shape[0]
    step = jax.jit(qwen3.inference_forward, static_argnames="config")
    hlo = step.lower(weights, jnp.ones((B, 1), jnp.int32), config=CFG,
                     positions=jnp.zeros((B, 1), jnp.int32),
                     attention_mask=jnp.ones((B, 1), jnp.int32),
                     cache=qwen3.KVCache.init(CFG, B, 8, transposed_keys=qwen3.transposed_keys(
                         weights.decode_attention))).compile().as_text()
    assert _exchanges(hlo, B, shape) >= 2
    assert _expert_gathers(hlo, CFG.num_experts) == []
