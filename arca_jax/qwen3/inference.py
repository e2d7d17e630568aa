"""The decode path: the model rearranged for sampling (`inference_weights`), THE key/value cache
(`KVCache`) and `inference_forward`, which writes T new tokens into the cache and returns the
logits at the last position. The sampler (`arca_jax.sampling`) prefills and decodes with it.

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
    then down), expert-parallel over the mesh's "fsdp" axis (`experts_mesh`, `moe.mixture`); its
    dense layers (`mlp_only_layers`) run as a dense model's. Adapters on its experts and router
    are always merged into the `SparseMlp` kernels (a copy anyway: W_e + lora_scale A_e B_e).

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
from typing import Any, Optional

import flax.struct
import jax
import jax.numpy as jnp

import numpy as np

from arca_jax.qwen3 import cache_attention, cpu_kernels, cpu_layers, cpu_matmul, moe
from arca_jax.qwen3.cache_attention import attend, attend_cpu, attend_filled, attend_pallas
from arca_jax.qwen3.cpu_matmul import Panels
from arca_jax.qwen3.common import (Params, apply_rope, inv_rms, merge_adapter, per_head, rms_norm,
                                   rope_tables)
from arca_jax.qwen3.config import Qwen3Config, Qwen3MoeConfig


@flax.struct.dataclass
class LowRank:
    """A low-rank update x -> (x a) b of one projection group, `lora_scale` already folded into b.

    a: [in, R'] (the group's A matrices side by side), b: [R', out] (their B's, block-diagonal).
    """

    a: jax.Array
    b: jax.Array


@flax.struct.dataclass
class SparseMlp:
    """A mixture-of-experts layer's MLP for `inference_forward` (see `moe`): the tokens are
    normalised by `norm` and routed as in `forward` (`moe.mixture`), and the experts run as two
    grouped matmuls over the (token, expert) pairs sorted by expert.

    norm: [D] post_attention_layernorm's weight (not folded: the router reads the normalised x).
    router: [D, E]. gate_up: [E, D, 2I], per expert [W_gate | W_up]. down: [E, I, D]. Each with
    its adapter merged in (`_sparse_mlps`).
    """

    norm: jax.Array
    router: jax.Array
    gate_up: jax.Array
    down: jax.Array


@flax.struct.dataclass
class InferenceLayer:
    """One decoder layer's weights for `inference_forward` (no leading L axis).

    The kernels after a norm (qkv, gate_up, and their LoRA `a`) have that norm's weight folded into
    their rows: qkv = diag(input_layernorm) [Wq | Wk | Wv]. A mixture-of-experts model's sparse
    layers hold `sparse_mlp` instead of gate_up and down (None there). With the weights'
    `matmul` "cpu-kernel", qkv, o, gate_up and down are `cpu_matmul.Panels` of those kernels.
    """

    qkv: jax.Array  # [D, t (N/t + 2 Kt) H]: per shard s, its q heads, then k and v (`kv_heads`)
    qk_norm: jax.Array  # [t, N/t + Kt, H]: q_norm's weight per query head, then k_norm's per kv head
    o: jax.Array  # [N*H, D]
    gate_up: Optional[jax.Array]  # [D, 2F]: diag(post_attention_layernorm), per shard s [W_gate_s | W_up_s]
    down: Optional[jax.Array]  # [F, D]
    qkv_lora: Optional[LowRank] = None
    o_lora: Optional[LowRank] = None
    gate_up_lora: Optional[LowRank] = None
    down_lora: Optional[LowRank] = None
    sparse_mlp: Optional[SparseMlp] = None


@flax.struct.dataclass
class InferenceWeights:
    """The model rearranged for decoding (see `inference_weights`). A pytree; pass it into jit."""

    embed: jax.Array  # [V, D]
    layers: tuple  # L x InferenceLayer
    final_norm: jax.Array  # [D]
    # [D, V]; None when tied (then the head is `embed`, [V, D]); with `matmul` "cpu-kernel" the
    # head's `cpu_matmul.Panels` (a packed copy of embed^T when tied)
    lm_head: Any = None
    # How a T = 1 step contracts q with the cache (static): "reduce" (multiply + sum, fused over the
    # cache in its stored layout), "dot" (batched matmuls), both over the filled cache blocks
    # (`cache_attention.attend_filled`), "pallas" (`cache_attention.attend_pallas`: a GPU kernel
    # reading each row's own filled slots) or "cpu-kernel" (`cache_attention.attend_cpu`: a C++
    # kernel over the filled slots, float32). All compute the same function.
    decode_attention: str = flax.struct.field(pytree_node=False, default="reduce")
    # t, the tensor-parallel shards the fused kernels are laid out for (static; see
    # `inference_weights`).
    tensor: int = flax.struct.field(pytree_node=False, default=1)
    # A mixture-of-experts model's sparse layers run expert-parallel over this mesh's "fsdp" axis
    # (static; `moe.mixture`), or None: on the device(s) holding the rows. None for dense models.
    experts_mesh: Any = flax.struct.field(pytree_node=False, default=None)
    # How the projections and the head multiply (static; `MATMULS`): "xla" (einsum over the
    # [in, out] kernels) or "cpu-kernel" (`cpu_matmul` over the kernels packed in panels).
    matmul: str = flax.struct.field(pytree_node=False, default="xla")

    @property
    def dtype(self):
        """Activation (and cache) dtype: the embedding's, as in `forward`."""
        return self.embed.dtype


