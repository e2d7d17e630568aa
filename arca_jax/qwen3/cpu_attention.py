"""The masked attention as a C++ kernel on CPU (an XLA FFI custom call): the same values as
`einsum_attention.masked_attention`, computed only over the key tiles a query can see.

The einsum attention computes every score of its query blocks, then masks; a packed line of
the train step (`arca_jax.packing`) holds a shared prompt and several completions, each seeing
the prompt and itself, so most of those scores are masked (the demo's batch: 227,000 visible
pairs of 1.6 million, 21% of the 16-key tiles hold any). The kernel (`csrc/packed_attention.cc`)
visits the tiles with a visible key only, 16 keys per vector, one (line, kv head) per task on
XLA's CPU thread pool. The forward takes a position's G query heads together (one mask row, each
key and value row loaded once for them, their outputs in registers); the backward recomputes the
probabilities from each query's log-sum-exp and runs over key tiles, summing a tile's key and
value gradients over chunks of the rows that see it before writing them. Against the einsum
attention on the demo's packed batch (2-core Xeon) the first version of the kernel took the ARCA
train step 622 -> 524 ms; the tile-major backward and grouped forward took one layer's forward
15.5 -> 5.7 ms and backward 48.7 -> 14.8 ms on one thread (`experiments/cpu_attention/
kernel_ab.py`), the ARCA step 710 -> 627 ms (`experiments/NOTES_vs_trl.md`). On an AVX2 host
(2-core Zen 3) the products with run-time scalars run on native-width vectors (`csrc/vec16.h`):
forward 48 -> 11 ms, backward 70 -> 17 ms there (the first version: 47 / 110 ms).

The kernel is part of the package's C++ library (`cpu_kernels`: built on first use with the
host's compiler; without one, or with `ARCA_JAX_CPU_KERNELS=0`, `cpu_kernels.available()` is
False and the model runs the einsum attention).

    if cpu_kernels.available():
        out = cpu_attention.attention(q, k, v, visible)   # head-major, float32

Dimension letters as in `arca_jax.qwen3` (S: key slots).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from arca_jax.qwen3 import cpu_kernels

_FWD, _BWD = "arca_packed_attention_fwd", "arca_packed_attention_bwd"


def _forward_call(q, k, v, visible):
    cpu_kernels.require("cpu_attention.attention")
    B, K, G, T, H = q.shape
    return jax.ffi.ffi_call(_FWD, (jax.ShapeDtypeStruct(q.shape, jnp.float32),
                                   jax.ShapeDtypeStruct((B, K, G, T), jnp.float32)),
                            vmap_method="sequential")(q, k, v, visible)


@jax.custom_vjp
def attention(q, k, v, visible):
    """softmax(q k^T / sqrt(H) where visible) v, head-major, float32: q [B, K, G, T, H], k and v
    [B, K, S, H], visible [B, T, S] bool -> [B, K, G, T, H]; a query that sees nothing averages
    every slot (`masked_attention`'s values, up to float rounding). Needs the kernels
    (`cpu_kernels.require` raises a clear error where they are not available)."""
    return _forward_call(q, k, v, visible)[0]


def _attention_fwd(q, k, v, visible):
    out, lse = _forward_call(q, k, v, visible)
    return out, (q, k, v, visible, out, lse)


def _attention_bwd(res, dout):
    q, k, v, visible, out, lse = res
    shapes = tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (q, k, v))
    dq, dk, dv = jax.ffi.ffi_call(_BWD, shapes, vmap_method="sequential")(
        q, k, v, visible, out, lse, dout.astype(jnp.float32))
    return dq, dk, dv, None


attention.defvjp(_attention_fwd, _attention_bwd)
