"""Tensor parallelism on 8 forced host devices: the ("data", "fsdp", "tensor") meshes give the
single-device train step (loss, gradients, metrics, for every weighting) and the single-device
sampler (tokens, log-probs), with the layouts `arca_jax.parallel` documents and no gathering of
adapters, vocabulary-sized logits or kernels over "tensor"."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from arca_jax import credit, lora, parallel, qwen3, sampling
from arca_jax.grpo import GRPOConfig, TrainState, loss_fn, make_train_step
from fixtures import (grad_recorder, left_padded_batch, ragged_batch, random_adapter, random_params,
                      slow_except, tiny_config, trees_close)

FAST = {"xla_backend_optimization_level": 0}
# N = 4 query heads over K = 2 kv heads: tensor 2 splits kv heads, tensor 4 copies them; vocab 64
# and intermediate 48 split over 2 and 4 (vocabulary-parallel head)
CFG = tiny_config(vocab_size=64)
LCFG = lora.LoraConfig(rank=4, alpha=8.0)
MESHES = [(2, 2, 2), (1, 1, 4), (1, 4, 2)]  # (data, fsdp, tensor)
KV = CFG.num_key_value_heads


@pytest.fixture(scope="module")
def model():
    params = random_params(CFG, seed=0, scale=2.0)
    tree = random_adapter(CFG, LCFG, seed=1, scale=0.2)
    batch = ragged_batch(CFG.vocab_size)
    return params, tree, batch


def _copy(tree):
    return jax.tree_util.tree_map(jnp.array, tree)


# Entropy reduction weights tokens by H_base - H_adapted, a difference of nearly equal entropies
# under a small adapter: float32 rounding is amplified by H / |dH|. Its statistics and gradients
# move by 1.7e-4 (relative L2) between two single-device compilations of the same program (XLA
# optimisation level 0 against the default), so that is its bar, not 1e-5.
TOLERANCE = {"entropy_reduction": 1e-3}



def _spec(x) -> tuple:
    """An array's PartitionSpec as a tuple without trailing Nones (P(a, None) == P(a))."""
    spec = tuple(x.sharding.spec)
    while spec and spec[-1] is None:
        spec = spec[:-1]
    return spec


def _collectives(hlo: str, op: str) -> list:
    return re.findall(rf"^\s*\S+ = (\S+) {op}\(", hlo, re.M)


# ------------------------------------------ layouts -------------------------------------------


def test_make_mesh_axes_sizes_and_errors():
    mesh = parallel.make_mesh(data=2, fsdp=2, tensor=2)
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert dict(parallel.make_mesh(tensor=4).shape) == {"data": 1, "fsdp": 2, "tensor": 4}
    # process-major on CPU: the tensor axis is innermost (consecutive devices)
    ids = np.vectorize(lambda d: d.id)(mesh.devices)
    assert ids.reshape(-1).tolist() == sorted(d.id for d in jax.devices())
    with pytest.raises(ValueError, match="needs 16 devices"):
        parallel.make_mesh(data=2, fsdp=4, tensor=2)
    with pytest.raises(ValueError, match="tensor must be a positive int"):
        parallel.make_mesh(tensor=0)


def test_check_tensor_refuses_uneven_splits():
    parallel.check_tensor(CFG, 2)
    parallel.check_tensor(CFG, 4)  # K = 2 < 4: kv heads copied
    with pytest.raises(ValueError, match="num_attention_heads 4"):
        parallel.check_tensor(CFG, 8)
    with pytest.raises(ValueError, match="num_key_value_heads 3"):
        parallel.check_tensor(tiny_config(num_attention_heads=6, num_key_value_heads=3,
                                          intermediate_size=48), 2)