MATMULS = ("xla", "cpu-kernel")
# The columns per block of `SoftmaxStats.block_sums` (`draw.inverse_cdf`'s block).
SOFTMAX_BLOCK = 128


def default_matmul(dtype, tensor: int = 1, mesh: Any = None, platform: Optional[str] = None) -> str:
    """The `matmul` of `inference_weights` for parameters of `dtype`: "cpu-kernel" on a CPU
    backend (`platform`, default jax's) for float32 parameters without a mesh or tensor split,
    where the kernels build (`cpu_kernels.available()`); "xla" otherwise."""
    if mesh is None and tensor == 1 and cpu_kernels.usable(dtype, platform):
        return "cpu-kernel"
    return "xla"


_GROUPS = (("qkv", "self_attn", ("q_proj", "k_proj", "v_proj"), "input_layernorm"),
           ("o", "self_attn", ("o_proj",), None),
           ("gate_up", "mlp", ("gate_proj", "up_proj"), "post_attention_layernorm"),
           ("down", "mlp", ("down_proj",), None))


def kv_heads(config: Qwen3Config, tensor: int = 1) -> int:
    """K', the kv heads the cache holds for `tensor` shards: K when K % tensor == 0, else `tensor`
    (K < tensor: each shard keeps its own copy of the one kv head its query heads use)."""
    K = config.num_key_value_heads
    if K % tensor == 0:
        return K
    if tensor % K:
        raise ValueError(f"tensor={tensor} and num_key_value_heads={K}: neither divides the other")
    return tensor


def _shard_columns(config: Qwen3Config, tensor: int):
    """Static column orders of the fused kernels for `tensor` shards (numpy index arrays).

    qkv: into the concatenation [Wq | Wk | Wv] ([D, (N + 2K) H]), shard-major: shard s holds its
    N/t query heads, then its K'/t kv heads of k and of v (`kv_heads`; copies when K < t).
    qk_heads: into the [N + K] heads of q_norm / k_norm, in the same order.
    gate_up: into [W_gate | W_up] ([D, 2F]), shard s holding [gate_s | up_s].
    With tensor = 1 every order is the identity."""
    import numpy as np

    N, K, H, F = (config.num_attention_heads, config.num_key_value_heads, config.head_dim,
                  config.intermediate_size)
    t = tensor
    if N % t or F % t:
        raise ValueError(f"tensor={t} must divide num_attention_heads={N} and "
                         f"intermediate_size={F}")
    Kp = kv_heads(config, t)
    Nq, Ks, Fs = N // t, Kp // t, F // t
    src = np.arange(Kp) * K // Kp  # the kv head each cache head copies
    heads, cols, gu = [], [], []
    for s in range(t):
        q = np.arange(s * Nq, (s + 1) * Nq)
        kv = src[s * Ks:(s + 1) * Ks]
        heads += [q, N + kv]
        for h in (q, N + kv, N + K + kv):
            cols.append((h[:, None] * H + np.arange(H)[None, :]).reshape(-1))
        gu += [np.arange(s * Fs, (s + 1) * Fs), F + np.arange(s * Fs, (s + 1) * Fs)]
    return np.concatenate(cols), np.concatenate(heads), np.concatenate(gu)


