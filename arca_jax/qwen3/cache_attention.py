"""Attention of new tokens over the key/value cache, the decode path's one hot loop: the variants
`inference_forward` picks from (`InferenceWeights.decode_attention`) and the cache sizes they need.

  "reduce"      multiply-and-sum contractions over the cache in its stored layout (CPU: fewer
                kernels);
  "dot"         einsum contractions;
  "pallas"      jax's Pallas GPU decode kernel, each row reading only its own filled slots;
  "cpu-kernel"  a C++ kernel on CPU (`attend_cpu`; float32, the cache in "reduce"'s layout).

Decode steps ("reduce", "dot") attend over the filled prefix of the cache only, in blocks of
`DECODE_BLOCK` slots (`attend_filled`); "cpu-kernel" over the slots before the longest row's
count. Shapes use `arca_jax.qwen3`'s letters; S cache slots.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from arca_jax import parallel
from arca_jax.qwen3 import cpu_kernels

DECODE_ATTENTION = ("reduce", "dot", "pallas", "cpu-kernel")


def default_decode_attention(platform: Optional[str] = None, devices: int = 1,
                             dtype=None) -> str:
    """The decode attention for `platform` (None: jax's default backend) with the sampler on
    `devices` devices and activations of `dtype`: on CPU "cpu-kernel" for float32 on one device
    where the C++ kernels build (`cpu_kernels.available()`), else "reduce" (fewer kernels per
    step than "dot"); "pallas" on GPUs (on a mesh, per device: `attend_pallas`); "dot" elsewhere
    (TPU). On an H200 (Qwen3-1.7B shapes, 128 + 512 tokens, 2026-12-01) a decode
    step took 2.73 ms with "pallas" against 5.20 ms with "dot" at batch 64, 6.09 against 13.04
    ms at batch 256 ("dot"'s switch over filled blocks costs more there than it saves;
    experiments/NOTES_sampling.md)."""
    platform = platform or jax.default_backend()
    if platform == "cpu":
        if devices == 1 and dtype is not None and cpu_kernels.usable(dtype, platform):
            return "cpu-kernel"
        return "reduce"
    return "pallas" if platform in ("gpu", "cuda", "rocm") else "dot"


# Decode steps attend over the filled prefix of the cache, rounded up to a multiple of this many
# slots (`attend_filled`): one compiled branch per multiple.
DECODE_BLOCK = 32

# "reduce" (XLA:CPU) copies each branch's filled prefix out of the cache for its reduction; in
# a cache of fewer blocks than this the copies cost more than the slots they skip, and the step
# reads the whole cache (CPU, 2026-12-02: the demo rollout, 112 slots, 13-17% faster without the
# switch; 96 slots at batch 16 the same; 480 slots 7% slower; experiments/NOTES_sampling.md).
REDUCE_MIN_BLOCKS = 8


def transposed_keys(decode_attention: str) -> bool:
    """Whether the cache that `decode_attention` reads keeps its keys [B, K, H, S] rather than
    [B, K, S, H] (`qwen3.KVCache`): "reduce" does, so that its q . k sum runs over the
    second-minor axis, vectorised along the slots, instead of a horizontal sum over each slot's
    H values (XLA:CPU, 2026-12-03: 20-28% less time per layer and decode step at the CPU demo's
    shapes, `experiments/bench_decode_attention.py`; the demo rollout 0.44 -> 0.35 s;
    experiments/NOTES_sampling.md); "cpu-kernel" reads that layout too. The Pallas kernel reads
    [B, K, S, H]."""
    return decode_attention in ("reduce", "cpu-kernel")


@functools.partial(jax.jit, static_argnames=("decode_attention", "block"))
def attend_filled(q, k, v, bias, decode_attention: str, filled, block: int):
    """`attend` of one new token (T = 1) over the first ceil(filled / block) blocks of `block`
    slots (`DECODE_BLOCK`) of the cache only: a `lax.switch` over the block counts, each branch
    reading a static prefix ("reduce" in a cache of fewer than `REDUCE_MIN_BLOCKS` blocks: the
    whole cache). Slots at or beyond `filled` [] int32 (the longest row's) are masked
    anyway (their bias is float32 min, so their softmax weight is exactly 0): the result equals
    attention over the whole cache.

    Jitted so that, inside the decode program, every layer calls one traced and lowered switch
    (XLA inlines the call); traced per layer, a 28-layer model with 1,024 cache slots built 896
    branches per decode program (experiments/NOTES_sampling.md, "Tracing the decode program")."""
    S = v.shape[2]
    blocks = -(-S // block)
    if blocks <= 1 or (decode_attention == "reduce" and blocks < REDUCE_MIN_BLOCKS):
        return attend(q, k, v, bias, decode_attention)
    keys = transposed_keys(decode_attention)

    def branch(j):
        n = min((j + 1) * block, S)
        return lambda q, k, v, bias: attend(q, k[..., :n] if keys else k[:, :, :n], v[:, :, :n],
                                             bias[..., :n], decode_attention)

    index = jnp.clip((filled + block - 1) // block - 1, 0, blocks - 1)
    return jax.lax.switch(index, [branch(j) for j in range(blocks)], q, k, v, bias)


# The Pallas decode kernel splits the cache into chunks of a power-of-two length (at least 16,
# at most this; `pallas_chunk`) that the GPU runs in parallel, and loops over blocks of at most
# PALLAS_BLOCK slots inside each chunk.
PALLAS_CHUNK = 128
PALLAS_BLOCK = 64


def pallas_chunk(needed: int) -> int:
    """Slots per chunk of the "pallas" kernel for a cache of `needed` positions: PALLAS_CHUNK, or
    for a shorter cache the power of two (at least 16) that covers it, so one chunk."""
    return max(16, min(PALLAS_CHUNK, 1 << max(int(needed) - 1, 0).bit_length()))


def cache_size(needed: int, decode_attention: str) -> int:
    """Slots to allocate for `needed` positions: for "pallas", a multiple of its chunk
    (`pallas_chunk`; 640 for 128 + 512 tokens in chunks of 128). The extra slots are never valid,
    so never attended to, and the kernel reads only each row's filled slots: a longer chunk adds
    memory, not reads."""
    if decode_attention != "pallas":
        return needed
    chunk = pallas_chunk(needed)
    return -(-needed // chunk) * chunk


def attend_pallas(q, k, v, valid, index, mesh=None):
    """Attention of one new token (T = 1) with jax's Pallas GPU decode kernel
    (`jax.experimental.pallas.ops.gpu.decode_attention`), run per (row, kv head) on the cache in
    its stored layout: row b reads slots first[b] .. index[b] only (first: its first valid slot),
    in blocks of `PALLAS_BLOCK`, split into chunks the GPU runs in parallel and combines.
    Equals `attend` when each row's valid slots are one run ending at `index` (left-padded
    prompt, then the row's tokens: what the sampler writes). q [B, 1, N, H]; k, v [B, K, S, H]
    with S a multiple of 16 (`cache_size`); valid [B, S] bool; index [B] the new token's slot.
    With a `mesh` of several devices the kernel runs on each device's part (`shard_map`): its
    rows (as `parallel.batch_spec`) and, with tensor > 1, its kv heads and their query heads
    (as `parallel.cache_shardings` and the shard-major q layout). Off GPU the kernel runs in
    Pallas' interpreter (slow; for tests). Returns [B, 1, N*H]."""
    from jax.experimental.pallas.ops.gpu import decode_attention as kernel

    if mesh is not None and mesh.devices.size > 1:
        rows = parallel.row_axes(q.shape[0], mesh)
        t = parallel.axis_size(mesh, parallel.TENSOR)
        heads = parallel.TENSOR if t > 1 and k.shape[1] % t == 0 else None
        return jax.shard_map(
            attend_pallas, mesh=mesh,
            in_specs=(P(rows, None, heads), P(rows, heads), P(rows, heads), P(rows), P(rows)),
            out_specs=P(rows, None, heads),
            check_vma=False)(q, k, v, valid, index)  # a pallas_call's outputs carry no axis types

    B, _, N, H = q.shape
    K, S = k.shape[1], k.shape[2]
    if S % 16:
        raise ValueError(f"decode_attention='pallas' needs a cache of a multiple of 16 slots, "
                         f"got {S} (allocate `cache_size(...)` slots)")
    chunk = min(PALLAS_CHUNK, S & -S)  # `pallas_chunk` for a cache of `cache_size` slots
    one = functools.partial(kernel.decode_attn_unbatched, sm_scale=H ** -0.5, block_h=16,
                            block_k=min(chunk, PALLAS_BLOCK), k_splits=S // chunk,
                            num_warps=None, num_stages=2, grid=None,
                            interpret=jax.default_backend() != "gpu", debug=False,
                            return_residuals=False, normalize_output=True)
    first = jnp.argmax(valid, axis=1).astype(jnp.int32)  # [B]
    each_head = lambda x: jnp.broadcast_to(x[:, None], (B, K))
    out = jax.vmap(jax.vmap(one))(q.reshape(B, K, N // K, H), k, v, each_head(first),
                                  each_head(index + 1))  # [B, K, G, H]
    return out.reshape(B, 1, N * H)


def attend_cpu(q, k, v, bias, filled):
    """`attend` of one new token (T = 1) by the C++ kernel (`csrc/decode_attention.cc`), over
    the slots before `filled` [] int32 (the longest row's count: no row sees a later slot) only.
    q [B, 1, N, H]; k [B, K, H, S] (`transposed_keys`); v [B, K, S, H]; bias [B, 1, S]; float32.
    Returns [B, 1, N*H] in q's dtype. Needs the kernels (`cpu_kernels.require`)."""
    cpu_kernels.require("attend_cpu")
    B, _, N, H = q.shape
    K, S = k.shape[1], k.shape[3]
    f32 = jnp.float32
    out = jax.ffi.ffi_call("arca_decode_attention", jax.ShapeDtypeStruct((B, K, N // K, H), f32),
                           vmap_method="sequential")(
        q.reshape(B, K, N // K, H).astype(f32), k.astype(f32), v.astype(f32),
        bias.reshape(B, S).astype(f32), jnp.asarray(filled, jnp.int32))
    return out.astype(q.dtype).reshape(B, 1, N * H)


def attend(q, k, v, bias, decode_attention: str):
    """Grouped-query attention of q [B, T, N, H] over the cache k, v [B, K, S, H] (k [B, K, H, S]
    for "reduce": `transposed_keys`) with an additive mask bias [B, T, S] (0 or float32 min);
    returns [B, T, N*H] in q's dtype. Scores and softmax in float32, the probabilities cast to q's
    dtype before they weight v (as `Attention`).

    For T = 1 with decode_attention "reduce", both contractions are a multiply and a sum, which XLA
    fuses into one pass over the cache each, in its stored layout; as matmuls ("dot") XLA CPU first
    transposes the small operands (on the CPU benchmark model, 140 kernels per decode step instead
    of 110)."""
    B, T, N, H = q.shape
    K = k.shape[1]
    G = N // K
    f32 = jnp.float32
    if T == 1 and decode_attention == "reduce":  # k [B, K, H, S]: summed over its second-minor H
        q1 = q.reshape(B, K, G, H).astype(f32)
        scores = jnp.sum(q1[..., None] * k.astype(f32)[:, :, None], axis=-2)  # [B, K, G, S]
        scores = scores * (H ** -0.5) + bias[:, None, :, :]  # bias [B, 1, 1, S]
        probs = jax.nn.softmax(scores, axis=-1).astype(q.dtype).astype(f32)
        out = jnp.sum(probs[..., None] * v.astype(f32)[:, :, None, :, :], axis=-2)  # [B, K, G, H]
        return out.astype(q.dtype).reshape(B, 1, N * H)
    qs = q.reshape(B, T, K, G, H)
    if transposed_keys(decode_attention):  # a prefill (T > 1): back to [B, K, S, H], in float32
        # (exact products, float32 sums as below): XLA:CPU folds the swap into a bfloat16 matmul
        # with float32 output that it cannot run
        qs, k = qs.astype(f32), jnp.swapaxes(k, 2, 3).astype(f32)
    scores = jnp.einsum("BTKGH,BKSH->BKGTS", qs, k, preferred_element_type=f32) * (H ** -0.5)
    probs = jax.nn.softmax(scores + bias[:, None, None], axis=-1).astype(q.dtype)
    return jnp.einsum("BKGTS,BKSH->BTKGH", probs, v).reshape(B, T, N * H)
