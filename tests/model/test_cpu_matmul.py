"""`qwen3.cpu_matmul`: the panel kernel's products equal numpy's (row counts across its row
blocks and task chunks, column counts off the 16-column panels, leading axes); `pack_parts`
packs a fused, norm-scaled kernel to the bits of `pack` over XLA's concatenation; the decode path
with packed weights (`inference_weights(matmul="cpu-kernel")`) gives the logits of XLA's dots at
prefill and every decode step (tied and untied heads, LoRA low-rank and merged) and the same
sampled tokens; `default_matmul` picks the kernel on CPU for float32 without a mesh only."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arca_jax import lora, qwen3, sampling
from arca_jax.qwen3 import cpu_kernels, cpu_matmul
from fixtures import prefill_and_decode, shifted_adapter

pytestmark = pytest.mark.skipif(not cpu_kernels.available(),
                                reason=f"CPU kernels: {cpu_kernels.error()}")


@pytest.mark.parametrize("lead, n_in, out", [
    ((1,), 1, 16), ((16,), 256, 512), ((7,), 100, 37), ((5,), 33, 17), ((130,), 64, 48),
    ((2, 3), 40, 70), ((13,), 9, 3)],
    ids=["one", "decode", "odd-columns", "rest-rows", "row-chunks", "leading-axes", "narrow"])
def test_matmul_equals_numpy(lead, n_in, out):
    rng = np.random.default_rng(n_in + out)
    x = rng.normal(size=lead + (n_in,)).astype(np.float32)
    w = rng.normal(size=(n_in, out)).astype(np.float32)
    got = np.asarray(jax.jit(cpu_matmul.matmul)(jnp.asarray(x), cpu_matmul.pack(jnp.asarray(w))))
    want = x.astype(np.float64) @ w.astype(np.float64)
    assert got.shape == lead + (out,) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * np.sqrt(n_in) * np.abs(want).max())


def test_pack_holds_column_panels():
    w = jnp.arange(5 * 37, dtype=jnp.float32).reshape(5, 37)
    p = cpu_matmul.pack(w)
    assert p.data.shape == (3, 5, 16) and p.columns == 37 and p.shape == (5, 37)
    np.testing.assert_array_equal(p.data[1], w[:, 16:32])
    np.testing.assert_array_equal(p.data[2, :, :5], w[:, 32:])
    assert not np.any(np.asarray(p.data[2, :, 5:]))  # zeros past the last column
    t = cpu_matmul.pack(w.T, transposed=True)  # from [out, in], as a tied embedding
    assert t.columns == 37
    np.testing.assert_array_equal(t.data, p.data)
    with pytest.raises(ValueError, match="columns"):
        cpu_matmul.matmul(jnp.ones((2, 4)), p)


@pytest.mark.parametrize("outs, scaled", [((24, 8, 8), True), ((16, 32), False), ((5,), True),
                                           ((20, 20, 7), False)],
                         ids=["qkv-straddling", "whole-panels", "one-narrow", "unscaled-rest"])
def test_pack_parts_equals_scaling_concatenating_and_packing(outs, scaled):
    rng = np.random.default_rng(sum(outs))
    L, n_in, layer = 3, 10, 1
    stacks = [rng.normal(size=(L, n_in, o)).astype(np.float32) for o in outs]
    scale = rng.normal(size=(L, n_in)).astype(np.float32)
    fused = np.concatenate([s[layer] for s in stacks], axis=-1)
    if scaled:
        fused = scale[layer][:, None] * fused
    want = cpu_matmul.pack(jnp.asarray(fused))
    got = cpu_matmul.pack_parts([(jnp.asarray(s), layer) for s in stacks],
                                (jnp.asarray(scale), layer) if scaled else None)
    assert got.columns == want.columns == sum(outs)
    np.testing.assert_array_equal(np.asarray(got.data), np.asarray(want.data))
    # a bfloat16 stack is cast one layer at a time; a part may be a lone layer ([1, in, out])
    half = jnp.asarray(stacks[0]).astype(jnp.bfloat16)
    mixed = cpu_matmul.pack_parts([(half, layer), (jnp.asarray(stacks[-1][layer])[None], 0)])
    np.testing.assert_array_equal(
        np.asarray(mixed.data), np.asarray(cpu_matmul.pack(jnp.concatenate(
            [half[layer].astype(jnp.float32), jnp.asarray(stacks[-1][layer])], axis=-1)).data))


def _config(tied):
    return qwen3.Qwen3Config(vocab_size=97, hidden_size=48, intermediate_size=80,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             head_dim=12, tie_word_embeddings=tied)


@pytest.mark.parametrize("tied, adapter", [(True, None), (False, "low-rank"), (True, "merged")])
def test_decode_path_with_packed_weights_equals_xla_dots(tied, adapter):
    config = _config(tied)
    params = qwen3.init_params(config, jax.random.PRNGKey(1), jnp.float32)
    tree, scale = None, 1.0
    if adapter:
        lcfg = lora.LoraConfig(rank=3, alpha=6.0, targets=("q_proj", "v_proj", "o_proj", "up_proj",
                                                          "down_proj"))
        tree, scale = shifted_adapter(config, lcfg, seed=2, shift=0.1), lcfg.scaling
    rng = np.random.default_rng(3)
    B, P, steps = 3, 6, 4
    ids = jnp.asarray(rng.integers(1, 97, (B, P)), jnp.int32)
    mask = jnp.asarray(np.arange(P)[None, :] >= np.array([[0], [2], [5]]), jnp.int32)
    feed = rng.integers(1, 97, (B, steps)).astype(np.int32)
    logits = {}
    for matmul in ("xla", "cpu-kernel"):
        w = qwen3.inference_weights(params, config, lora=tree, lora_scale=scale,
                                    merge_lora=adapter == "merged", matmul=matmul)
        assert w.matmul == matmul
        packed = matmul == "cpu-kernel"
        assert isinstance(w.layers[0].qkv, cpu_matmul.Panels) == packed
        assert isinstance(w.lm_head, cpu_matmul.Panels) == packed
        logits[matmul] = prefill_and_decode(w, config, ids, mask, feed, slots=P + steps)[0]
    np.testing.assert_allclose(logits["cpu-kernel"], logits["xla"], rtol=0, atol=1e-5)


def test_sampling_with_packed_weights_draws_the_same_tokens():
    config = _config(True)
    params = qwen3.init_params(config, jax.random.PRNGKey(4), jnp.float32)
    ids = jnp.asarray(np.random.default_rng(5).integers(1, 97, (8, 5)), jnp.int32)
    outs = {m: sampling.generate(params, ids, jnp.ones_like(ids), config=config,
                                 rng=jax.random.PRNGKey(6), max_new_tokens=12, eos_id=(3, 7),
                                 group_size=2, matmul=m)
            for m in ("xla", "cpu-kernel")}
    np.testing.assert_array_equal(outs["cpu-kernel"].tokens, outs["xla"].tokens)
    np.testing.assert_allclose(outs["cpu-kernel"].logps, outs["xla"].logps, rtol=0, atol=1e-5)


def test_default_matmul_is_the_kernel_on_cpu_for_float32_only():
    assert qwen3.default_matmul(jnp.float32) == "cpu-kernel"
    assert qwen3.default_matmul(jnp.bfloat16) == "xla"
    assert qwen3.default_matmul(jnp.float32, tensor=2) == "xla"
    assert qwen3.default_matmul(jnp.float32, platform="tpu") == "xla"
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
    assert qwen3.default_matmul(jnp.float32, mesh=mesh) == "xla"
    config = _config(True)
    params = qwen3.init_params(config, jax.random.PRNGKey(0), jnp.float32)
    assert qwen3.inference_weights(params, config).matmul == "cpu-kernel"
    half = jax.tree_util.tree_map(lambda x: x.astype(jnp.bfloat16), params)
    assert qwen3.inference_weights(half, config).matmul == "xla"
    with pytest.raises(ValueError, match="matmul must be one of"):
        qwen3.inference_weights(params, config, matmul="onednn")
    with pytest.raises(ValueError, match="tensor=2"):
        qwen3.inference_weights(params, config, matmul="cpu-kernel", tensor=2)
    with pytest.raises(ValueError, match="mesh given"):
        qwen3.inference_weights(params, config, matmul="cpu-kernel", mesh=mesh)
