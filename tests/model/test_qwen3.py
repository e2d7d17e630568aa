"""Parity of the Flax Qwen3 port with transformers (PyTorch CPU) and checkpoint round trips."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

from arca_jax import hf, lora, qwen3
from arca_jax.safetensors_io import CheckpointError
from fixtures import (hf_forward, left_padded_batch, positions_of, random_hf_model, rel_err,
                      shifted_adapter, tiny_hf_config)

CASES = {
    # GQA ratio 1, tied, head_dim (16) != hidden / heads (8), rope_theta 1e4.
    "tied_gqa1": dict(hidden=32, heads=4, kv_heads=4, head_dim=16, tied=True, theta=1e4),
    # GQA ratio 2, untied, rope_theta 5e5.
    "untied_gqa2": dict(hidden=48, heads=4, kv_heads=2, head_dim=24, tied=False, theta=5e5),
    # GQA ratio 3, tied, head_dim 8 (hidden / heads would be 40 / 6), 3 layers, rope_theta 1e6.
    "tied_gqa3": dict(hidden=40, heads=6, kv_heads=2, head_dim=8, layers=3, tied=True, theta=1e6),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def checkpoint(request, tmp_path_factory):
    cfg = tiny_hf_config(**CASES[request.param])
    model = random_hf_model(cfg, seed=len(request.param))
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path, safe_serialization=True)
    return model, str(path)


def _batch(model):
    return left_padded_batch(model.config.vocab_size, lengths=[11, 7, 2], total=11, seed=1)


def test_forward_matches_transformers_float32(checkpoint):
    model, path = checkpoint
    config, params = hf.load_pretrained(path, dtype=jnp.float32)
    assert config.rope_theta == model.config.rope_parameters["rope_theta"]
    ids, mask = _batch(model)
    ref_logits, ref_hidden = hf_forward(model, ids, mask)
    out = jax.jit(qwen3.forward, static_argnames="config")(
        params, jnp.asarray(ids), config=config, attention_mask=jnp.asarray(mask))
    assert out.logits.dtype == jnp.float32
    assert rel_err(out.logits, ref_logits, mask) < 1e-4
    assert rel_err(out.hidden, ref_hidden, mask) < 1e-4
    assert np.all(np.isfinite(np.asarray(out.logits)))  # padded rows stay finite


def test_explicit_positions_equal_default(checkpoint):
    model, path = checkpoint
    config, params = hf.load_pretrained(path, dtype=jnp.float32)
    ids, mask = _batch(model)
    a = qwen3.forward(params, jnp.asarray(ids), config=config, attention_mask=jnp.asarray(mask))
    b = qwen3.forward(params, jnp.asarray(ids), config=config, attention_mask=jnp.asarray(mask),
                      positions=jnp.asarray(positions_of(mask)))
    np.testing.assert_array_equal(np.asarray(a.logits), np.asarray(b.logits))


def test_bfloat16_params_within_bf16_tolerance(checkpoint):
    model, path = checkpoint
    config, params = hf.load_pretrained(path, dtype=jnp.bfloat16)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree_util.tree_leaves(params))
    ids, mask = _batch(model)
    ref_logits, ref_hidden = hf_forward(model, ids, mask)
    out = qwen3.forward(params, jnp.asarray(ids), config=config, attention_mask=jnp.asarray(mask))
    assert out.logits.dtype == jnp.float32 and out.hidden.dtype == jnp.bfloat16
    assert rel_err(out.logits, ref_logits, mask) < 5e-2
    assert rel_err(out.hidden, ref_hidden, mask) < 5e-2


def test_remat_does_not_change_values_or_grads(checkpoint):
    model, path = checkpoint
    config, params = hf.load_pretrained(path, dtype=jnp.float32)
    ids, mask = _batch(model)

    def loss(p, remat):
        out = qwen3.forward(p, jnp.asarray(ids), config=config, attention_mask=jnp.asarray(mask),
                            remat=remat)
        return jnp.mean(out.logits ** 2)

    g0 = jax.grad(loss)(params, False)
    g1 = jax.grad(loss)(params, True)
    for a, b in zip(jax.tree_util.tree_leaves(g0), jax.tree_util.tree_leaves(g1)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_rotary_tables_are_computed_once(checkpoint):
    """The compiled forward + backward holds one cosine and one sine (the rotary angles', once),
    however many layers and heads rotate q and k with them: XLA fuses an elementwise table into
    each consumer unless it is kept apart, and a cosine is costly on CPU."""
    model, path = checkpoint
    config, params = hf.load_pretrained(path, dtype=jnp.float32)
    ids, mask = _batch(model)

    def loss(p):
        out = qwen3.forward(p, jnp.asarray(ids), config=config, attention_mask=jnp.asarray(mask))
        return jnp.mean(out.logits ** 2)

    hlo = jax.jit(jax.grad(loss)).lower(params).compile().as_text()
    assert hlo.count(" cosine(") == 1 and hlo.count(" sine(") == 1


def test_save_pretrained_round_trip_through_transformers(checkpoint, tmp_path):
    model, path = checkpoint
    config, params = hf.load_pretrained(path, dtype=jnp.float32)
    hf.save_pretrained(tmp_path, config, params)
    reloaded = transformers.Qwen3ForCausalLM.from_pretrained(tmp_path, attn_implementation="eager")
    assert reloaded.config.tie_word_embeddings == config.tie_word_embeddings
    ids, mask = _batch(model)
    a, _ = hf_forward(model, ids, mask)
    b, _ = hf_forward(reloaded.float().eval(), ids, mask)
    np.testing.assert_array_equal(a, b)  # identical weights, identical logits
    # and back into JAX: the same tree bit for bit
    _, params2 = hf.load_pretrained(tmp_path, dtype=jnp.float32)
    for x, y in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(params2)):
        np.testing.assert_array_equal(x, y)


def test_sharded_index_checkpoint(tmp_path):
    cfg = tiny_hf_config(hidden=32, heads=4, kv_heads=2, head_dim=8, layers=2, tied=False)
    model = random_hf_model(cfg)
    model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="20KB")
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    config, params = hf.load_pretrained(tmp_path, dtype=jnp.float32)
    ids, mask = left_padded_batch(cfg.vocab_size, [5, 3], 5)
    ref, _ = hf_forward(model, ids, mask)
    out = qwen3.forward(params, jnp.asarray(ids), config=config, attention_mask=jnp.asarray(mask))
    assert rel_err(out.logits, ref, mask) < 1e-4


# ---------------------------------------------------------------------------------------------
# Config


def test_config_from_hf_all_sources_and_back(tmp_path):
    hf_cfg = tiny_hf_config(theta=12345.0, tied=False)
    from_obj = qwen3.Qwen3Config.from_hf(hf_cfg)
    from_dict = qwen3.Qwen3Config.from_hf(hf_cfg.to_dict())
    hf_cfg.save_pretrained(tmp_path)
    from_path = qwen3.Qwen3Config.from_hf(tmp_path / "config.json")
    from_dir = qwen3.Qwen3Config.from_hf(tmp_path)
    assert from_obj == from_dict == from_path == from_dir
    assert from_obj.rope_theta == 12345.0 and not from_obj.tie_word_embeddings
    back = from_obj.to_hf()
    assert isinstance(back, transformers.Qwen3Config)
    assert qwen3.Qwen3Config.from_hf(back) == from_obj


def test_config_reads_transformers4_layout(tmp_path):
    d = {"model_type": "qwen3", "vocab_size": 50, "hidden_size": 32, "intermediate_size": 64,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
         "rms_norm_eps": 1e-6, "rope_theta": 777.0, "rope_scaling": None,
         "tie_word_embeddings": True, "max_position_embeddings": 128}
    (tmp_path / "config.json").write_text(json.dumps(d))
    c = qwen3.Qwen3Config.from_hf(tmp_path)
    assert c.rope_theta == 777.0 and c.head_dim == 8 and c.tie_word_embeddings


@pytest.mark.parametrize("scaling", [
    {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}},
    {"rope_scaling": {"type": "dynamic", "factor": 2.0}},
    {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6}},
])
def test_config_refuses_rope_scaling(scaling):
    d = {"model_type": "qwen3", "rope_theta": 1e6, **scaling}
    with pytest.raises(qwen3.ConfigError, match="not implemented"):
        qwen3.Qwen3Config.from_hf(d)


def test_config_refuses_other_models_and_bad_values():
    with pytest.raises(qwen3.ConfigError, match="model_type"):
        qwen3.Qwen3Config.from_hf({"model_type": "llama"})
    with pytest.raises(qwen3.ConfigError, match="multiple"):
        qwen3.Qwen3Config(num_attention_heads=6, num_key_value_heads=4)
    with pytest.raises(qwen3.ConfigError, match="sliding"):
        qwen3.Qwen3Config.from_hf({"model_type": "qwen3", "use_sliding_window": True})


def test_presets():
    c = qwen3.preset("Qwen/Qwen3-1.7B-Base")
    assert (c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers,
            c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.tie_word_embeddings,
            c.rope_theta) == (151936, 2048, 6144, 28, 16, 8, 128, True, 1e6)
    for name in ("Qwen3-0.6B", "Qwen3-4B", "Qwen3-8B"):
        assert qwen3.preset(name).num_hidden_layers in (28, 36)
    with pytest.raises(KeyError):
        qwen3.preset("Qwen3-3B")
    shapes = qwen3.param_shapes(c, jnp.bfloat16)  # no allocation
    n = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(shapes))
    assert n == 1_720_574_976  # Qwen3-1.7B's parameter count (tied embeddings)


# ---------------------------------------------------------------------------------------------
# Bad checkpoints


@pytest.fixture(scope="module")
def small_ckpt(tmp_path_factory):
    cfg = tiny_hf_config(hidden=32, heads=4, kv_heads=2, head_dim=8, layers=2, tied=True)
    model = random_hf_model(cfg)
    path = tmp_path_factory.mktemp("small")
    model.save_pretrained(path, safe_serialization=True)
    return path


def _copy(src, dst):
    import shutil
    shutil.copytree(src, dst)
    return dst


def _rewrite(path, edit):
    from safetensors.numpy import load_file, save_file
    tensors = load_file(str(path / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})


def test_missing_directory_and_files(tmp_path, small_ckpt):
    with pytest.raises(CheckpointError, match="not found"):
        hf.load_pretrained(tmp_path / "nope")
    d = _copy(small_ckpt, tmp_path / "a")
    os.remove(d / "model.safetensors")
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        hf.load_pretrained(d)
    d = _copy(small_ckpt, tmp_path / "b")
    os.remove(d / "config.json")
    with pytest.raises(CheckpointError, match="config.json"):
        hf.load_pretrained(d)


def test_wrong_model_type(tmp_path, small_ckpt):
    d = _copy(small_ckpt, tmp_path / "c")
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "llama"
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(qwen3.ConfigError, match="llama"):
        hf.load_pretrained(d)


def test_missing_unexpected_and_misshapen_tensors(tmp_path, small_ckpt):
    name = "model.layers.1.self_attn.k_proj.weight"
    d = _copy(small_ckpt, tmp_path / "missing")
    _rewrite(d, lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.")) as e:
        hf.load_pretrained(d)
    assert "model.safetensors" in str(e.value) and "missing" in str(e.value)

    d = _copy(small_ckpt, tmp_path / "unexpected")
    _rewrite(d, lambda t: t.__setitem__("model.layers.0.mlp.extra.weight", np.zeros(3, np.float32)))
    with pytest.raises(CheckpointError, match="unexpected.*mlp.extra"):
        hf.load_pretrained(d)

    d = _copy(small_ckpt, tmp_path / "shape")
    _rewrite(d, lambda t: t.__setitem__(name, np.zeros((16, 31), np.float32)))
    with pytest.raises(CheckpointError, match=r"\(16, 31\).*\(16, 32\)"):
        hf.load_pretrained(d)


def test_truncated_file(tmp_path, small_ckpt):
    d = _copy(small_ckpt, tmp_path / "trunc")
    f = d / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 100])
    with pytest.raises(CheckpointError, match="truncated") as e:
        hf.load_pretrained(d)
    assert "model.safetensors" in str(e.value)
    f.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="truncated"):
        hf.load_pretrained(d)


def test_fused_attention_layout_matches_einsum(checkpoint):
    """attention="sdpa-xla" (the "cudnn" path's rotated row layout and seq-length masking, run by
    jax's XLA kernel) equals the einsum path on left- and right-padded rows: logits and LoRA
    gradients, also under remat="projections"; padded rows stay finite, a mask with a hole gives
    NaN in that row only."""
    model, path = checkpoint
    config, params = hf.load_pretrained(path, dtype=jnp.float32)
    ids, mask = _batch(model)  # left-padded rows of 11, 7, 2 tokens
    mask = mask.copy()
    mask[0, 8:] = 0  # and right padding
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)
    tree = shifted_adapter(config, lora.LoraConfig(rank=4, alpha=8.0), seed=3, shift=0.1)
    r = jax.random.normal(jax.random.PRNGKey(4), ids.shape + (config.vocab_size,))

    @functools.partial(jax.jit, static_argnames=("attention", "remat"))
    def run(tree, attention, remat=False):
        def loss(t):
            out = qwen3.forward(params, ids, config=config, attention_mask=mask, lora=t,
                                lora_scale=2.0, attention=attention, remat=remat)
            return jnp.sum(out.logits * r * mask[..., None]), out.logits
        return jax.value_and_grad(loss, has_aux=True)(tree)

    (_, ref), g_ref = run(tree, "einsum")
    m = np.asarray(mask)
    kernels = (("cpu-kernel", False), ("cpu-kernel", "projections")) if (
        qwen3.cpu_kernels.available()) else ()
    for attention, remat in (("sdpa-xla", False), ("sdpa-xla", "projections"),
                             ("einsum", "projections")) + kernels:
        (_, logits), g = run(tree, attention, remat)
        assert rel_err(logits, ref, m) < 1e-5, (attention, remat)
        assert np.all(np.isfinite(np.asarray(logits)))
        for a, b in zip(jax.tree_util.tree_leaves(g_ref), jax.tree_util.tree_leaves(g)):
            assert float(jnp.max(jnp.abs(a - b))) <= 1e-4 * float(jnp.max(jnp.abs(a))), (attention, remat)
    holed = mask.at[0, 5].set(0)
    h = qwen3.forward(params, ids, config=config, attention_mask=holed, attention="sdpa-xla",
                      return_logits=False).hidden
    assert np.isnan(np.asarray(h)).any(axis=(1, 2)).tolist() == [True, False, False]
    assert qwen3.resolve_attention("auto", jnp.bfloat16) == "einsum"  # CPU, not float32
    with pytest.raises(ValueError):
        qwen3.forward(params, ids, config=config, attention="flash")
    with pytest.raises(ValueError):
        qwen3.forward(params, ids, config=config, remat="some")