def inference_weights(params: Params, config: Qwen3Config, *, lora: Optional[Params] = None,
                      lora_scale: Any = 1.0, merge_lora: bool = False,
                      decode_attention: Optional[str] = None, tensor: int = 1,
                      mesh: Any = None, matmul: Optional[str] = None) -> InferenceWeights:
    """Rearranges `params` (and an optional LoRA tree) for `inference_forward`. Pure; jit it with
    `config`, `merge_lora` and `decode_attention` static (`lora_scale` may be traced).

    The result holds a second copy of the layer kernels (fused, norm-folded, split per layer), in
    the parameters' dtype; the fold and a merge are computed in float32 and cast back once. With
    `merge_lora`, each adapted kernel is W + lora_scale * A B (as `arca_jax.lora.merge`); otherwise
    the adapter stays a low-rank pair per projection group. `decode_attention`: see
    `InferenceWeights`; None picks `cache_attention.default_decode_attention()` for the current
    backend.
    `tensor`: t, the tensor-parallel shards to lay the fused kernels out for (`_shard_columns`:
    columns shard-major, so that splitting qkv and gate_up into t equal column blocks gives each
    device whole heads and its own MLP units; `parallel.inference_shardings` places them).
    A `Qwen3MoeConfig` model's sparse layers get a `SparseMlp` (experts' gate and up concatenated,
    a second copy as the fused dense kernels are; with tensor > 1 its attention and dense MLP
    layers are laid out as a dense model's, its experts whole on every "tensor" device), whose
    router and expert adapters are merged in whatever `merge_lora` says (`_sparse_mlps`).
    `mesh`: the sampler's mesh (static), kept by a mixture-of-experts
    model's weights so that its experts run expert-parallel over "fsdp" (`experts_mesh`); ignored
    for a dense model.
    `matmul`: "xla", "cpu-kernel" (the dense kernels and the head packed in column panels for
    `cpu_matmul`: float32, no tensor split; the head of tied embeddings becomes a second, packed
    copy of the embedding), or None for `default_matmul` (static under jit).
    """
    dtype = params["embed_tokens"]["embedding"].dtype
    if decode_attention is None:
        decode_attention = cache_attention.default_decode_attention(dtype=dtype)
    if decode_attention not in cache_attention.DECODE_ATTENTION:
        raise ValueError(f"decode_attention must be one of {cache_attention.DECODE_ATTENTION}, got "
                         f"{decode_attention!r}")
    if decode_attention == "cpu-kernel" and jnp.dtype(dtype) != jnp.dtype(jnp.float32):
        raise ValueError("decode_attention 'cpu-kernel' runs float32 activations, not "
                         f"{jnp.dtype(dtype).name}")
    if decode_attention == "cpu-kernel":
        cpu_kernels.require("decode_attention 'cpu-kernel'")
    if matmul is None:
        matmul = default_matmul(dtype, tensor, mesh)
    if matmul not in MATMULS:
        raise ValueError(f"matmul must be one of {MATMULS}, got {matmul!r}")
    if matmul == "cpu-kernel" and (tensor != 1 or mesh is not None):
        raise ValueError(f"matmul 'cpu-kernel' runs unsplit kernels without a mesh (tensor="
                         f"{tensor}, mesh {'given' if mesh is not None else 'none'}): use 'xla'")
    if matmul == "cpu-kernel":
        cpu_kernels.require("matmul 'cpu-kernel'")
    is_moe = isinstance(config, Qwen3MoeConfig)
    layers_p = params["layers"]
    adapters = (lora or {}).get("layers", {})
    N, K, H = config.num_attention_heads, config.num_key_value_heads, config.head_dim
    out_dims = {"q_proj": N * H, "k_proj": K * H, "v_proj": K * H, "o_proj": config.hidden_size,
                "gate_proj": config.intermediate_size, "up_proj": config.intermediate_size,
                "down_proj": config.hidden_size}
    f32 = jnp.float32

    def kernel(block, proj, j):  # [in, out] float32: entry j of the block's stack
        w = layers_p[block][proj]["kernel"][j].astype(f32)
        ab = adapters.get(block, {}).get(proj)
        if ab is None or not merge_lora:
            return w
        ab = {"lora_a": ab["lora_a"][j], "lora_b": ab["lora_b"][j]}
        return merge_adapter(w, ab, lora_scale)  # float32 in, float32 out: the norm folds in next

    qkv_cols, qk_heads, gu_cols = _shard_columns(config, tensor)
    order = {"qkv": qkv_cols, "gate_up": gu_cols} if tensor > 1 else {}
    groups = {name: (block, projs, norm) for name, block, projs, norm in _GROUPS}

    def fused(name, i, j):
        """Layer i's fused kernel of group `name` (j: the layer's entry in the block's stack).
        Built one layer at a time rather than over the [L, ...] stacks, which bounds the float32
        temporaries by layers instead of the whole model (compiled for Qwen3-14B on 8 v5e chips
        at (1, 4, 2): 5.6 GiB of temporaries per chip, 9.1 GiB over the stacks)."""
        block, projs, norm = groups[name]
        ws = [kernel(block, p, j) for p in projs]
        w = ws[0] if len(ws) == 1 else jnp.concatenate(ws, axis=-1)
        if norm is not None:
            w = layers_p[norm]["scale"][i].astype(f32)[:, None] * w  # diag(norm) W
        if name in order:
            w = w[:, order[name]]
        return w.astype(layers_p[block][projs[0]]["kernel"].dtype)

    def packed(name, i, j):
        """`fused` packed in panels for `cpu_matmul` by one pass of the kernel library over the
        stacks (the merged kernels computed first)."""
        block, projs, norm = groups[name]
        parts = [(kernel(block, p, j)[None], 0)
                 if merge_lora and adapters.get(block, {}).get(p) is not None
                 else (layers_p[block][p]["kernel"], j) for p in projs]
        return cpu_matmul.pack_parts(parts, None if norm is None else (layers_p[norm]["scale"], i))

    make = packed if matmul == "cpu-kernel" else fused
    kinds = _mlp_kinds(config)
    low_rank = {}
    for name, block, projs, norm in _GROUPS:
        if projs[0] not in layers_p[block]:  # a mixture of experts without dense MLP layers
            low_rank[name] = None
            continue
        rows = 1.0 if norm is None else layers_p[norm]["scale"].astype(f32)[:, :, None]  # [L, D, 1]
        if is_moe and block == "mlp" and norm is not None:  # [Ld, D, 1]: the dense layers' norms
            rows = rows[np.asarray([i for i, sparse in enumerate(kinds) if not sparse])]
        pairs = {p: adapters.get(block, {}).get(p) for p in projs}
        if merge_lora or all(ab is None for ab in pairs.values()):
            low_rank[name] = None
            continue
        a_parts, b_rows = [], []
        for p, ab in pairs.items():
            if ab is None:
                continue
            a_parts.append(ab["lora_a"])  # [L, in, R]
            b = ab["lora_b"]  # [L, R, out_p]
            cols = [b if q == p else jnp.zeros(b.shape[:2] + (out_dims[q],), b.dtype) for q in projs]
            b_rows.append(jnp.concatenate(cols, axis=-1) if len(cols) > 1 else cols[0])
        a = jnp.concatenate(a_parts, axis=-1)  # [L, in, R']
        b = jnp.concatenate(b_rows, axis=-2)  # [L, R', out]
        if name in order:
            b = b[..., order[name]]
        low_rank[name] = ((rows * a.astype(f32)).astype(a.dtype),
                          (lora_scale * b.astype(f32)).astype(b.dtype))

    attn = layers_p["self_attn"]
    qk_norm = jnp.concatenate([  # [L, N+K, H]
        jnp.broadcast_to(attn["q_norm"]["scale"][:, None, :], (config.num_hidden_layers, N, H)),
        jnp.broadcast_to(attn["k_norm"]["scale"][:, None, :], (config.num_hidden_layers, K, H))], axis=1)
    qk_norm = qk_norm[:, qk_heads].reshape(config.num_hidden_layers, tensor, -1, H)  # [L, t, ., H]
    sparse = _sparse_mlps(params, config, adapters.get("mlp", {}), lora_scale) if is_moe else None
    index = _kind_index(kinds)
    layers = []
    for i in range(config.num_hidden_layers):
        j = index[i]  # the layer's place in its kind's MLP stack (i for a dense model)
        mlp = {"gate_up": None, "down": None, "sparse_mlp": None}
        if kinds[i]:
            mlp["sparse_mlp"] = jax.tree_util.tree_map(lambda w: w[j], sparse)
        else:
            mlp.update(gate_up=make("gate_up", i, j), down=make("down", i, j))
        lr = {f"{name}_lora": None if low_rank[name] is None  # MLP adapters: dense models only
              else LowRank(a=low_rank[name][0][i], b=low_rank[name][1][i]) for name, *_ in _GROUPS}
        layers.append(InferenceLayer(qkv=make("qkv", i, i), qk_norm=qk_norm[i],
                                     o=make("o", i, i), **mlp, **lr))
    embed = params["embed_tokens"]["embedding"]
    lm_head = None if config.tie_word_embeddings else params["lm_head"]["kernel"]
    if matmul == "cpu-kernel":
        lm_head = (cpu_matmul.pack(embed, transposed=True) if lm_head is None
                   else cpu_matmul.pack(lm_head))
    return InferenceWeights(
        embed=embed, layers=tuple(layers), final_norm=params["norm"]["scale"], lm_head=lm_head,
        decode_attention=decode_attention, tensor=tensor,
        experts_mesh=mesh if is_moe else None, matmul=matmul)


