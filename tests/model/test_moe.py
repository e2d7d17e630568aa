"""Qwen3 mixture of experts against transformers' `Qwen3MoeForCausalLM` (PyTorch CPU): config.json,
checkpoints both ways, logits and hidden states, the load-balancing loss, attention LoRA against
PEFT and its gradients against torch autograd; the grouped matmul against a dense reference."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import save_file

from arca_jax import hf, lora, qwen3
from arca_jax.qwen3 import moe
from arca_jax.safetensors_io import CheckpointError
from fixtures import (hf_forward, left_padded_batch, peft_adapter_tree, positions_of,
                      random_hf_model, random_peft_model, rel_err, tiny_moe_hf_config)

ATTN = list(qwen3.ATTN_PROJS)
CASES = {
    # 4 experts, top-2 renormalised, every layer sparse, untied
    "e4k2_norm": dict(experts=4, top_k=2, norm_topk=True, layers=2),
    # 8 experts, top-3 raw probabilities, layer 1 dense (mlp_only_layers), tied
    "e8k3_mlp_only": dict(experts=8, top_k=3, norm_topk=False, layers=3, mlp_only=(1,), tied=True),
    # 6 experts, top-1, decoder_sparse_step 2: dense, sparse, dense, sparse; rope theta 1e6
    "e6k1_step2": dict(experts=6, top_k=1, norm_topk=True, layers=4, sparse_step=2, theta=1e6),
}

_jit_forward = jax.jit(qwen3.forward, static_argnames=("config", "lora_scale", "attention", "remat",
                                                       "return_layers"))


@pytest.fixture(scope="module", params=sorted(CASES))
def checkpoint(request, tmp_path_factory):
    cfg = tiny_moe_hf_config(**CASES[request.param])
    model = random_hf_model(cfg, seed=len(request.param))
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path, safe_serialization=True)
    config, params = hf.load_pretrained(path, dtype=jnp.float32)
    return model, str(path), config, params


def _batch(vocab):
    return left_padded_batch(vocab, lengths=[11, 7, 2], total=11, seed=1)


def _forward(config, params, ids, mask, **kw):
    return _jit_forward(params, jnp.asarray(ids), config=config, attention_mask=jnp.asarray(mask),
                        **kw)


# ------------------------------------ config --------------------------------------------------


def test_config_from_checkpoint(checkpoint):
    model, path, config, _ = checkpoint
    c = model.config
    assert isinstance(config, qwen3.Qwen3MoeConfig)
    assert config == qwen3.Qwen3MoeConfig.from_hf(path) == qwen3.Qwen3Config.from_hf(c)
    assert (config.num_experts, config.num_experts_per_tok, config.moe_intermediate_size,
            config.norm_topk_prob, config.decoder_sparse_step, config.mlp_only_layers) == (
        c.num_experts, c.num_experts_per_tok, c.moe_intermediate_size, c.norm_topk_prob,
        c.decoder_sparse_step, tuple(c.mlp_only_layers))
    assert config.sparse_layers == tuple(
        type(layer.mlp).__name__ == "Qwen3MoeSparseMoeBlock" for layer in model.model.layers)
    hash(config)  # static under jit
    back = config.to_hf()
    assert isinstance(back, transformers.Qwen3MoeConfig)
    assert qwen3.Qwen3Config.from_hf(back) == config
    assert qwen3.Qwen3Config.from_hf(config.to_dict()) == config


def test_config_rope_layouts_and_refusals():
    d = tiny_moe_hf_config(experts=8, top_k=2, mlp_only=(0,), theta=5e5).to_dict()
    new = qwen3.Qwen3Config.from_hf(d)
    assert new.rope_theta == 5e5 and new.num_experts == 8 and new.mlp_only_layers == (0,)
    old = {k: v for k, v in d.items() if k not in ("rope_parameters", "num_local_experts")}
    old.update(rope_theta=5e5, rope_scaling=None, num_experts=8)  # the Hub's 4.x layout
    assert qwen3.Qwen3Config.from_hf(old) == new
    with pytest.raises(qwen3.ConfigError, match="rope scaling"):
        qwen3.Qwen3Config.from_hf({**old, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(qwen3.ConfigError, match="expected 'qwen3_moe'"):
        qwen3.Qwen3MoeConfig.from_hf({**old, "model_type": "qwen3"})
    with pytest.raises(qwen3.ConfigError, match="num_experts_per_tok"):
        qwen3.Qwen3Config.from_hf({**old, "num_experts_per_tok": 9})
    with pytest.raises(qwen3.ConfigError, match="mlp_only_layers"):
        qwen3.Qwen3Config.from_hf({**old, "mlp_only_layers": [7]})
    dense = qwen3.preset("Qwen3-1.7B")
    assert type(qwen3.Qwen3Config.from_hf(dense.to_dict())) is qwen3.Qwen3Config


# name: hidden D, expert width I, layers L, query heads N; the model cards' total and
# non-embedding counts (billions, rounded as printed) and activated ones (truncated as printed)
RELEASED = {"Qwen3-30B-A3B": (2048, 768, 48, 32, 30.5, 29.9, 3.3),
            "Qwen3-235B-A22B": (4096, 1536, 94, 64, 235, 234, 22)}


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_moe_presets(name):
    D, I, L, N, total_b, non_embedding_b, active_b = RELEASED[name]
    c = qwen3.preset(f"Qwen/{name}-Base")
    assert c == qwen3.preset(name) and isinstance(c, qwen3.Qwen3MoeConfig)
    assert (c.hidden_size, c.moe_intermediate_size, c.num_hidden_layers, c.num_attention_heads,
            c.num_key_value_heads, c.head_dim, c.num_experts, c.num_experts_per_tok) == (
        D, I, L, N, 4, 128, 128, 8)
    assert c.norm_topk_prob and not c.tie_word_embeddings and all(c.sparse_layers)
    V, H, E, k = 151936, 128, 128, 8
    attention = 2 * D * N * H + 2 * D * 4 * H + 2 * H + 2 * D  # q, o, k, v, q/k norms, 2 norms
    n = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(qwen3.param_shapes(c)))
    assert n == L * (attention + D * E + 3 * E * D * I) + D + 2 * V * D
    digits = lambda x: len(str(x).split(".")[1]) if "." in str(x) else 0  # noqa: E731
    assert round(n / 1e9, digits(total_b)) == total_b
    assert round((n - 2 * V * D) / 1e9, digits(non_embedding_b)) == non_embedding_b
    active = L * (attention + D * E + 3 * k * D * I) + D + 2 * V * D
    assert int(active / 10 ** (9 - digits(active_b))) == int(active_b * 10 ** digits(active_b))


# ------------------------------------ forward -------------------------------------------------


def test_forward_matches_transformers_float32(checkpoint):
    model, _, config, params = checkpoint
    ids, mask = _batch(config.vocab_size)
    ref_logits, ref_hidden = hf_forward(model, ids, mask)
    out = _forward(config, params, ids, mask)
    assert rel_err(out.logits, ref_logits, mask) < 1e-4
    assert rel_err(out.hidden, ref_hidden, mask) < 1e-4
    m = mask.astype(bool)
    assert np.max(np.abs(np.asarray(out.logits)[m] - ref_logits[m])) < 1e-4
    assert np.all(np.isfinite(np.asarray(out.logits)))


def test_every_layer_output_matches_transformers(checkpoint):
    model, _, config, params = checkpoint
    ids, mask = _batch(config.vocab_size)
    with torch.no_grad():
        ref = model(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                    position_ids=torch.as_tensor(positions_of(mask)), output_hidden_states=True)
    out = _forward(config, params, ids, mask, return_layers=True)
    L = config.num_hidden_layers
    assert out.layers.shape[0] == L
    for layer in range(L - 1):  # hidden_states[l + 1] is layer l's output; the last one is normed
        assert rel_err(out.layers[layer], ref.hidden_states[layer + 1].numpy(), mask) < 1e-4


def test_aux_loss_and_expert_load_match_transformers(checkpoint):
    model, _, config, params = checkpoint
    ids, mask = _batch(config.vocab_size)
    with torch.no_grad():
        ref = model(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                    position_ids=torch.as_tensor(positions_of(mask)), output_router_logits=True)
    out = _forward(config, params, ids, mask)
    Ls, E, k = sum(config.sparse_layers), config.num_experts, config.num_experts_per_tok
    assert out.aux_loss.shape == (Ls,) and out.expert_load.shape == out.router_prob.shape == (Ls, E)
    total = moe.load_balancing_loss(out.expert_load, out.router_prob, k)
    assert abs(float(total) - float(ref.aux_loss)) < 1e-5 * float(ref.aux_loss)
    from transformers.models.qwen3_moe.modeling_qwen3_moe import load_balancing_loss_func

    m = mask.reshape(-1).astype(bool)
    for layer, logits in enumerate(ref.router_logits):
        one = load_balancing_loss_func((logits,), E, k, torch.as_tensor(mask))
        assert abs(float(out.aux_loss[layer]) - float(one)) < 1e-5 * float(one)
        top = torch.topk(torch.softmax(logits.float(), -1), k, dim=-1).indices.numpy()[m]
        load = np.bincount(top.reshape(-1), minlength=E) / top.size
        np.testing.assert_allclose(np.asarray(out.expert_load[layer]), load, atol=1e-6)
        prob = torch.softmax(logits.float(), -1).numpy()[m].mean(0)
        np.testing.assert_allclose(np.asarray(out.router_prob[layer]), prob, atol=1e-6)


def test_execution_options_keep_values(checkpoint):
    """remat and the rotated fused-attention layout ("sdpa-xla") change neither the values nor the
    routing statistics (counted over the real tokens in either layout)."""
    _, _, config, params = checkpoint
    ids, mask = _batch(config.vocab_size)
    base = _forward(config, params, ids, mask, attention="einsum")
    out = _forward(config, params, ids, mask, remat="full", attention="sdpa-xla")
    assert rel_err(out.hidden, base.hidden, mask) < 1e-5
    np.testing.assert_allclose(out.expert_load, base.expert_load, atol=1e-6)
    np.testing.assert_allclose(out.aux_loss, base.aux_loss, rtol=1e-5)


def test_dense_model_has_no_router_outputs():
    config = qwen3.Qwen3Config(vocab_size=31, hidden_size=16, intermediate_size=24,
                               num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                               head_dim=8)
    out = jax.eval_shape(lambda: qwen3.forward(qwen3.init_params(config, jax.random.PRNGKey(0)),
                                               jnp.ones((1, 3), jnp.int32), config=config))
    assert out.aux_loss is None and out.expert_load is None and out.router_prob is None


def test_sparse_block_equals_every_expert_reference():
    """The sorted ragged_dot dispatch against every expert run on every token and masked by the
    routing (the dense reference), values and input gradients, with ties-free random weights."""
    config = qwen3.Qwen3MoeConfig(hidden_size=16, num_experts=5, num_experts_per_tok=3,
                                  moe_intermediate_size=12, norm_topk_prob=False,
                                  num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                  head_dim=8)
    block = moe.SparseMoeBlock(config)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 7, 16))
    variables = jax.jit(block.init)(jax.random.PRNGKey(2), x)
    p = variables["params"]

    def dense(x):
        rows = x.reshape(-1, 16)
        probs, weights, experts = moe.route(rows @ p["router"]["kernel"], 3, False)
        ex = p["experts"]
        h = jax.nn.silu(jnp.einsum("MD,EDI->MEI", rows, ex["gate_proj"]["kernel"]))
        h = h * jnp.einsum("MD,EDI->MEI", rows, ex["up_proj"]["kernel"])
        y = jnp.einsum("MEI,EID->MED", h, ex["down_proj"]["kernel"])  # [M, E, D]
        gate = jnp.zeros(probs.shape).at[jnp.arange(rows.shape[0])[:, None], experts].set(weights)
        return jnp.einsum("ME,MED->MD", gate, y).reshape(x.shape)

    y, stats = jax.jit(block.apply)(variables, x)
    np.testing.assert_allclose(y, jax.jit(dense)(x), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(jnp.sum(stats.load), 1.0, rtol=1e-6)
    g = jax.jit(jax.grad(lambda x: jnp.sum(jnp.sin(block.apply(variables, x)[0]))))(x)
    g_ref = jax.jit(jax.grad(lambda x: jnp.sum(jnp.sin(dense(x)))))(x)
    np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-6)


# ------------------------------------ checkpoints ---------------------------------------------


def test_save_pretrained_loads_in_transformers(checkpoint, tmp_path):
    model, path, config, params = checkpoint
    hf.save_pretrained(tmp_path, config, params)
    back = transformers.Qwen3MoeForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    ids, mask = _batch(config.vocab_size)
    ref_logits, _ = hf_forward(model, ids, mask)
    logits, _ = hf_forward(back.float().eval(), ids, mask)
    np.testing.assert_array_equal(logits, ref_logits)
    config2, params2 = hf.load_pretrained(tmp_path, dtype=jnp.float32)
    assert config2 == config
    jax.tree_util.tree_map(np.testing.assert_array_equal, params2, params)
    with open(os.path.join(tmp_path, "config.json")) as f:
        d = json.load(f)
    assert d["model_type"] == "qwen3_moe" and d["num_experts"] == config.num_experts


def test_fused_expert_layout_loads(checkpoint, tmp_path):
    """transformers' in-memory layout (experts.gate_up_proj [E, 2I, D], experts.down_proj [E, D, I])
    loads to the same tree as the Hub layout."""
    model, path, config, params = checkpoint
    state = {k: v.detach().numpy().copy() for k, v in model.state_dict().items()
             if not (config.tie_word_embeddings and k == "lm_head.weight")}
    assert any(k.endswith("experts.gate_up_proj") for k in state)
    save_file(state, os.path.join(tmp_path, "model.safetensors"), {"format": "pt"})
    with open(os.path.join(path, "config.json")) as f:
        (tmp_path / "config.json").write_text(f.read())
    _, fused = hf.load_pretrained(tmp_path, dtype=jnp.float32)
    jax.tree_util.tree_map(np.testing.assert_array_equal, fused, params)


def test_missing_expert_tensor_is_named(checkpoint, tmp_path):
    model, path, config, params = checkpoint
    hf.save_pretrained(tmp_path, config, params)
    from arca_jax.safetensors_io import SafetensorsFile

    with SafetensorsFile(os.path.join(tmp_path, "model.safetensors")) as f:
        tensors = {n: f.get(n) for n in f.keys()}
    layer = config.sparse_layers.index(True)
    name = f"model.layers.{layer}.mlp.experts.{config.num_experts - 1}.down_proj.weight"
    del tensors[name]
    save_file(tensors, os.path.join(tmp_path, "model.safetensors"), {"format": "pt"})
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")):
        hf.load_pretrained(tmp_path, dtype=jnp.float32)


# ------------------------------------ LoRA ----------------------------------------------------


@pytest.fixture(scope="module")
def adapted(checkpoint):
    model, path, config, params = checkpoint
    base = transformers.Qwen3MoeForCausalLM.from_pretrained(path, attn_implementation="eager")
    pm = random_peft_model(base.float().eval(), r=4, alpha=8.0, targets=ATTN, seed=5, scale=0.3)
    return pm, config, params, peft_adapter_tree(pm, targets=ATTN)


def test_attention_lora_matches_peft(adapted, tmp_path):
    pm, config, params, tree = adapted
    ids, mask = _batch(config.vocab_size)
    ref_on, ref_hidden_on = hf_forward(pm, ids, mask)
    with pm.disable_adapter():
        ref_off, _ = hf_forward(pm, ids, mask)
    assert rel_err(ref_on, ref_off, mask) > 1e-2  # the adapter matters
    on = _forward(config, params, ids, mask, lora=tree, lora_scale=2.0)
    assert rel_err(on.logits, ref_on, mask) < 1e-4
    assert rel_err(on.hidden, ref_hidden_on, mask) < 1e-4
    # PEFT's directory both ways
    pm.save_pretrained(tmp_path / "peft")
    lcfg, loaded = lora.load_peft(tmp_path / "peft", config)
    assert lcfg.targets == tuple(ATTN) and lcfg.scaling == 2.0
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, tree)
    lora.save_peft(tmp_path / "ours", lcfg, tree)
    _, again = lora.load_peft(tmp_path / "ours", config)
    jax.tree_util.tree_map(np.testing.assert_array_equal, again, tree)


def test_attention_lora_gradients_match_torch(adapted):
    """d/d(A, B) of sum_t w_t log p(y_t) over the tokens predicted from a real token (a padded
    slot's output is meaningless, in either implementation): ours against torch autograd through
    the PEFT model (the routing weights are differentiated, the choice of experts is not)."""
    pm, config, params, tree = adapted
    ids, mask = _batch(config.vocab_size)
    w = np.random.default_rng(4).normal(size=ids.shape).astype(np.float32) * mask
    w[:, 0] = 0.0
    w[:, 1:] *= mask[:, :-1]

    def loss(tree):
        out = qwen3.forward(params, jnp.asarray(ids), config=config,
                            attention_mask=jnp.asarray(mask), lora=tree, lora_scale=2.0)
        logp = jax.nn.log_softmax(out.logits[:, :-1], axis=-1)
        tok = jnp.take_along_axis(logp, jnp.asarray(ids)[:, 1:, None], axis=-1)[..., 0]
        return jnp.sum(tok * w[:, 1:])

    value, grads = jax.jit(jax.value_and_grad(loss))(tree)
    pm.zero_grad()
    logits = pm(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask),
                position_ids=torch.as_tensor(positions_of(mask))).logits
    logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, torch.as_tensor(ids)[:, 1:, None])[..., 0]
    ref = (logp * torch.as_tensor(w[:, 1:])).sum()
    ref.backward()
    ref_value = float(ref.detach())
    assert abs(float(value) - ref_value) < 1e-4 * abs(ref_value)
    for layer, blk in enumerate(pm.base_model.model.model.layers):
        for proj in ATTN:
            mod = getattr(blk.self_attn, proj)
            for part, ours in (("lora_A", "lora_a"), ("lora_B", "lora_b")):
                g = getattr(mod, part)["default"].weight.grad.numpy().T
                mine = np.asarray(grads["layers"]["self_attn"][proj][ours][layer])
                assert np.linalg.norm(g) > 0
                assert rel_err(mine, g) < 1e-4, (layer, proj, part, rel_err(mine, g))
    pm.zero_grad()


def test_mlp_lora_dropout_refused(checkpoint, tmp_path):
    """Expert and router adapters take no dropout (the rest: tests/model/test_moe_lora.py)."""
    model, path, config, params = checkpoint
    with pytest.raises(ValueError, match="no dropout"):
        lora.init_lora(config, lora.LoraConfig(rank=2, targets=("q_proj", "gate_proj"),
                                               dropout=0.1), jax.random.PRNGKey(0))
    lcfg = lora.LoraConfig(rank=2, targets=("q_proj", "gate"))
    tree = lora.init_lora(config, lcfg, jax.random.PRNGKey(0))
    ids, mask = _batch(config.vocab_size)
    with pytest.raises(ValueError, match="no dropout"):
        qwen3.forward(params, jnp.asarray(ids), config=config, lora=tree, lora_dropout=0.1,
                      rng=jax.random.PRNGKey(0))


def test_bfloat16_params_run():
    """Smoke: bfloat16 parameters run (router logits in bf16, softmax in float32) and stay finite."""
    cfg = tiny_moe_hf_config(experts=4, top_k=2)
    config = qwen3.Qwen3Config.from_hf(cfg)
    params = jax.jit(qwen3.init_params, static_argnums=(0, 2))(config, jax.random.PRNGKey(0),
                                                               jnp.bfloat16)
    ids, mask = _batch(config.vocab_size)
    out = _forward(config, params, ids, mask)
    assert out.hidden.dtype == jnp.bfloat16 and out.router_prob.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(out.logits)))
    np.testing.assert_allclose(np.asarray(out.expert_load).sum(-1), 1.0, rtol=1e-6)