def test_partition_specs_follow_megatron_layout():
    spec = parallel.param_partition_spec
    col = ["layers", "self_attn", "q_proj", "kernel"]
    row = ["layers", "mlp", "down_proj", "kernel"]
    kv = ["layers", "self_attn", "k_proj", "kernel"]
    assert spec(col, (2, 32, 32), 1, 2) == P(None, None, "tensor")
    assert spec(col, (2, 32, 32), 4, 2) == P(None, "fsdp", "tensor")
    assert spec(row, (2, 48, 32), 4, 2) == P(None, "tensor", "fsdp")
    assert spec(kv, (2, 32, 16), 1, 2, kv_heads=2) == P(None, None, "tensor")
    assert spec(kv, (2, 32, 16), 1, 4, kv_heads=2) == P()  # K < tensor: replicated
    assert spec(["embed_tokens", "embedding"], (64, 32), 4, 2) == P("tensor", "fsdp")
    assert spec(["lm_head", "kernel"], (32, 64), 4, 2) == P("fsdp", "tensor")
    assert spec(["lm_head", "kernel"], (32, 61), 1, 2) == P()  # V indivisible: replicated
    assert spec(["layers", "input_layernorm", "scale"], (2, 32), 4, 2) == P()
    lspec = parallel.lora_partition_spec
    assert lspec(["layers", "self_attn", "q_proj", "lora_b"], (2, 4, 32), 2) == P(None, None, "tensor")
    assert lspec(["layers", "self_attn", "q_proj", "lora_a"], (2, 32, 4), 2) == P()
    assert lspec(["layers", "self_attn", "o_proj", "lora_a"], (2, 32, 4), 2) == P(None, "tensor", None)
    assert lspec(["layers", "self_attn", "o_proj", "lora_b"], (2, 4, 32), 2) == P()
    assert lspec(["layers", "self_attn", "v_proj", "lora_b"], (2, 4, 16), 4, kv_heads=2) == P()


def test_state_shardings_cover_optimizer_moments(model):
    _, tree, _ = model
    mesh = parallel.make_mesh(data=4, fsdp=1, tensor=2)
    opt = optax.adamw(1e-3)
    state = parallel.shard_lora(TrainState.create(_copy(tree), opt, jax.random.PRNGKey(0)), mesh,
                                KV)
    mu = state.opt_state[0].mu
    assert _spec(mu["layers"]["mlp"]["up_proj"]["lora_b"]) == (None, None, "tensor")
    assert _spec(mu["layers"]["mlp"]["down_proj"]["lora_a"]) == (None, "tensor")
    assert _spec(state.lora["layers"]["mlp"]["down_proj"]["lora_b"]) == ()
    assert _spec(state.step) == ()


# ------------------------------------------ train step ----------------------------------------


@pytest.fixture(scope="module")
def single_device_step(model):
    params, tree, batch = model
    g = GRPOConfig(weighting="arca", sharpening=2.0, kl_beta=0.05)
    opt = grad_recorder()
    step = make_train_step(CFG, g, opt, lora_scale=LCFG.scaling, compiler_options=FAST)
    s, m = step(TrainState.create(_copy(tree), opt, jax.random.PRNGKey(3)), params, batch)
    return g, opt, s, m


@pytest.mark.parametrize("shape", slow_except(MESHES))
def test_train_step_equals_single_device(model, single_device_step, shape):
    """ARCA with a KL term (both forwards, every statistic), two microbatches: the same loss,
    gradients (the recorder's state), updated adapter and metrics; the state keeps its layout."""
    params, tree, batch = model
    g, opt, ref_state, ref = single_device_step
    mesh = parallel.make_mesh(*shape)
    step = make_train_step(CFG, g, opt, lora_scale=LCFG.scaling, mode="mesh", mesh=mesh,
                           microbatches=2, compiler_options=FAST)
    state = parallel.shard_lora(TrainState.create(_copy(tree), opt, jax.random.PRNGKey(3)), mesh,
                                KV)
    specs = jax.tree_util.tree_map(lambda x: x.sharding, state)
    s, m = step(state, parallel.shard_params(params, mesh), batch)
    trees_close(s.opt_state, ref_state.opt_state)
    trees_close(s.lora, ref_state.lora)
    for field in ("loss", "grad_norm", "weight_gini", "effective_token_ratio", "kl",
                  "residual_norm_mean", "residual_norm_max", "entropy", "completion_length",
                  "clip_fraction"):
        trees_close(getattr(m, field), getattr(ref, field))
    assert float(ref.residual_norm_max) > 0 and float(ref.kl) > 0
    assert all(a.sharding.is_equivalent_to(b, a.ndim) for a, b in
               zip(jax.tree_util.tree_leaves(s), jax.tree_util.tree_leaves(specs)))


def _all_weightings(tree, params, batch):
    """{weighting: (loss, LossStats, gradient)} for every registered weighting, with a KL term."""
    out = {}
    for name in credit.registered():
        g = GRPOConfig(weighting=name, kl_beta=0.02)
        (loss, stats), grads = jax.value_and_grad(
            lambda t: loss_fn(t, params, batch, config=CFG, lora_scale=LCFG.scaling, grpo_config=g),
            has_aux=True)(tree)
        out[name] = (loss, stats, grads)
    return out


@pytest.fixture(scope="module")
def all_weightings_ref(model):
    params, tree, batch = model
    return jax.jit(_all_weightings, compiler_options=FAST)(tree, params, batch)


