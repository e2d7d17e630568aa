"""`qwen3.forward(scan_layers=...)`: the decoder layers as one `jax.lax.scan` or unrolled give the
same hidden states, per-layer outputs, routing statistics and adapter gradients (LoRA dropout and
remat included), and `qwen3.resolve_scan_layers` picks unrolled only for small models on CPU."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arca_jax import lora, qwen3
from arca_jax.grpo import GRPOConfig
from fixtures import left_padded_batch, tiny_config

_forward = jax.jit(qwen3.forward, static_argnames=(
    "config", "lora_scale", "lora_dropout", "remat", "return_layers", "scan_layers"))


def _inputs(config, seed=0):
    params = qwen3.init_params(config, jax.random.PRNGKey(seed))
    ids, mask = left_padded_batch(config.vocab_size, lengths=[9, 4, 6], total=9, seed=seed + 1)
    tree = lora.init_lora(config, lora.LoraConfig(rank=4, alpha=8.0), jax.random.PRNGKey(seed + 2))
    tree = jax.tree_util.tree_map_with_path(  # B nonzero: the adapter acts
        lambda p, x: 0.1 * jax.random.normal(jax.random.PRNGKey(len(str(p))), x.shape)
        if "lora_b" in str(p) else x, tree)
    return params, jnp.asarray(ids), jnp.asarray(mask), tree


@pytest.mark.parametrize("remat", [False, "full"])
def test_unrolled_layers_equal_the_scan(remat):
    config = tiny_config(num_hidden_layers=3)
    params, ids, mask, tree = _inputs(config)
    kw = dict(config=config, attention_mask=mask, lora_scale=2.0, lora_dropout=0.2,
              rng=jax.random.PRNGKey(7), remat=remat, return_layers=True)
    scanned = _forward(params, ids, lora=tree, scan_layers=True, **kw)
    unrolled = _forward(params, ids, lora=tree, scan_layers=False, **kw)
    assert unrolled.layers.shape == scanned.layers.shape == (3,) + ids.shape + (config.hidden_size,)
    np.testing.assert_allclose(np.asarray(unrolled.layers), np.asarray(scanned.layers), atol=1e-6)
    np.testing.assert_allclose(np.asarray(unrolled.logits), np.asarray(scanned.logits), atol=1e-6)

    def loss(t, scan):  # the adapter's gradient through every layer, dropout masks included
        out = _forward(params, ids, lora=t, scan_layers=scan, **kw)
        return jnp.sum(jnp.where(mask[..., None] > 0, out.hidden, 0.0) ** 2)

    g_scan, g_unrolled = (jax.grad(loss)(tree, scan) for scan in (True, False))
    for a, b in zip(jax.tree_util.tree_leaves(g_unrolled), jax.tree_util.tree_leaves(g_scan)):
        assert np.abs(np.asarray(b)).max() > 0
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5 * np.abs(b).max())


def test_unrolled_mixture_of_experts_equals_the_scan():
    config = qwen3.Qwen3MoeConfig(vocab_size=61, hidden_size=32, intermediate_size=48,
                                  moe_intermediate_size=24, num_hidden_layers=3,
                                  num_attention_heads=4, num_key_value_heads=2, head_dim=8,
                                  num_experts=4, num_experts_per_tok=2, mlp_only_layers=(1,))
    params, ids, mask, _ = _inputs(config, seed=3)
    scanned, unrolled = (_forward(params, ids, config=config, attention_mask=mask,
                                  scan_layers=scan) for scan in (True, False))
    np.testing.assert_allclose(np.asarray(unrolled.hidden), np.asarray(scanned.hidden), atol=1e-6)
    np.testing.assert_allclose(np.asarray(unrolled.expert_load), np.asarray(scanned.expert_load))
    np.testing.assert_allclose(np.asarray(unrolled.aux_loss), np.asarray(scanned.aux_loss),
                               rtol=1e-6)


def test_the_program_follows_the_option():
    """Scanned: one loop over the layers; unrolled: no loop at all in the forward."""
    config = tiny_config(num_hidden_layers=3)
    params, ids, mask, _ = _inputs(config)
    text = {scan: _forward.lower(params, ids, config=config, attention_mask=mask,
                                 scan_layers=scan).as_text() for scan in (True, False)}
    assert "stablehlo.while" in text[True]
    assert "stablehlo.while" not in text[False]


def test_resolve_scan_layers():
    assert qwen3.resolve_scan_layers(None, 3, "cpu") is False
    assert qwen3.resolve_scan_layers(None, qwen3.CPU_UNROLL_LAYERS, "cpu") is False
    assert qwen3.resolve_scan_layers(None, qwen3.CPU_UNROLL_LAYERS + 1, "cpu") is True
    for platform in ("gpu", "tpu"):  # accelerator programs as before: scanned
        assert qwen3.resolve_scan_layers(None, 3, platform) is True
    assert qwen3.resolve_scan_layers(True, 3, "cpu") is True
    assert qwen3.resolve_scan_layers(False, 40, "tpu") is False
    with pytest.raises(ValueError, match="scan_layers"):
        qwen3.resolve_scan_layers("yes", 3, "cpu")
    with pytest.raises(ValueError, match="scan_layers"):
        GRPOConfig(scan_layers=1)
