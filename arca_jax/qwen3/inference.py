"""The decode path: THE key/value cache (`KVCache`) and `inference_forward`, which writes T new
tokens into the cache and returns the logits at the last position, over the model rearranged
for sampling (`decode_weights.inference_weights`). The sampler (`arca_jax.sampling`) prefills and
decodes with it.

The sampler runs the model hundreds of times per batch at T = 1, where a step's cost is the number
of kernels it launches (CPU; GPU launch gaps) and the bytes it reads (GPU), not its arithmetic.
`inference_forward` computes the same function as `forward` (the tests hold the two to 1e-4 in
float32 at every decode step) with fewer, larger operations:
  - q/k/v share one [D, (N+2K)H] matmul and gate/up one [D, 2F] matmul (concatenated once per
    `inference_weights` call, outside the decode loop; the parameter tree is untouched);
  - each RMSNorm weight before a projection is folded into the kernel's rows, diag(w) W, and the
    per-row 1/rms multiplies the matmul's output: no normalised copy of x is written;
  - q_norm and k_norm run as one normalisation over the N + K heads, with rotary in the same pass;
  - a LoRA adapter is either merged into those kernels (one matmul per projection group) or kept
    as one low-rank pair per group: A's side by side, B's block-diagonal, `lora_scale` folded in;
  - layers are unrolled over per-layer weight and cache arrays, so a step never slices a stacked
    [L, ...] array (on GPU such a dynamic slice feeding a matmul is a copy of the operand);
  - the cache is [B, K, S, H] per layer, each row written in place at its own position (one
    scatter on the loop carry, `_write_rows`) and read in that layout, the padding mask is one
    additive bias per call;
  - the last layer after its keys and values (attention, o, MLP), the final norm and the head
    run on the last position only: no later layer reads the other positions' outputs;
  - on CPU in float32 (`matmul="cpu-kernel"`, the default there), every kernel and the head are
    packed once in column panels and multiplied by a C++ kernel (`cpu_matmul`): XLA's dot
    repacks its weight operand on every call, which at a decode step's few rows costs about as
    much as the multiply;
  - a mixture-of-experts layer (`SparseMlp`) normalises x, routes every token as `forward` does
    (`moe.mixture`: router, float32 softmax, top-k, pairs sorted by expert; at prefill and at
    T = 1 alike) and runs its experts as two `jax.lax.ragged_dot`s (gate and up fused, [E, D, 2I],
    then down), expert-parallel over the mesh's "fsdp" axis (`InferenceWeights.mesh`,
    `moe.mixture`); its dense layers (`mlp_only_layers`) run as a dense model's. Adapters on its
    experts and router are always merged into the `SparseMlp` kernels (a copy anyway:
    W_e + lora_scale A_e B_e).

Measured on the CPU benchmark model (experiments/NOTES_sampling.md): one decode step of the
sampler went from 406 kernels (the first version, since removed: the linen forward over a stacked
[L, ...] cache, threefry per step) to 110; filled-block attention made it 137, and the per-row
write positions continuous refill needs 155 (2026-11-30). The mixture-of-experts branch left the
dense model's compiled programs unchanged (same HLO, 2026-12). With the C++ kernels (the packed
matmuls, the decode attention) a step is 131 operations, 21 of them the kernels' calls, and the
decode loop ran 1.6-2.1x faster than on XLA's own operations (2026-12-03, four runs of
`bench_sampling.py`).
"""

from __future__ import annotations

import functools
from typing import Optional

import flax.struct
import jax
import jax.numpy as jnp

from arca_jax.qwen3 import cache_attention, cpu_layers, cpu_matmul, moe
from arca_jax.qwen3.cache_attention import attend, attend_cpu, attend_filled, attend_pallas
from arca_jax.qwen3.common import apply_rope, inv_rms, per_head, rms_norm, rope_tables
from arca_jax.qwen3.config import Qwen3Config, Qwen3MoeConfig
from arca_jax.qwen3.cpu_matmul import Panels
from arca_jax.qwen3.decode_weights import InferenceWeights, LowRank, SparseMlp, kv_heads

# The columns per block of `SoftmaxStats.block_sums` (`draw.inverse_cdf`'s block).
SOFTMAX_BLOCK = 128