def _mlp_kinds(config: Qwen3Config) -> tuple:
    """Per layer: True where the MLP is sparse (a mixture of experts); all False when dense."""
    if isinstance(config, Qwen3MoeConfig):
        return config.sparse_layers
    return (False,) * config.num_hidden_layers


def _kind_index(kinds: tuple) -> tuple:
    """Per layer, its index in the MLP stack of its kind ([Ls] sparse or [Ld] dense)."""
    seen = {True: 0, False: 0}
    out = []
    for sparse in kinds:
        out.append(seen[sparse])
        seen[sparse] += 1
    return tuple(out)


def _sparse_mlps(params: Params, config: Qwen3MoeConfig, adapters: Params,
                 lora_scale: Any) -> SparseMlp:
    """The sparse layers' `SparseMlp`s stacked [Ls, ...] (gate and up concatenated per expert,
    in the parameters' dtype), each kernel with its adapter in `adapters` (the LoRA tree's
    `layers/mlp`: `router`, `experts/<proj>`) merged in: W + lora_scale A B, per expert for the
    [Ls, E, in, out] stacks, computed in float32."""
    mlp = params["layers"]["mlp"]

    def kernel(w, ab):
        return w if ab is None else merge_adapter(w, ab, lora_scale)

    expert = lambda p: kernel(mlp["experts"][p]["kernel"],  # noqa: E731
                              adapters.get("experts", {}).get(p))
    at = np.asarray([i for i, sparse in enumerate(config.sparse_layers) if sparse])
    return SparseMlp(
        norm=params["layers"]["post_attention_layernorm"]["scale"][at],
        router=kernel(mlp["router"]["kernel"], adapters.get("router")),
        gate_up=jnp.concatenate([expert("gate_proj"), expert("up_proj")], axis=-1),
        down=expert("down_proj"))


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
            attn = attend_pallas(q, kc, vc, valid, index)
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
            x = x + _sparse_mlp(x, layer.sparse_mlp, c, weights.experts_mesh)
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