@pytest.mark.parametrize("shape", slow_except(MESHES))
def test_every_weighting_equals_single_device(model, all_weightings_ref, shape):
    """Loss, gradient and statistics of every registered weighting on each mesh (one program)
    against the same program on one device."""
    params, tree, batch = model
    mesh = parallel.make_mesh(*shape)
    got = jax.jit(_all_weightings, compiler_options=FAST)(
        parallel.shard_lora(tree, mesh, KV), parallel.shard_params(params, mesh),
        parallel.shard_batch(batch, mesh))
    assert set(got) == set(credit.registered()) and len(got) >= 5
    for name in got:
        trees_close(got[name], all_weightings_ref[name], TOLERANCE.get(name, 1e-5))
    assert float(all_weightings_ref["arca"][1].residual_norm_max) > 0


def test_step_on_tensor_mesh_gathers_no_adapter_and_no_vocabulary(model):
    """tensor 2 (kv heads split): the compiled step holds no all-gather at all (adapters and
    kernels are used in place; the log-softmax over the split vocabulary all-reduces [B, C]
    values), and every all-reduce is of activations or per-token values, none [B, T, V]."""
    params, tree, batch = model
    mesh = parallel.make_mesh(data=1, fsdp=1, tensor=2)
    opt = optax.sgd(1.0)
    step = make_train_step(CFG, GRPOConfig(weighting="arca"), opt, lora_scale=LCFG.scaling,
                           mode="mesh", mesh=mesh, compiler_options=FAST)
    state = parallel.shard_lora(TrainState.create(_copy(tree), opt, jax.random.PRNGKey(0)), mesh,
                                KV)
    hlo = step.jitted.lower(state, parallel.shard_params(params, mesh),
                            parallel.shard_batch(batch, mesh)).compile().as_text()
    assert _collectives(hlo, "all-gather") == []
    reduces = _collectives(hlo, "all-reduce")
    assert reduces
    assert not any(re.search(rf"\b{CFG.vocab_size}\]", r) for r in reduces), reduces


# ------------------------------------------- sampler ------------------------------------------


@pytest.fixture(scope="module")
def prompts():
    return left_padded_batch(CFG.vocab_size, [3, 5, 7, 2, 6, 4, 5, 7], 7, seed=0)


@pytest.mark.parametrize("shape,merge", slow_except(
    [(MESHES[0], False), (MESHES[1], True), (MESHES[2], False)], unpack=True))
def test_sampler_equals_single_device(model, prompts, shape, merge):
    """Greedy and sampled (top-k) tokens equal, log-probs within 1e-5; the adapter low-rank or
    merged into the split kernels."""
    params, tree, _ = model
    ids, mask = prompts
    mesh = parallel.make_mesh(*shape)
    for kw in (dict(greedy=True), dict(temperature=1.0, top_k=20)):
        gen = dict(config=CFG, rng=jax.random.PRNGKey(7), max_new_tokens=9, lora_scale=LCFG.scaling,
                   merge_lora=merge, **kw)
        ref = sampling.generate(params, ids, mask, lora=tree, **gen)
        out = sampling.generate(parallel.shard_params(params, mesh), ids, mask,
                                lora=parallel.shard_lora(tree, mesh, KV), mesh=mesh, **gen)
        np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))
        np.testing.assert_array_equal(np.asarray(out.mask), np.asarray(ref.mask))
        trees_close(out.logps, ref.logps)
        trees_close(out.sampled_logps, ref.sampled_logps)


