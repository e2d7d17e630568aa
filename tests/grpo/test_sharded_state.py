"""ZeRO-style train state on 8 forced host devices (issue 20): the adapter, its Adam moments and
the step's gradient split over "fsdp" (and "tensor"); the mesh step's updated adapter and
optimiser state equal the single-device run's for every weighting, the state stays split, and a
checkpoint of the split state restores onto other meshes (4 devices, 1 device) and continues as
the uninterrupted run. The per-device byte count against the issue's Qwen3-32B figures."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from arca_jax import credit, lora, parallel, qwen3
from arca_jax.checkpoint import Checkpointer
from arca_jax.grpo import GRPOConfig, TrainState, make_optimizer, make_train_step
from fixtures import (ragged_batch, random_adapter, random_params, slow_except, tiny_config,
                      trees_close)

FAST = {"xla_backend_optimization_level": 0}
CFG = tiny_config(vocab_size=64)  # D 32, N H 32, K H 16, F 48: every wide dimension splits 8 ways
LCFG = lora.LoraConfig(rank=4, alpha=8.0)
KV = CFG.num_key_value_heads
# (data, fsdp, tensor), microbatches
MESHES = [((2, 4, 1), 2), ((1, 8, 1), 1), ((1, 4, 2), 1)]
# entropy reduction's weights are a difference of nearly equal entropies: float32 rounding moves
# its gradient by ~1e-4 relative between two compilations (tests/grpo/test_tensor_parallel.py)
TOLERANCE = {"entropy_reduction": 1e-3}
WEIGHTINGS = credit.registered()


def _optimizer():
    """The trainer's optimiser (clipping, AdamW, warmup + cosine) with a large rate and no warmup,
    so two steps move the adapter visibly. eps 1e-3 instead of 1e-8: Adam's first update is
    lr g / (|g| + eps), so at eps 1e-8 a gradient entry of the size of float32 rounding moves
    by up to lr with the order of a sum (the fsdp 8 mesh then differs from one device by 6e-5
    relative); a larger eps keeps the update a smooth function of the gradient, so the
    comparison measures the layout rather than Adam's conditioning."""
    return make_optimizer(1e-2, warmup_steps=0, total_steps=10, eps=1e-3)


@pytest.fixture(scope="module")
def model():
    params = random_params(CFG, seed=0, scale=2.0)
    tree = random_adapter(CFG, LCFG, seed=1, scale=0.2)
    return params, tree, ragged_batch(CFG.vocab_size)


def _state(tree):
    return TrainState.create(jax.tree_util.tree_map(jnp.array, tree), _optimizer(),
                             jax.random.PRNGKey(3))


def _two_steps_of_every_weighting(mode, mesh=None, microbatches=1):
    """One jitted program: two train steps of each registered weighting (with a KL term) from the
    same state; {weighting: state after two steps}."""
    steps = {w: make_train_step(CFG, GRPOConfig(weighting=w, kl_beta=0.02), _optimizer(),
                                lora_scale=LCFG.scaling, mode=mode, mesh=mesh,
                                microbatches=microbatches, donate=False)
             for w in WEIGHTINGS}

    def run(states, params, batch):
        out = {}
        for w, step in steps.items():
            step = getattr(step, "jitted", step)  # the mesh step's program, without placement
            out[w] = jax.lax.fori_loop(0, 2, lambda i, s: step(s, params, batch)[0], states[w])
        return out
    return jax.jit(run, compiler_options=FAST)


@pytest.fixture(scope="module")
def single_device(model):
    params, tree, batch = model
    run = _two_steps_of_every_weighting("jit")
    return run({w: _state(tree) for w in WEIGHTINGS}, params, batch)


def _is_split(x) -> bool:
    return x.addressable_shards[0].data.shape != x.shape


# ------------------------------------------- layout -------------------------------------------


