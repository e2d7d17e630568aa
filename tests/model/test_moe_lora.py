"""LoRA on the experts and the router of a Qwen3 mixture-of-experts model: the forward against
PEFT on transformers' `Qwen3MoeForCausalLM` (our adapter directory loaded by PEFT, which fuses
the per-expert adapters onto transformers 5's stacked experts), a fresh adapter is the base
model, the GRPO loss's gradient against a brute-force per-row expert reference, the mesh train
step (expert factors split on E over "fsdp") against one device, the sampler against the
forward, the refusals."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arca_jax import lora, parallel, qwen3, sampling
from arca_jax.batch import Batch
from arca_jax.grpo import GRPOConfig, TrainState, make_train_step
from arca_jax.grpo.objective import loss_fn
from arca_jax.qwen3 import moe
from arca_jax.safetensors_io import CheckpointError
from fixtures import (completion_batch, grad_recorder, hf_forward, left_padded_batch,
                      ragged_batch, random_adapter, random_checkpoint, random_params, rel_err,
                      tiny_moe_hf_config, trees_close)

FAST = {"xla_backend_optimization_level": 0}
EXPERTS = ("gate_proj", "up_proj", "down_proj")
EVERY = lora.TARGETS  # attention, the experts' projections and the router ("gate")
LCFG = lora.LoraConfig(rank=2, alpha=4.0, targets=EVERY)
# 8 experts of width 24, top-2, 2 sparse layers (a dense layer: `test_matches_peft_both_ways`)
CFG = qwen3.Qwen3Config.from_hf(tiny_moe_hf_config(experts=8, top_k=2, layers=2))

_forward = jax.jit(qwen3.forward, static_argnames=("config", "lora_scale", "mesh"))


def _batch(vocab):
    return left_padded_batch(vocab, lengths=[9, 5, 2], total=9, seed=1)


@pytest.fixture(scope="module")
def model():
    params = random_params(CFG, seed=0)
    return params, random_adapter(CFG, LCFG, seed=1, scale=0.3)


def test_adapter_tree_shapes():
    tree = lora.init_lora(CFG, LCFG, jax.random.PRNGKey(0))
    mlp = tree["layers"]["mlp"]
    E, D, I, R = 8, 32, 24, 2
    shapes = {k: (v["lora_a"].shape, v["lora_b"].shape) for k, v in mlp["experts"].items()}
    assert shapes == {"gate_proj": ((2, E, D, R), (2, E, R, I)),
                      "up_proj": ((2, E, D, R), (2, E, R, I)),
                      "down_proj": ((2, E, I, R), (2, E, R, D))}
    assert (mlp["router"]["lora_a"].shape, mlp["router"]["lora_b"].shape) == ((2, D, R), (2, R, E))
    assert set(mlp) == {"experts", "router"}
    assert all(float(jnp.abs(ab["lora_b"]).max()) == 0.0 for _, ab in lora.iter_adapters(tree))


def test_matches_peft_both_ways(tmp_path):
    """Our adapter directory, loaded by PEFT onto transformers' model, computes our forward;
    disabled, the base forward; PEFT's re-save (transformers 5's fused layout) is refused. Layer
    1 is dense: its MLP takes no adapter, in ours and in PEFT on transformers 5."""
    import peft

    cfg = tiny_moe_hf_config(experts=4, top_k=2, layers=3, mlp_only=(1,))
    m, config, params = random_checkpoint(cfg, seed=3, path=tmp_path / "base")
    tree = random_adapter(config, LCFG, seed=2, scale=0.3)
    lora.save_peft(tmp_path / "ours", LCFG, tree, config=config)
    pm = peft.PeftModel.from_pretrained(m, str(tmp_path / "ours")).eval()
    ids, mask = _batch(config.vocab_size)
    ref_on, ref_hidden = hf_forward(pm, ids, mask)
    with pm.disable_adapter():
        ref_off, _ = hf_forward(pm, ids, mask)
    assert rel_err(ref_on, ref_off, mask) > 1e-2  # the adapter matters
    on = _forward(params, jnp.asarray(ids), config=config, attention_mask=jnp.asarray(mask),
                  lora=tree, lora_scale=LCFG.scaling)
    off = _forward(params, jnp.asarray(ids), config=config, attention_mask=jnp.asarray(mask))
    assert rel_err(on.logits, ref_on, mask) < 1e-4
    assert rel_err(on.hidden, ref_hidden, mask) < 1e-4
    assert rel_err(off.logits, ref_off, mask) < 1e-4
    # merged into the base weights: the same model
    merged = _forward(lora.merge(params, tree, LCFG), jnp.asarray(ids), config=config,
                      attention_mask=jnp.asarray(mask))
    assert rel_err(merged.logits, on.logits, mask) < 1e-5
    lcfg, back = lora.load_peft(tmp_path / "ours", config)
    assert lcfg == LCFG
    jax.tree_util.tree_map(np.testing.assert_array_equal, back, tree)
    pm.save_pretrained(tmp_path / "resaved")
    with pytest.raises(CheckpointError, match="target_parameters"):
        lora.load_peft(tmp_path / "resaved", config)


def test_fresh_adapter_is_the_base_model(model):
    params, _ = model
    ids, mask = _batch(CFG.vocab_size)
    kw = dict(config=CFG, attention_mask=jnp.asarray(mask))
    base = _forward(params, jnp.asarray(ids), **kw)
    fresh = _forward(params, jnp.asarray(ids), lora=lora.init_lora(CFG, LCFG, jax.random.PRNGKey(5)),
                     lora_scale=LCFG.scaling, **kw)
    np.testing.assert_array_equal(np.asarray(fresh.logits), np.asarray(base.logits))


def _per_row_project(rows, w, group_sizes, lora_scale=1.0, lora_dtype=None):
    """Brute force `moe.grouped_project`: each row times its own expert's merged matrix
    W_e + lora_scale A_e B_e (gathered per row; rows past the groups give 0)."""
    E = w["kernel"].shape[0]
    expert = jnp.searchsorted(jnp.cumsum(group_sizes), jnp.arange(rows.shape[0]), side="right")
    merged = w["kernel"]
    if "lora_a" in w:
        merged = merged + lora_scale * jnp.einsum("EIR,ERO->EIO", w["lora_a"], w["lora_b"])
    y = jnp.einsum("PI,PIO->PO", rows, merged[jnp.minimum(expert, E - 1)])
    return jnp.where((expert < E)[:, None], y, 0.0)


def test_grpo_gradient_matches_per_row_reference(model, monkeypatch):
    """d/d(adapter) of the ARCA-weighted GRPO loss with the load-balancing term: the grouped
    matmul's (ragged_dot through A_e, then B_e) against every row through its own expert's merged
    matrix."""
    params, tree = model
    ids, am, cm, adv = completion_batch(CFG.vocab_size)
    batch = Batch(input_ids=jnp.asarray(ids, jnp.int32), attention_mask=jnp.asarray(am, jnp.int32),
                  completion_mask=jnp.asarray(cm, jnp.int32), advantages=jnp.asarray(adv))
    g = GRPOConfig(weighting="arca", sharpening=2.0, router_aux_loss_coef=0.3)

    def value_and_grad():
        return jax.jit(jax.value_and_grad(
            lambda t: loss_fn(t, params, batch, config=CFG, lora_scale=LCFG.scaling,
                              grpo_config=g)[0]))(tree)

    value, grads = value_and_grad()
    monkeypatch.setattr(moe, "grouped_project", _per_row_project)
    ref_value, ref_grads = value_and_grad()
    assert abs(float(value) - float(ref_value)) < 1e-5 * abs(float(ref_value))
    for name in EXPERTS:
        for factor in ("lora_a", "lora_b"):
            got = grads["layers"]["mlp"]["experts"][name][factor]
            ref = ref_grads["layers"]["mlp"]["experts"][name][factor]
            assert np.linalg.norm(np.asarray(ref)) > 0
            assert rel_err(got, ref) < 1e-5, (name, factor, rel_err(got, ref))
    trees_close(grads, ref_grads)


def test_mesh_train_step_equals_one_device(model):
    """Experts over fsdp 4 (2 per device): the expert factors, their gradient and Adam-like
    state split on E as the expert kernels; loss and gradient those of one device."""
    params, tree = model
    batch = ragged_batch(CFG.vocab_size, B=8, T=10)
    g = GRPOConfig(weighting="arca", sharpening=2.0)

    def step(p, **kw):
        opt = grad_recorder()
        run = make_train_step(CFG, g, opt, lora_scale=LCFG.scaling, donate=False,
                              compiler_options=FAST, **kw)
        state = TrainState.create(jax.tree_util.tree_map(jnp.array, tree), opt,
                                  jax.random.PRNGKey(0))
        if "mesh" in kw:
            state = parallel.shard_lora(state, kw["mesh"], CFG.num_key_value_heads)
        return run(state, p, batch)

    first, one = step(params)
    mesh = parallel.make_mesh(2, 4, 1)
    state, got = step(parallel.shard_params(params, mesh), mode="mesh", mesh=mesh)
    trees_close(got.loss, one.loss)
    trees_close(state.opt_state, first.opt_state)
    a = state.lora["layers"]["mlp"]["experts"]["down_proj"]["lora_a"]  # [Ls, E, I, R]
    assert tuple(a.sharding.spec)[:2] == (None, "fsdp")
    assert {s.data.shape[1] for s in a.addressable_shards} == {2}


def test_sampler_greedy_follows_the_forward(model):
    """Greedy tokens of the sampler (expert and router adapters merged into its expert stacks)
    are the argmax of the forward over the sequence so far, and its log-probs the forward's; on a
    (data 2, fsdp 4) mesh (merged expert stacks split on E, tokens exchanged) the same tokens and
    log-probs as on one device."""
    params, tree = model
    ids, mask = _batch(CFG.vocab_size)
    ids, mask = ids.astype(np.int32), mask.astype(np.int32)
    n = 3
    kw = dict(config=CFG, rng=jax.random.PRNGKey(0), max_new_tokens=n, greedy=True,
              lora_scale=LCFG.scaling)
    out = sampling.generate(params, ids, mask, lora=tree, **kw)
    tokens = np.asarray(out.tokens)
    seq = jnp.asarray(np.concatenate([ids, tokens], 1))
    seq_mask = jnp.asarray(np.concatenate([mask, np.ones_like(tokens)], 1))
    logits = np.asarray(_forward(params, seq, config=CFG, attention_mask=seq_mask, lora=tree,
                                 lora_scale=LCFG.scaling).logits)
    P = ids.shape[1]
    step_logits = logits[:, P - 1:P - 1 + n]
    np.testing.assert_array_equal(tokens, step_logits.argmax(-1))
    logp = jax.nn.log_softmax(step_logits, -1)
    np.testing.assert_allclose(np.asarray(out.logps),
                               np.take_along_axis(logp, tokens[..., None], -1)[..., 0], atol=1e-4)
    mesh = parallel.make_mesh(2, 4, 1)
    on_mesh = sampling.generate(parallel.shard_params(params, mesh), ids, mask,
                                lora=parallel.shard_lora(tree, mesh), mesh=mesh, **kw)
    np.testing.assert_array_equal(np.asarray(on_mesh.tokens), tokens)
    np.testing.assert_allclose(np.asarray(on_mesh.logps), np.asarray(out.logps), atol=1e-5)


def test_refusals(model, tmp_path):
    params, tree = model
    dense = qwen3.Qwen3Config(**{k: v for k, v in CFG.__dict__.items()
                                 if k in qwen3.Qwen3Config.__dataclass_fields__})
    with pytest.raises(ValueError, match="router.*mixture-of-experts"):
        lora.init_lora(dense, lora.LoraConfig(targets=("q_proj", "gate")), jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="no dropout"):
        lora.init_lora(CFG, lora.LoraConfig(targets=("up_proj",), dropout=0.1),
                       jax.random.PRNGKey(0))
    ids, mask = _batch(CFG.vocab_size)
    with pytest.raises(ValueError, match="no dropout"):
        qwen3.forward(params, jnp.asarray(ids), config=CFG, lora=tree, lora_dropout=0.1,
                      rng=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="needs the model's `config`"):
        lora.save_peft(tmp_path / "x", LCFG, tree)
    lora.save_peft(tmp_path / "ok", LCFG, tree, config=CFG)
    c = json.loads((tmp_path / "ok" / "adapter_config.json").read_text())
    (tmp_path / "ok" / "adapter_config.json").write_text(json.dumps({**c, "lora_dropout": 0.1}))
    with pytest.raises(CheckpointError, match="no dropout"):
        lora.load_peft(tmp_path / "ok", CFG)
