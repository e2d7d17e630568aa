"""The model rearranged for the decode path (`inference_weights` -> `InferenceWeights`): fused
q/k/v and gate/up kernels with the norms folded in, a LoRA adapter merged or kept as one
low-rank pair per group, a mixture-of-experts model's sparse layers, the tensor-parallel column
order, and on CPU the kernels packed for `cpu_matmul`. `inference.inference_forward` runs them;
its module docstring says why each rearrangement is there.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.struct
import jax
import jax.numpy as jnp

import numpy as np

from arca_jax.qwen3 import cache_attention, cpu_kernels, cpu_matmul
from arca_jax.qwen3.common import Params, merge_adapter
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
    # The sampler's mesh where a decode step runs per-device programs (static; None: the rows'
    # own devices): a mixture-of-experts model's sparse layers expert-parallel over its "fsdp"
    # axis (`moe.mixture`), and the "pallas" attention per device (`attend_pallas`'s mesh).
    mesh: Any = flax.struct.field(pytree_node=False, default=None)
    # How the projections and the head multiply (static; `MATMULS`): "xla" (einsum over the
    # [in, out] kernels) or "cpu-kernel" (`cpu_matmul` over the kernels packed in panels).
    matmul: str = flax.struct.field(pytree_node=False, default="xla")

    @property
    def dtype(self):
        """Activation (and cache) dtype: the embedding's, as in `forward`."""
        return self.embed.dtype


MATMULS = ("xla", "cpu-kernel")


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
    `mesh`: the sampler's mesh (static), kept (`InferenceWeights.mesh`) by a mixture-of-experts
    model's weights so that its experts run expert-parallel over "fsdp", and with "pallas" so
    that the kernel runs on each device's rows and kv heads; ignored otherwise.
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
        mesh=mesh if is_moe or decode_attention == "pallas" else None, matmul=matmul)


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