def test_lora_partition_spec_splits_every_factor_over_fsdp():
    spec = parallel.lora_partition_spec
    q_a, q_b = ["layers", "self_attn", "q_proj", "lora_a"], ["layers", "self_attn", "q_proj", "lora_b"]
    o_a, o_b = ["layers", "self_attn", "o_proj", "lora_a"], ["layers", "self_attn", "o_proj", "lora_b"]
    v_b = ["layers", "self_attn", "v_proj", "lora_b"]
    # fsdp only: the wide dimension (A's I, B's O)
    assert spec(q_a, (2, 32, 4), 1, fsdp_size=8) == P(None, "fsdp", None)
    assert spec(q_b, (2, 4, 32), 1, fsdp_size=8) == P(None, None, "fsdp")
    # with tensor: fsdp joins tensor on a tensor-split dimension (tensor-major), else alone
    assert spec(q_b, (2, 4, 32), 2, fsdp_size=4) == P(None, None, ("tensor", "fsdp"))
    assert spec(q_a, (2, 32, 4), 2, fsdp_size=4) == P(None, "fsdp", None)
    assert spec(o_a, (2, 32, 4), 2, fsdp_size=4) == P(None, ("tensor", "fsdp"), None)
    assert spec(o_b, (2, 4, 32), 2, fsdp_size=4) == P(None, None, "fsdp")
    # K = 2 < tensor 4: v's B is whole over tensor, so fsdp takes O alone
    assert spec(v_b, (2, 4, 16), 4, kv_heads=2, fsdp_size=2) == P(None, None, "fsdp")
    # the wide dimension not divisible: the rank; neither: replicated over fsdp
    assert spec(q_a, (2, 36, 8), 1, fsdp_size=8) == P(None, None, "fsdp")
    assert spec(q_b, (2, 8, 36), 2, fsdp_size=4) == P(None, "fsdp", "tensor")
    assert spec(q_a, (2, 36, 4), 1, fsdp_size=8) == P()
    assert spec(q_b, (2, 3, 36), 2, fsdp_size=4) == P(None, None, "tensor")
    # fsdp 1: the tensor-only layout; non-adapter leaves replicated
    assert spec(q_b, (2, 4, 32), 2) == P(None, None, "tensor")
    assert spec(["step"], (), 2, fsdp_size=8) == P()
    assert spec(["layers", "mlp", "up_proj", "kernel"], (2, 32, 48), 1, fsdp_size=8) == P()


