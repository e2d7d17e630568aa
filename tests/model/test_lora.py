"""LoRA trees against PEFT: forward parity, adapter round trips, merge, parameter counts."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest

from arca_jax import lora, qwen3
from arca_jax.safetensors_io import CheckpointError
from fixtures import (hf_forward, left_padded_batch, random_adapter, random_checkpoint, random_hf_model,
                      random_peft_model, rel_err, shifted_adapter, tiny_hf_config)

ALL = list(lora.ALL_TARGETS)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    cfg = tiny_hf_config(hidden=32, heads=4, kv_heads=2, head_dim=16, layers=2, tied=False)
    path = tmp_path_factory.mktemp("base")
    _, config, params = random_checkpoint(cfg, seed=3, path=path)
    return cfg, path, config, params


def _peft_model(cfg, path, r=4, alpha=8.0, targets=ALL, seed=0):
    import transformers
    m = transformers.Qwen3ForCausalLM.from_pretrained(path, attn_implementation="eager").float().eval()
    # B large enough that the adapter visibly moves the output
    return random_peft_model(m, r=r, alpha=alpha, targets=targets, seed=seed, scale=0.3)


def _jax_forward(config, params, ids, mask, tree=None, scale=1.0):
    return qwen3.forward(params, jnp.asarray(ids), config=config, attention_mask=jnp.asarray(mask),
                         lora=tree, lora_scale=scale)


@pytest.mark.parametrize("targets", [ALL, ["q_proj", "v_proj"], ["down_proj", "o_proj", "k_proj"]])
def test_peft_adapter_parity_on_and_off(base, tmp_path, targets):
    cfg, path, config, params = base
    pm = _peft_model(cfg, path, targets=targets)
    pm.save_pretrained(tmp_path)
    lcfg, tree = lora.load_peft(tmp_path, config)
    assert set(lcfg.targets) == set(targets) and lcfg.rank == 4 and lcfg.scaling == 2.0
    ids, mask = left_padded_batch(cfg.vocab_size, [9, 4, 6], 9, seed=2)

    ref_on, ref_hidden_on = hf_forward(pm, ids, mask)
    with pm.disable_adapter():
        ref_off, ref_hidden_off = hf_forward(pm, ids, mask)
    assert rel_err(ref_on, ref_off, mask) > 1e-2  # the adapter matters

    on = _jax_forward(config, params, ids, mask, tree, lcfg.scaling)
    off = _jax_forward(config, params, ids, mask)
    assert rel_err(on.logits, ref_on, mask) < 1e-4
    assert rel_err(on.hidden, ref_hidden_on, mask) < 1e-4
    assert rel_err(off.logits, ref_off, mask) < 1e-4
    assert rel_err(off.hidden, ref_hidden_off, mask) < 1e-4


def test_save_peft_loads_in_peft(base, tmp_path):
    cfg, path, config, params = base
    lcfg = lora.LoraConfig(rank=3, alpha=5.0)
    # random non-zero B on every projection
    tree = random_adapter(config, lcfg, seed=0, scale=0.3, path_key=lambda p: hash(str(p)) % 2**31)
    lora.save_peft(tmp_path, lcfg, tree, base_model_name_or_path=str(path))
    import transformers
    m = transformers.Qwen3ForCausalLM.from_pretrained(path, attn_implementation="eager").float().eval()
    pm = peft.PeftModel.from_pretrained(m, tmp_path).eval()
    ids, mask = left_padded_batch(cfg.vocab_size, [7, 3], 7, seed=5)
    ref, _ = hf_forward(pm, ids, mask)
    out = _jax_forward(config, params, ids, mask, tree, lcfg.scaling)
    assert rel_err(out.logits, ref, mask) < 1e-4
    # and back: bit-identical tree
    lcfg2, tree2 = lora.load_peft(tmp_path, config)
    assert lcfg2 == lcfg
    for a, b in zip(jax.tree_util.tree_leaves(tree), jax.tree_util.tree_leaves(tree2)):
        np.testing.assert_array_equal(a, b)


def test_save_peft_accepts_gradient_trees(base, tmp_path):
    cfg, path, config, params = base
    lcfg = lora.LoraConfig(rank=2, alpha=4.0, targets=("q_proj", "up_proj"))
    tree = lora.init_lora(config, lcfg, jax.random.PRNGKey(1))
    ids = jnp.ones((1, 4), jnp.int32)
    grads = jax.grad(lambda t: jnp.sum(qwen3.forward(params, ids, config=config, lora=t,
                                                      lora_scale=2.0).logits))(tree)
    lora.save_peft(tmp_path, lcfg, grads)
    _, back = lora.load_peft(tmp_path, config)
    for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(back)):
        np.testing.assert_array_equal(a, b)


def test_init_is_identity_and_matches_peft_distribution(base):
    cfg, path, config, params = base
    lcfg = lora.LoraConfig(rank=8, alpha=16.0)
    tree = lora.init_lora(config, lcfg, jax.random.PRNGKey(0))
    ids, mask = left_padded_batch(cfg.vocab_size, [5, 5], 5)
    a = _jax_forward(config, params, ids, mask, tree, lcfg.scaling)
    b = _jax_forward(config, params, ids, mask)
    np.testing.assert_array_equal(np.asarray(a.logits), np.asarray(b.logits))
    qa = np.asarray(tree["layers"]["self_attn"]["q_proj"]["lora_a"])
    bound = 1 / np.sqrt(config.hidden_size)
    assert np.abs(qa).max() <= bound and np.abs(qa).max() > 0.9 * bound
    assert not np.asarray(tree["layers"]["mlp"]["down_proj"]["lora_b"]).any()
    # PEFT's own init gives the same bound
    pm = peft.get_peft_model(random_hf_model(cfg), peft.LoraConfig(r=8, lora_alpha=16, target_modules=ALL))
    w = pm.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.detach().numpy()
    assert np.abs(w).max() <= bound and np.abs(w).max() > 0.9 * bound


def test_merge_equals_adapter_forward(base):
    cfg, path, config, params = base
    lcfg = lora.LoraConfig(rank=4, alpha=8.0)
    tree = shifted_adapter(config, lcfg, seed=2, shift=0.05)
    ids, mask = left_padded_batch(cfg.vocab_size, [6, 2], 6)
    merged = lora.merge(params, tree, lcfg)
    a = _jax_forward(config, merged, ids, mask)
    b = _jax_forward(config, params, ids, mask, tree, lcfg.scaling)
    assert rel_err(a.logits, b.logits, mask) < 1e-5
    # the input tree is untouched
    assert merged["layers"]["self_attn"]["q_proj"]["kernel"] is not params["layers"]["self_attn"]["q_proj"]["kernel"]


@pytest.mark.parametrize("rank,expected", [(4, 4_358_144), (16, 17_432_576), (64, 69_730_304)])
def test_paper_trainable_param_counts(rank, expected):
    config = qwen3.preset("Qwen3-1.7B")
    shapes = jax.eval_shape(lambda: lora.init_lora(config, lora.LoraConfig(rank=rank, alpha=2 * rank),
                                                    jax.random.PRNGKey(0)))
    assert lora.count_params(shapes) == expected


def test_lora_config_validation():
    assert lora.LoraConfig(rank=64, alpha=128).scaling == 2.0
    assert lora.LoraConfig(rank=16, alpha=8, use_rslora=True).scaling == 2.0
    with pytest.raises(ValueError, match="rank"):
        lora.LoraConfig(rank=0)
    with pytest.raises(ValueError, match="targets"):
        lora.LoraConfig(targets=("qkv",))
    with pytest.raises(ValueError, match="dropout"):
        lora.LoraConfig(dropout=1.5)


def test_bad_adapter_directories(base, tmp_path):
    cfg, path, config, params = base
    with pytest.raises(CheckpointError, match="not found"):
        lora.load_peft(tmp_path / "nope", config)
    good = tmp_path / "good"
    lcfg = lora.LoraConfig(rank=2, alpha=4.0)
    lora.save_peft(good, lcfg, lora.init_lora(config, lcfg, jax.random.PRNGKey(0)))

    d = tmp_path / "dora"
    d.mkdir()
    (d / "adapter_model.safetensors").write_bytes((good / "adapter_model.safetensors").read_bytes())
    c = json.loads((good / "adapter_config.json").read_text())
    (d / "adapter_config.json").write_text(json.dumps({**c, "use_dora": True}))
    with pytest.raises(CheckpointError, match="use_dora"):
        lora.load_peft(d, config)

    (d / "adapter_config.json").write_text(json.dumps({**c, "r": 3}))
    with pytest.raises(CheckpointError, match=r"shape \(2, 32\), expected \(3, 32\)"):
        lora.load_peft(d, config)

    other = qwen3.Qwen3Config(**{**config.__dict__, "num_hidden_layers": 3})
    with pytest.raises(CheckpointError, match="missing tensor.*layers.2"):
        lora.load_peft(good, other)

    os.remove(d / "adapter_model.safetensors")
    with pytest.raises(CheckpointError, match="adapter_model.safetensors"):
        lora.load_peft(d, config)


def test_adapter_matmul_dtype(base):
    """lora_dtype=None computes the adapter in the activation dtype: float32 models exactly as
    lora_dtype="float32"; bf16 models with bf16 adapter matmuls (float32 master weights and
    gradients), within bf16 rounding of float32 adapter matmuls."""
    cfg, path, config, params = base
    # rank 5: a size no other matmul of this model and batch has (heads 4, key ranges of the
    # attention's query blocks 2, 3, 4, 6)
    tree = shifted_adapter(config, lora.LoraConfig(rank=5), seed=5, shift=0.05)
    ids, mask = (jnp.asarray(x) for x in left_padded_batch(cfg.vocab_size, [6, 3], 6))

    def fwd(p, t, dtype):
        return qwen3.forward(p, ids, config=config, attention_mask=mask, lora=t, lora_scale=2.0,
                             lora_dtype=dtype).logits

    np.testing.assert_array_equal(fwd(params, tree, None), fwd(params, tree, "float32"))
    p16 = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params)

    def adapter_dots(jaxpr):  # operand dtypes of every matmul with the rank-5 dimension
        for e in jaxpr.eqns:
            if e.primitive.name == "dot_general":
                lhs, rhs = (v.aval for v in e.invars)
                if 5 in (lhs.shape[-1], rhs.shape[0], rhs.shape[-1]):
                    yield str(lhs.dtype), str(rhs.dtype)
            for v in e.params.values():
                inner = getattr(v, "jaxpr", v)
                if hasattr(inner, "eqns"):
                    yield from adapter_dots(inner)

    for dtype, want in ((None, "bfloat16"), ("float32", "float32")):
        found = set(adapter_dots(jax.make_jaxpr(lambda t: fwd(p16, t, dtype))(tree).jaxpr))
        assert found == {(want, want)}, (dtype, found)
    a, b = fwd(p16, tree, None), fwd(p16, tree, "float32")
    assert rel_err(a, b, np.asarray(mask)) < 2e-2
    g = jax.grad(lambda t: jnp.sum(fwd(p16, t, None) * mask[..., None]))(tree)
    assert {x.dtype for x in jax.tree_util.tree_leaves(g)} == {jnp.dtype(jnp.float32)}