@pytest.mark.parametrize("tensor", [2, 4])
def test_shard_major_layout_and_cache_heads(model, prompts, tensor):
    """The fused kernels laid out for t shards equal the plain ones with columns permuted
    (checked against an independent construction), and the cache holds K' = max(K, t) heads split
    over "tensor" (K < t: one copy of its kv head per shard)."""
    params, _, _ = model
    N, K, H, F = (CFG.num_attention_heads, CFG.num_key_value_heads, CFG.head_dim,
                  CFG.intermediate_size)
    plain = qwen3.inference_weights(params, CFG, tensor=1, matmul="xla").layers[0]
    split = qwen3.inference_weights(params, CFG, tensor=tensor).layers[0]
    Kp = max(K, tensor)
    assert qwen3.decode_weights.kv_heads(CFG, tensor) == Kp
    q, k, v = np.split(np.asarray(plain.qkv), [N * H, (N + K) * H], axis=1)
    blocks = []
    for s in range(tensor):
        blocks.append(q[:, s * (N // tensor) * H:(s + 1) * (N // tensor) * H])
        heads = [c * K // Kp for c in range(s * Kp // tensor, (s + 1) * Kp // tensor)]
        blocks += [np.concatenate([k[:, h * H:(h + 1) * H] for h in heads], 1),
                   np.concatenate([v[:, h * H:(h + 1) * H] for h in heads], 1)]
    np.testing.assert_array_equal(np.asarray(split.qkv), np.concatenate(blocks, 1))
    g, u = np.split(np.asarray(plain.gate_up), 2, axis=1)
    Fs = F // tensor
    np.testing.assert_array_equal(np.asarray(split.gate_up), np.concatenate(
        [b for s in range(tensor) for b in (g[:, s * Fs:(s + 1) * Fs], u[:, s * Fs:(s + 1) * Fs])], 1))

    mesh = parallel.make_mesh(data=8 // tensor, fsdp=1, tensor=tensor)
    ids, mask = prompts
    w = sampling.prepare_weights_jit(parallel.shard_params(params, mesh), CFG, lora=None,
                                     lora_scale=jnp.float32(1.0), mesh=mesh)
    assert _spec(w.layers[0].qkv) == (None, "tensor")
    assert _spec(w.layers[0].o) == ("tensor",)
    settings = sampling.SamplingConfig(max_new_tokens=16, greedy=True)
    state = sampling.prefill_jit(w, jnp.asarray(ids), jnp.asarray(mask), config=CFG,
                                 settings=settings, rng=jax.random.PRNGKey(0), mesh=mesh)
    assert state.cache.transposed_keys == (jax.default_backend() == "cpu")  # "reduce" reads [B, K', H, S]
    assert state.cache.k[0].shape == ((8, Kp, H, 7 + 16) if state.cache.transposed_keys
                                      else (8, Kp, 7 + 16, H))
    assert _spec(state.cache.k[0]) == ("data", "tensor")
    hlo = sampling.decode_jit.lower(w, state, config=CFG, settings=settings,
                                    mesh=mesh).compile().as_text()
    # the decode step uses its kernel shards in place: nothing the size of a kernel is gathered
    kernel_sizes = {int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(w) if x.ndim == 2}
    for shape in _collectives(hlo, "all-gather"):
        dims = [int(d) for d in re.findall(r"\d+", shape.split("{")[0])]
        assert int(np.prod(dims)) not in kernel_sizes, shape


def test_sampler_gathers_its_weights_over_fsdp_once(model, prompts):
    """`gather_weights`: the sampling weights whole over "fsdp" (split over "tensor" only), the
    decode loop gathers no kernel (split, it gathers them at every step), and the tokens and
    log-probs are those of the split weights."""
    from arca_jax.plan import hlostats

    params, tree, _ = model
    ids, mask = prompts
    mesh = parallel.make_mesh(data=1, fsdp=4, tensor=2)
    sharded = parallel.shard_params(params, mesh), parallel.shard_lora(tree, mesh, KV)
    gen = dict(config=CFG, rng=jax.random.PRNGKey(7), max_new_tokens=9, lora_scale=LCFG.scaling,
               temperature=1.0, top_k=20, mesh=mesh)
    outs = {g: sampling.generate(sharded[0], ids, mask, lora=sharded[1], gather_weights=g, **gen)
            for g in (False, True)}
    np.testing.assert_array_equal(np.asarray(outs[True].tokens), np.asarray(outs[False].tokens))
    trees_close(outs[True].logps, outs[False].logps)
    trees_close(outs[True].sampled_logps, outs[False].sampled_logps)

    settings = sampling.SamplingConfig(max_new_tokens=8, temperature=1.0)
    moved = {}  # collectives inside the decode loop: (how many, float elements they produce)
    for g in (False, True):
        w = sampling.prepare_weights_jit(sharded[0], CFG, lora=sharded[1],
                                         lora_scale=jnp.float32(LCFG.scaling), mesh=mesh,
                                         gather=g)
        assert _spec(w.layers[0].qkv) == ((None, "tensor") if g else ("fsdp", "tensor"))
        assert _spec(w.layers[0].down) == (("tensor",) if g else ("tensor", "fsdp"))
        state = sampling.prefill_jit(w, jnp.asarray(ids), jnp.asarray(mask), config=CFG,
                                     settings=settings, rng=jax.random.PRNGKey(0), mesh=mesh)
        hlo = sampling.decode_jit.lower(w, state, config=CFG, settings=settings,
                                        mesh=mesh).compile().as_text()
        ops = [i for i in hlostats.loop_instructions(hlo)
               if i.opcode.removesuffix("-start") in hlostats.COLLECTIVES]
        moved[g] = (len(ops), sum(int(np.prod(dims)) for i in ops
                                  for dt, dims in hlostats.array_shapes(i.type)
                                  if dt.startswith(("f", "bf"))))
    # split, every step also combines the kernels' "fsdp" parts (at these tiny shapes XLA
    # all-reduces partial products; at 1.7B shapes it gathers the kernels); gathered, only the
    # "tensor" and row collectives are left
    assert moved[True][0] < moved[False][0] and 2 * moved[True][1] < moved[False][1], moved


def test_gather_weights_rule():
    """None gathers when the weights per device (over "tensor") take at most a quarter of a
    device's memory; never without a mesh, with fsdp 1, or with the memory unknown."""
    mesh = parallel.make_mesh(data=1, fsdp=4, tensor=2)
    rule = parallel.gather_weights
    assert rule(None, mesh, weight_bytes=8e9, device_bytes=16e9)  # 4 GB per device <= 4 GB
    assert not rule(None, mesh, weight_bytes=8.1e9, device_bytes=16e9)
    assert not rule(None, mesh, weight_bytes=1.0, device_bytes=None)
    assert rule(True, mesh, weight_bytes=1e12, device_bytes=16e9)
    assert not rule(False, mesh, weight_bytes=1.0, device_bytes=16e9)
    assert not rule(True, None, weight_bytes=1.0, device_bytes=16e9)
    assert not rule(True, parallel.make_mesh(data=4, fsdp=1, tensor=2), 1.0, 16e9)
    # the weights' bytes the trainer and the plan pass: arrays or abstract ones, unsharded
    assert parallel.tree_bytes({"a": jax.ShapeDtypeStruct((2, 3), jnp.bfloat16),
                                "b": jnp.zeros((4,), jnp.float32)}) == 2 * 3 * 2 + 4 * 4


def test_reshape_mesh_keeps_the_device_order():
    """The rollout mesh of a train mesh: the same devices in the same order, data the rest;
    fsdp x tensor must divide the devices."""
    train = parallel.make_mesh(data=1, fsdp=8, tensor=1)
    rollout = parallel.reshape_mesh(train, fsdp=1, tensor=4)
    assert dict(rollout.shape) == {"data": 2, "fsdp": 1, "tensor": 4}
    assert list(rollout.devices.flat) == list(train.devices.flat)
    assert dict(parallel.reshape_mesh(train).shape) == {"data": 8, "fsdp": 1, "tensor": 1}
    for fsdp, tensor in ((3, 1), (1, 0), (2, True)):
        with pytest.raises(ValueError):
            parallel.reshape_mesh(train, fsdp=fsdp, tensor=tensor)


@pytest.mark.parametrize("train_shape,rollout", [((1, 8, 1), (1, 4)), ((2, 2, 2), (2, 4))])
def test_sampler_on_a_rollout_mesh_of_its_own(model, prompts, train_shape, rollout):
    """Weights and adapter placed for the update (e.g. fsdp 8), sampled on another layout of the
    same devices (`reshape_mesh`, e.g. tensor 4): the weight preparation reshards them in its own
    program (split over the rollout mesh's "tensor"), the tokens equal one device's, the
    log-probs within 1e-5, and `RowLayout.place` puts the completions on the train rows."""
    params, tree, _ = model
    ids, mask = prompts
    train = parallel.make_mesh(*train_shape)
    sample = parallel.reshape_mesh(train, *rollout)
    sharded = parallel.shard_params(params, train), parallel.shard_lora(tree, train, KV)
    gen = dict(config=CFG, rng=jax.random.PRNGKey(7), max_new_tokens=9, lora_scale=LCFG.scaling,
               temperature=1.0, top_k=20)
    ref = sampling.generate(params, ids, mask, lora=tree, **gen)
    out = sampling.generate(sharded[0], ids, mask, lora=sharded[1], mesh=sample, **gen)
    np.testing.assert_array_equal(np.asarray(out.tokens), np.asarray(ref.tokens))
    trees_close(out.logps, ref.logps)
    trees_close(out.sampled_logps, ref.sampled_logps)
    assert out.tokens.sharding.mesh == sample

    w = sampling.prepare_weights_jit(sharded[0], CFG, lora=sharded[1],
                                     lora_scale=jnp.float32(LCFG.scaling), mesh=sample)
    assert w.layers[0].qkv.sharding.mesh == sample
    assert _spec(w.layers[0].qkv) == ((None, "tensor") if rollout[0] == 1
                                      else ("fsdp", "tensor"))

    layout = parallel.RowLayout(train, ids.shape[0])
    placed = layout.place(out)
    assert placed.tokens.sharding == layout.sharding
    assert placed.num_steps.sharding.is_fully_replicated
    np.testing.assert_array_equal(np.asarray(placed.tokens), np.asarray(ref.tokens))