@flax.struct.dataclass
class KVCache:
    """The key/value cache of `inference_forward`: fixed-size buffers, one pair per layer, and the
    next write slot. A pytree; returned, never mutated.

    k:     tuple of L arrays in the activation dtype, [B, K', S, H], or [B, K', H, S] when
           `transposed_keys` (K' = `kv_heads(config, tensor)`: K, or one copy per tensor shard
           when K < tensor).
    v:     tuple of L arrays [B, K', S, H].
    valid: [B, S] bool, slots holding a real (non-padding) token.
    index: [B] int32, the slot each row's next token is written to (rows advance on their own:
           the sampler refills a row's cache with a new prompt while the others decode).
    transposed_keys (static): the keys' layout, chosen by the decode attention that reads them
           (`cache_attention.transposed_keys`).
    """

    k: tuple
    v: tuple
    valid: jax.Array
    index: jax.Array
    transposed_keys: bool = flax.struct.field(pytree_node=False, default=False)

    @classmethod
    def init(cls, config: Qwen3Config, batch: int, size: int, dtype=jnp.float32,
             tensor: int = 1, transposed_keys: bool = False) -> "KVCache":
        shape = (batch, kv_heads(config, tensor), size, config.head_dim)
        key_shape = shape[:2] + shape[:1:-1] if transposed_keys else shape
        L = config.num_hidden_layers
        return cls(k=tuple(jnp.zeros(key_shape, dtype) for _ in range(L)),
                   v=tuple(jnp.zeros(shape, dtype) for _ in range(L)),
                   valid=jnp.zeros((batch, size), bool), index=jnp.zeros((batch,), jnp.int32),
                   transposed_keys=transposed_keys)

    @property
    def size(self) -> int:
        """S, the number of slots."""
        return self.valid.shape[1]

    @property
    def key_slot_axis(self) -> int:
        """The slot axis of each k array: 3 when `transposed_keys`, else 2."""
        return 3 if self.transposed_keys else 2


@flax.struct.dataclass
class SoftmaxStats:
    """Softmax statistics of logits [B, V] that the model computed with them (a decode step on
    CPU, `cpu_layers`): max [B], each row's largest logit M; block_sums [B, ceil(V / block)],
    the sums of exp(logit - M) over each block of `block` (static) columns."""

    max: jax.Array
    block_sums: jax.Array
    block: int = flax.struct.field(pytree_node=False, default=SOFTMAX_BLOCK)


@flax.struct.dataclass
class InferenceOutput:
    """logits [B, V] float32 at the last input position; the updated cache; `softmax`, the
    logits' `SoftmaxStats` where the step computed them (else None)."""

    logits: jax.Array
    cache: KVCache
    softmax: Optional[SoftmaxStats] = None


def _project(x, w, low_rank: Optional[LowRank], out_dtype):
    """x [B, T, in] @ w [in, out] (`Panels` or an array) (+ (x a) b), accumulated in float32,
    returned in `out_dtype`."""
    if isinstance(w, Panels):
        y = cpu_matmul.matmul(x, w)
    else:
        y = jnp.einsum("BTI,IO->BTO", x, w.astype(x.dtype), preferred_element_type=jnp.float32)
    if low_rank is not None:
        xa = jnp.einsum("BTI,IR->BTR", x.astype(low_rank.a.dtype), low_rank.a)
        y = y + jnp.einsum("BTR,RO->BTO", xa, low_rank.b, preferred_element_type=jnp.float32)
    return y.astype(out_dtype)


@functools.partial(jax.jit, static_argnames="axis")
def _write_rows(buf: jax.Array, new: jax.Array, index: jax.Array, axis: int) -> jax.Array:
    """buf [B, ..., S, ...] with row b's `new` [B, ..., T, ...] written at slots index[b] ..
    index[b] + T - 1 along `axis` (the slot axis, counted with B). One scatter of the new values
    (in place on a donated loop carry); the caller keeps index[b] + T <= S. Jitted: the layers'
    key and value writes share one trace (XLA inlines the call). When T = S (a prompt's own
    cache at prefill) every index is 0 and `new` is the result: no scatter into `buf`."""
    if new.shape[axis] == buf.shape[axis]:
        return new.astype(buf.dtype)
    def put(b, x, i):
        start = [jnp.zeros((), jnp.int32)] * b.ndim
        start[axis - 1] = i
        return jax.lax.dynamic_update_slice(b, x, start)
    return jax.vmap(put)(buf, new, index)


