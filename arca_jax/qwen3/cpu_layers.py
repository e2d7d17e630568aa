"""A decode step's decoder layers and head on CPU as one C++ call (`csrc/decode_layers.cc`):
the products by the panel kernel of `cpu_matmul`, and the norms, rotary embedding, cache writes
and attention (`cache_attention.attend_cpu`'s kernel) in between, the cache written in place.

`inference_forward` runs it for a T = 1 step when every layer qualifies (`applies`): float32,
the kernels packed (`matmul="cpu-kernel"`), decode attention "cpu-kernel", one tensor shard,
dense MLPs, no separate low-rank adapter (merged adapters are fine) and a packed head. As XLA's
operations, a layer is five C++ calls, each handing part of its product to a helper of XLA's
thread pool that sleeps between calls, and some twenty-five small fusions; here the helpers are
woken once per step and stay for it (`csrc/team.h`).

    logits, row_max, block_sums, ks, vs = cpu_layers.decode_layers(
        x, weights, ks, vs, bias=..., cos=..., sin=..., index=..., filled=...,
        eps=config.rms_norm_eps, block=qwen3.SOFTMAX_BLOCK)
"""

from __future__ import annotations

from typing import Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from arca_jax.qwen3 import cpu_kernels
from arca_jax.qwen3.cpu_matmul import Panels

_TARGET = "arca_decode_layers"


def applies(weights, cache_dtype) -> bool:
    """Whether `decode_layers` runs these `InferenceWeights` over a cache of `cache_dtype`
    (static: types and dtypes)."""
    f32 = jnp.dtype(jnp.float32)
    return (weights.decode_attention == "cpu-kernel" and weights.tensor == 1
            and jnp.dtype(cache_dtype) == f32 and jnp.dtype(weights.dtype) == f32
            and isinstance(weights.lm_head, Panels)
            and all(layer.sparse_mlp is None
                    and all(isinstance(w, Panels)
                            for w in (layer.qkv, layer.o, layer.gate_up, layer.down))
                    and all(lr is None for lr in (layer.qkv_lora, layer.o_lora,
                                                  layer.gate_up_lora, layer.down_lora))
                    for layer in weights.layers))


def decode_layers(x: jax.Array, weights, ks: Sequence[jax.Array],
                  vs: Sequence[jax.Array], *, bias: jax.Array, cos: jax.Array, sin: jax.Array,
                  index: jax.Array, filled: jax.Array, eps: float,
                  block: int) -> Tuple[jax.Array, jax.Array, jax.Array, tuple, tuple]:
    """Every decoder layer of a decode step, the final norm and the head.

    Args:
      x: [B, D] float32, the new tokens' embeddings.
      weights: `InferenceWeights` for which `applies` holds.
      ks, vs: each layer's cache, [B, K, H, S] (keys transposed) and [B, K, S, H] float32.
      bias: [B, S] float32, 0 where the row sees the slot (its new one included), else a large
        negative number.
      cos, sin: [B, H] float32 rotary tables (`common.rope_tables` at the rows' positions).
      index: [B] int32, the slot each row's new key and value go to.
      filled: [] int32, no row sees a slot at or past it.
      eps: the RMS norms' epsilon.
      block: the columns per block of the softmax statistics (a multiple of 16).

    Returns:
      (logits [B, V] float32; each row's largest logit M [B]; the sums of exp(logit - M) over
      each block of `block` columns [B, ceil(V / block)]; ks, vs with row b's new key and value
      at slot index[b]); the cache is updated in place where the caller's buffers allow it (a
      loop carry).
    """
    cpu_kernels.require("cpu_layers.decode_layers")
    f32 = jnp.float32
    args = [x.astype(f32), bias.astype(f32), cos.astype(f32), sin.astype(f32),
            index.astype(jnp.int32), jnp.asarray(filled, jnp.int32),
            weights.final_norm.astype(f32), weights.lm_head.data]
    B, V = x.shape[0], weights.lm_head.columns
    out = [jax.ShapeDtypeStruct((B, V), f32), jax.ShapeDtypeStruct((B,), f32),
           jax.ShapeDtypeStruct((B, -(-V // block)), f32)]
    aliases = {}
    for layer, k, v in zip(weights.layers, ks, vs):
        qk_norm = layer.qk_norm.reshape(-1, layer.qk_norm.shape[-1]).astype(f32)  # [N + K, H]
        args += [layer.qkv.data, qk_norm, layer.o.data, layer.gate_up.data, layer.down.data]
        aliases[len(args)] = len(out)
        args.append(k)
        out.append(jax.ShapeDtypeStruct(k.shape, f32))
        aliases[len(args)] = len(out)
        args.append(v)
        out.append(jax.ShapeDtypeStruct(v.shape, f32))
    res = jax.ffi.ffi_call(_TARGET, out, input_output_aliases=aliases,
                           vmap_method="sequential")(*args, eps=np.float32(eps),
                                                     block=np.int64(block))
    return res[0], res[1], res[2], tuple(res[3::2]), tuple(res[4::2])
