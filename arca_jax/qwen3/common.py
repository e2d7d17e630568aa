"""What the training model (`model`) and the inference path (`inference`) share: the parameter
tree's names, rotary embeddings and the RMS normalisation."""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp

Params = Mapping[str, Any]

ATTN_PROJS = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_PROJS = ("gate_proj", "up_proj", "down_proj")
PROJ_BLOCK = {**{p: "self_attn" for p in ATTN_PROJS}, **{p: "mlp" for p in MLP_PROJS}}


def default_positions(attention_mask: jax.Array) -> jax.Array:
    """cumsum(mask) - 1, clipped at 0 for left padding. [B, T] int32."""
    return jnp.maximum(jnp.cumsum(attention_mask.astype(jnp.int32), axis=-1) - 1, 0)


def rope_tables(positions: jax.Array, head_dim: int, theta: float):
    """cos, sin [B, T, H] float32 for integer positions [B, T] (rotate-half layout).

    The H / 2 distinct angles' cos and sin are computed once, behind an optimization barrier:
    without it XLA fuses their computation into every consumer (each layer's rotary embedding of
    q and k, forward and backward), evaluating them per head and per layer; on CPU, where a
    cosine costs ~10x an exponential, that was ~10% of the demo's train step."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, H/2]
    cos, sin = jax.lax.optimization_barrier((jnp.cos(freqs), jnp.sin(freqs)))
    return jnp.concatenate([cos, cos], axis=-1), jnp.concatenate([sin, sin], axis=-1)


def per_head(table: jax.Array, dtype) -> jax.Array:
    """A [B, T, H] float32 rotary table as [B, T, 1, H] in `dtype` (cast first, as HF)."""
    return table[:, :, None, :].astype(dtype)


def _rotate_half(x):
    h = x.shape[-1] // 2
    return jnp.concatenate([-x[..., h:], x[..., :h]], axis=-1)


def apply_rope(x, cos, sin):
    """x [B, T, heads, H] rotated by `per_head` tables cos, sin [B, T, 1, H] in x's dtype."""
    return x * cos + _rotate_half(x) * sin


def inv_rms(x, eps):
    """1 / rms(x) over the last axis, float32, keepdims."""
    x32 = x.astype(jnp.float32)
    return jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)


def rms_norm(x, scale, eps, dtype=None):
    """scale * (x / rms(x)): statistics in float32, cast to `dtype` (default x's) before the
    weight is applied, as HF."""
    dtype = x.dtype if dtype is None else dtype
    x32 = x.astype(jnp.float32)  # one cast: its gradient is accumulated in float32, as HF
    normed = x32 * inv_rms(x32, eps)
    return scale.astype(dtype) * normed.astype(dtype)


def merge_adapter(w: jax.Array, ab: Params, scale: Any) -> jax.Array:
    """W + scale * A B in W's dtype, computed in float32: w [..., I, O], ab {'lora_a' [..., I, R],
    'lora_b' [..., R, O]} (leading axes: layers, experts)."""
    delta = jnp.einsum("...IR,...RO->...IO", ab["lora_a"].astype(jnp.float32),
                       ab["lora_b"].astype(jnp.float32))
    return (w.astype(jnp.float32) + scale * delta).astype(w.dtype)