def test_train_state_bytes_of_qwen3_32b():
    """The issue's figures: Qwen3-32B with LoRA r = 64 on all seven projections has 2^29 adapter
    parameters, 2 GiB of float32 factors and 4 GiB of Adam moments on every chip when
    replicated; over fsdp 8 each device holds an eighth (256 MiB, 512 MiB)."""
    config = qwen3.preset("Qwen3-32B")
    lcfg = lora.LoraConfig(rank=64, alpha=128.0)
    state = jax.eval_shape(lambda: TrainState.create(
        lora.init_lora(config, lcfg, jax.random.PRNGKey(0)), _optimizer(), jax.random.PRNGKey(0)))
    # independent count: per layer R x (in + out) of each projection
    D, F, NH, KH = 5120, 25600, 64 * 128, 8 * 128
    n = 64 * 64 * ((D + NH) * 2 + (D + KH) * 2 + (D + F) * 3)
    assert n == lora.count_params(state.lora) == 2 ** 29
    GiB = 2 ** 30
    rep = parallel.train_state_bytes(state, parallel.make_mesh(1, 8, 1), KV, fsdp=False)
    assert (rep.adapter, rep.gradient) == (2 * GiB, 2 * GiB)
    scalars = rep.optimizer - 4 * GiB  # Adam's count, the injected hyperparameters
    assert 0 < scalars < 100
    assert rep.total == 8 * GiB + scalars + rep.other
    zero = parallel.train_state_bytes(state, parallel.make_mesh(1, 8, 1), 8)
    assert (zero.adapter, zero.optimizer, zero.gradient, zero.other) == (
        GiB // 4, GiB // 2 + scalars, GiB // 4, rep.other)
    # tensor 2 x fsdp 4: the tensor-split factor of each pair (q/k/v/gate/up's B by O, o/down's
    # A by I) over all 8 devices, the other (an R x D factor) over fsdp's 4
    both = parallel.train_state_bytes(state, parallel.make_mesh(1, 4, 2), 8)
    per_device = 4 * 64 * 64 * (7 * D // 4 + (2 * NH + 2 * KH + 3 * F) // 8)
    assert (both.adapter, both.optimizer) == (per_device, 2 * per_device + scalars)
    # data does not split the state
    assert parallel.train_state_bytes(state, parallel.make_mesh(2, 4, 1), 8) == \
        parallel.train_state_bytes(state, parallel.make_mesh(1, 4, 1), 8)


def test_train_state_bytes_match_the_placed_arrays(model):
    """The count from shapes equals the bytes each device's shards of a placed state hold."""
    _, tree, _ = model
    for shape in ((1, 8, 1), (1, 4, 2), (2, 2, 2)):
        mesh = parallel.make_mesh(*shape)
        state = parallel.shard_lora(_state(tree), mesh, KV)
        held = {}
        for leaf in jax.tree_util.tree_leaves(state):
            for s in leaf.addressable_shards:
                held[s.device] = held.get(s.device, 0) + s.data.nbytes
        assert len(set(held.values())) == 1, held
        got = parallel.train_state_bytes(state, mesh, KV)
        assert got.total - got.gradient == held[jax.devices()[0]]
        rep = parallel.train_state_bytes(state, mesh, KV, fsdp=False)
        assert got.adapter * shape[1] == rep.adapter  # every factor splits fsdp ways here


# ------------------------------------------ train step ----------------------------------------


@pytest.mark.parametrize("shape,microbatches", slow_except(MESHES, keep=2, unpack=True),  # tensor 2
                         ids=[f"data{d}-fsdp{f}-tensor{t}-mb{m}" for (d, f, t), m in MESHES])
def test_two_steps_equal_single_device_for_every_weighting(model, single_device, shape,
                                                           microbatches):
    """The updated adapter and Adam state after two steps within 1e-5 of one device for each
    weighting; every factor and moment is split over "fsdp" (a device's shard is 1 / fsdp of the
    tensor shard) and keeps its layout."""
    params, tree, batch = model
    mesh = parallel.make_mesh(*shape)
    states = {w: parallel.shard_lora(_state(tree), mesh, KV) for w in WEIGHTINGS}
    layout = jax.tree_util.tree_map(lambda x: x.sharding, states)
    run = _two_steps_of_every_weighting("mesh", mesh, microbatches)
    got = run(states, parallel.shard_params(params, mesh), parallel.shard_batch(batch, mesh))
    for w in WEIGHTINGS:
        tol = TOLERANCE.get(w, 1e-5)
        trees_close(got[w].lora, single_device[w].lora, tol)
        trees_close(got[w].opt_state, single_device[w].opt_state, tol)
        assert int(got[w].step) == 2
        moved = max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in zip(
            jax.tree_util.tree_leaves(got[w].lora), jax.tree_util.tree_leaves(tree)))
        assert moved > 1e-3, w
    fsdp, tensor = shape[1], shape[2]
    for w in WEIGHTINGS:
        mu = got[w].opt_state[1].inner_state[0].mu
        for tree_ in (got[w].lora, mu, got[w].opt_state[1].inner_state[0].nu):
            for leaf in jax.tree_util.tree_leaves(tree_):
                n_shard = int(np.prod(leaf.addressable_shards[0].data.shape))
                assert n_shard * fsdp in (leaf.size, leaf.size // tensor), leaf.sharding
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(layout)):
        assert a.sharding.is_equivalent_to(b, a.ndim)


# ------------------------------------------ checkpoints ---------------------------------------


def test_checkpoint_of_the_split_state_resumes_on_4_and_on_1_device(model, tmp_path):
    """A state saved from fsdp 8 (each device 1/8 of every factor and moment) restores onto
    fsdp 4 over four devices and onto one device (Orbax reads each target shard from the saved
    ones: the restore target's shardings are the new layout), bit for bit, and the next step
    there equals the uninterrupted 8-device run's within 1e-5."""
    params, tree, batch = model
    g = GRPOConfig(weighting="arca", kl_beta=0.02)

    def stepper(mesh):
        return make_train_step(CFG, g, _optimizer(), lora_scale=LCFG.scaling,
                               mode="jit" if mesh is None else "mesh", mesh=mesh, donate=False,
                               compiler_options=FAST)

    mesh8 = parallel.make_mesh(1, 8, 1)
    step8, params8 = stepper(mesh8), parallel.shard_params(params, mesh8)
    saved, _ = step8(parallel.shard_lora(_state(tree), mesh8, KV), params8, batch)
    uninterrupted, _ = step8(saved, params8, batch)
    ckpt = Checkpointer(str(tmp_path / "ckpt"))
    ckpt.save(1, saved, {"step": 1})

    mesh4 = parallel.make_mesh(1, 4, 1, devices=jax.devices()[:4])
    targets = {"fsdp 4": (mesh4, parallel.shard_lora(_state(tree), mesh4, KV)),
               "one device": (None, _state(tree))}
    for name, (mesh, like) in targets.items():
        state, record, step = ckpt.restore(like)
        assert (record["step"], step) == (1, 1)
        for got, want, target in zip(jax.tree_util.tree_leaves(state),
                                     jax.tree_util.tree_leaves(saved),
                                     jax.tree_util.tree_leaves(like)):
            np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
            assert got.sharding.is_equivalent_to(target.sharding, got.ndim), name
        mu = state.opt_state[1].inner_state[0].mu["layers"]["mlp"]["gate_proj"]["lora_b"]
        assert mu.addressable_shards[0].data.shape == (
            (2, 4, 48 // 4) if mesh is not None else (2, 4, 48)), name
        p = params if mesh is None else parallel.shard_params(params, mesh)
        resumed, _ = stepper(mesh)(state, p, batch)
        trees_close(resumed.lora, uninterrupted.lora)
        trees_close(resumed.opt_state, uninterrupted.opt_state)
        assert int(resumed.step) == 2
    ckpt.close()


def test_mesh_forwards_keep_each_devices_rows(model):
    """`policy_forward(..., mesh=)` (both forwards of a mesh step) constrains its inputs and
    outputs to rows over ("data", "fsdp"): a batch that arrives replicated comes out split by
    rows (XLA otherwise may run a microbatch's every row on every device: on TPU it did so for
    ARCA's two forwards, 17 GiB of attention scores per chip for Qwen3-32B), and the values
    equal the forward without a mesh."""
    from arca_jax.batch import as_batch
    from arca_jax.grpo import policy_forward

    params, tree, batch = model
    b = as_batch(batch)
    mesh = parallel.make_mesh(data=2, fsdp=4)
    g = GRPOConfig(weighting="arca")
    kw = dict(config=CFG, lora_scale=LCFG.scaling, grpo_config=g, layers=True)
    rep = jax.sharding.NamedSharding(mesh, P())
    b_rep = jax.device_put(b, jax.tree_util.tree_map(lambda _: rep, b))
    out = jax.jit(lambda lo, p, x: policy_forward(lo, p, x, mesh=mesh, **kw))(tree, params, b_rep)
    assert out.hidden.sharding.spec == P(("data", "fsdp"))
    assert out.layers.sharding.spec == P(None, ("data", "fsdp"))
    ref = jax.jit(lambda lo, p, x: policy_forward(lo, p, x, **kw))(tree, params, b)
    np.testing.assert_allclose(np.asarray(out.hidden), np.asarray(ref.hidden), atol=1e-5,
                               rtol=1e-5)