def _grouped_swiglu(kernels, rows: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """The experts' SwiGLU over (token, expert) pair rows [P, D] sorted by expert: kernels
    (gate_up [E', D, 2I], down [E', I, D]), group_sizes [E'] -> [P, D]: two
    `jax.lax.ragged_dot`s (gate and up in one; then down)."""
    gate_up, down = kernels
    gu = jax.lax.ragged_dot(rows, gate_up.astype(rows.dtype), group_sizes)  # [P, 2I]
    I = down.shape[1]
    h = jax.nn.silu(gu[:, :I]) * gu[:, I:]
    return jax.lax.ragged_dot(h, down.astype(rows.dtype), group_sizes)


def _sparse_mlp(x: jax.Array, w: SparseMlp, config: Qwen3MoeConfig, mesh=None) -> jax.Array:
    """A sparse layer's MLP update of x [B, T, D] (each of the B T tokens routed on its own, as in
    `forward`: `moe.mixture`, expert-parallel on `mesh`) -> [B, T, D] in x's dtype."""
    B, T, D = x.shape
    rows = rms_norm(x, w.norm, config.rms_norm_eps).reshape(B * T, D)
    mix = moe.mixture(rows, moe.router_logits(rows, w.router), (w.gate_up, w.down),
                      _grouped_swiglu, config, mesh)
    return mix.y.reshape(B, T, D)


def _head(weights: InferenceWeights, last: jax.Array) -> jax.Array:
    """The final-normed last positions [B, D] -> logits [B, V] float32."""
    if isinstance(weights.lm_head, Panels):
        return cpu_matmul.matmul(last, weights.lm_head)
    f32 = jnp.float32
    if weights.lm_head is None:  # tied: the embedding [V, D]
        return jnp.einsum("BD,VD->BV", last, weights.embed.astype(last.dtype),
                          preferred_element_type=f32)
    return jnp.einsum("BD,DV->BV", last, weights.lm_head.astype(last.dtype),
                      preferred_element_type=f32)


def inference_forward(weights: InferenceWeights, input_ids: jax.Array, *, config: Qwen3Config,
                      positions: jax.Array, attention_mask: jax.Array,
                      cache: KVCache) -> InferenceOutput:
    """The model over T new tokens written at `cache.index`; logits at the last position only.

    The logits equal those of `forward` over the whole sequence so far (cached tokens, then these)
    at its last position, up to float rounding (no dropout; LoRA as prepared by
    `inference_weights`). Pure: jit it with `config` static.

    Args:
      weights: from `inference_weights`.
      input_ids: [B, T] int tokens (T = prompt width for a prefill, 1 for a decode step).
      positions: [B, T] int rotary positions (`default_positions` of the prompt mask; then each
        row's running count).
      attention_mask: [B, T] 1 for real tokens; 0 slots are never attended to.
      cache: `KVCache` with at least max(cache.index) + T slots, its keys laid out for the
        weights' decode attention (`cache_attention.transposed_keys`).

    Returns:
      InferenceOutput(logits [B, V] float32 for the token at T - 1, cache with the T tokens written
      and index advanced by T).
    """
    if cache.transposed_keys != cache_attention.transposed_keys(weights.decode_attention):
        raise ValueError(
            f"the cache's keys are laid out for decode_attention "
            f"{'reduce' if cache.transposed_keys else 'dot/pallas'}, the weights' is "
            f"{weights.decode_attention!r}: make it with KVCache.init(..., transposed_keys="
            f"qwen3.transposed_keys(weights.decode_attention))")
    c = config
    B, T = input_ids.shape
    N, H, F = c.num_attention_heads, c.head_dim, c.intermediate_size
    t = weights.tensor
    Kp = kv_heads(c, t)  # cache heads
    Nq, Ks = N // t, Kp // t  # per shard
    S = cache.size
    dtype = weights.dtype
    f32 = jnp.float32
    index = cache.index  # [B]
    valid = _write_rows(cache.valid, attention_mask.astype(bool), index, axis=1)
    query_slot = index[:, None] + jnp.arange(T, dtype=jnp.int32)  # [B, T]
    visible = valid[:, None, :] & (jnp.arange(S, dtype=jnp.int32)[None, None, :] <= query_slot[:, :, None])
    bias = jnp.where(visible, 0.0, jnp.finfo(f32).min).astype(f32)  # [B, T, S]
    cos, sin = rope_tables(positions, H, c.rope_theta)  # [B, T, H]
    cos, sin = per_head(cos, dtype), per_head(sin, dtype)

    x = jnp.take(weights.embed, input_ids, axis=0, mode="clip").astype(dtype)  # [B, T, D]
    new_k, new_v = [], []
    last_layer = len(weights.layers) - 1
    logits = softmax = None
    if T == 1 and cpu_layers.applies(weights, cache.k[0].dtype):
        # a decode step on CPU: the layers, the head and its softmax statistics as one C++ call
        logits, row_max, block_sums, new_k, new_v = cpu_layers.decode_layers(
            x[:, 0], weights, cache.k, cache.v, bias=bias[:, 0], cos=cos[:, 0, 0],
            sin=sin[:, 0, 0], index=index, filled=jnp.max(index) + 1, eps=c.rms_norm_eps,
            block=SOFTMAX_BLOCK)
        softmax = SoftmaxStats(max=row_max, block_sums=block_sums, block=SOFTMAX_BLOCK)
    stack = () if logits is not None else zip(weights.layers, cache.k, cache.v)
    for i, (layer, k_cache, v_cache) in enumerate(stack):
        # input_layernorm folded into qkv: norm(x) W = (x diag(w) W) / rms(x)
        qkv = _project(x, layer.qkv, layer.qkv_lora, f32) * inv_rms(x, c.rms_norm_eps)
        qkv = qkv.reshape(B, T, t, Nq + 2 * Ks, H)  # shard-major (`_shard_columns`)
        qk = apply_rope(rms_norm(qkv[:, :, :, :Nq + Ks], layer.qk_norm, c.rms_norm_eps, dtype),
                        cos[:, :, None], sin[:, :, None])
        q = qk[:, :, :, :Nq].reshape(B, T, N, H)
        k = qk[:, :, :, Nq:].reshape(B, T, Kp, H)
        v = qkv[:, :, :, Nq + Ks:].astype(dtype).reshape(B, T, Kp, H)
        k_new = k.transpose((0, 2, 3, 1) if cache.transposed_keys else (0, 2, 1, 3))
        k_cache = _write_rows(k_cache, k_new.astype(k_cache.dtype), index, axis=cache.key_slot_axis)
        v_cache = _write_rows(v_cache, v.transpose(0, 2, 1, 3).astype(v_cache.dtype), index, axis=2)
        new_k.append(k_cache)
        new_v.append(v_cache)
        kc, vc = k_cache.astype(dtype), v_cache.astype(dtype)
        if i == last_layer and T > 1:
            # only position T - 1 leaves the last layer (its logits); every position's keys and
            # values are written above, so the rest of the layer runs on that one position
            q, bias, x = q[:, -1:], bias[:, -1:], x[:, -1:]
        if T == 1 and weights.decode_attention == "pallas":
            attn = attend_pallas(q, kc, vc, valid, index, mesh=weights.mesh)
        elif T == 1 and weights.decode_attention == "cpu-kernel":
            attn = attend_cpu(q, kc, vc, bias, jnp.max(index) + 1)
        elif T == 1:  # a decode step: only the filled part of the cache
            attn = attend_filled(q, kc, vc, bias, weights.decode_attention, jnp.max(index) + 1,
                                 cache_attention.DECODE_BLOCK)
        else:
            attn = attend(q, kc, vc, bias, "dot" if weights.decode_attention == "pallas" else
                          weights.decode_attention)
        x = x + _project(attn, layer.o, layer.o_lora, dtype)

        if layer.sparse_mlp is not None:
            x = x + _sparse_mlp(x, layer.sparse_mlp, c, weights.mesh)
            continue
        gu = _project(x, layer.gate_up, layer.gate_up_lora, f32) * inv_rms(x, c.rms_norm_eps)
        gu = gu.reshape(B, x.shape[1], t, 2, F // t)  # shard-major [gate_s | up_s]
        h = (jax.nn.silu(gu[:, :, :, 0].astype(dtype)) * gu[:, :, :, 1].astype(dtype)).reshape(
            B, x.shape[1], F)
        x = x + _project(h, layer.down, layer.down_lora, dtype)

    if logits is None:
        logits = _head(weights, rms_norm(x[:, -1], weights.final_norm, c.rms_norm_eps))
    new_cache = cache.replace(k=tuple(new_k), v=tuple(new_v), valid=valid, index=index + T)
    return InferenceOutput(logits=logits, cache=new_cache, softmax=softmax)
