"""Qwen3 mixture of experts: the sparse MLP block, its routing statistics, and how a stack of
sparse and dense decoder layers is split into scanned segments.

Dimension letters as in `arca_jax.qwen3`, plus E experts, I expert width, k experts routed per
token, M = B * T token rows, Ls / Ld the sparse / dense layers.

The block (transformers' `Qwen3MoeSparseMoeBlock`): router logits x Wr in the activation dtype,
softmax in float32, the top k probabilities (renormalised to sum 1 when `norm_topk_prob`) weight
the k experts' SwiGLU outputs. No token is dropped: the M * k (token, expert) pairs are sorted by
expert and each expert's projection is one group of `jax.lax.ragged_dot` over its contiguous run
of rows, so the work is the routed rows' only (on TPU and GPU, where XLA has a ragged dot; XLA:CPU
has none and jax's CPU rollout masks the rows per group, which is fine at test sizes).

Parameter tree of a sparse layer (stacked on a leading Ls axis under `layers/mlp`), and its
optional LoRA tree (`arca_jax.lora`, targets "gate" and "gate_proj" / "up_proj" / "down_proj"):

    router/kernel                   [D, E]         router/{lora_a [D, R], lora_b [R, E]}
    experts/{gate,up}_proj/kernel   [E, D, I]      experts/{gate,up}_proj/{lora_a [E, D, R],
                                                                           lora_b [E, R, I]}
    experts/down_proj/kernel        [E, I, D]      experts/down_proj/{lora_a [E, I, R], lora_b [E, R, D]}

The router's adapter adds lora_scale (x A) B to the logits; each expert's adapter is applied
inside the grouped matmul, to the rows routed to that expert only (`grouped_project`: two more
`ragged_dot`s, through A_e to [P, R] and back through B_e). No adapter input dropout there (as
PEFT's adapters on transformers' fused expert parameters: `check_lora`).

Heterogeneous stacks (`mlp_only_layers`, `decoder_sparse_step` > 1): attention and norms stay
stacked over all L layers (`layers/self_attn/...` [L, ...], so attention LoRA trees and PEFT
adapters are exactly the dense model's), the dense layers' MLPs are stacked [Ld, ...] under
`layers/mlp/{gate,up,down}_proj` and the sparse layers' [Ls, ...] under `layers/mlp/{router,
experts}`. `segments` cuts the layers into maximal runs of one kind, in layer order; the forward
scans each run over its slice of the stacks. The released models (every layer sparse) are one
segment: one scan, no slicing, compile time independent of depth; a run-per-kind layout costs one
compiled scan body per run, the least that keeps both kinds scanned.

`mixture` is the one routing: the training block and the decode path (`qwen3.inference`, which
fuses each expert's gate and up kernels into one grouped matmul) both call it.

Expert parallelism (`expert_shards`, `expert_parallel`): on a mesh whose "fsdp" axis F divides E,
each device holds E / F experts of every sparse layer (the [.., E, ..] kernels split on E,
`parallel.param_partition_spec`), and the tokens travel to their experts instead of the experts
to the tokens: per "fsdp" group, each device routes its own rows, sends each (token, expert)
pair's row to the device holding that expert (one ragged all-to-all), runs its experts over what
it received and sends the outputs back (a second one), where they are weighted and summed. No pair
is dropped: the receive buffers are sized for the worst case (every pair of every device to one
device's experts, F * m * min(k, E / F) rows for m rows per device), as MaxText's ragged path.
XLA:CPU has no ragged all-to-all; there the exchange is an `all_to_all` of fixed [F, m * min(k,
E / F), D] chunks (`_exchange`, same result, more bytes). E not divisible by F: the experts stay
replicated and each device runs every expert over its own rows (the layout before expert
parallelism).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterator, NamedTuple, Optional, Tuple

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from jax.sharding import Mesh, PartitionSpec as P

from arca_jax import parallel
from arca_jax.qwen3.config import Qwen3MoeConfig

SPARSE_MLP = ("router", "experts")
DENSE_MLP = ("gate_proj", "up_proj", "down_proj")


@flax.struct.dataclass
class RouterStats:
    """One layer's routing over the real tokens (attention-mask weighted), or [Ls, ...] stacked.

    load [E]: fraction of the routed (token, expert) pairs sent to each expert (sums to 1).
    prob [E]: the router's softmax probability of each expert, averaged over tokens (sums to 1).
    """

    load: jax.Array
    prob: jax.Array


def aux_loss(load: jax.Array, prob: jax.Array, k: int) -> jax.Array:
    """The Switch load-balancing loss of each layer, E * sum_e f_e P_e with f_e = k * load_e the
    pairs routed to e per token and P_e = prob_e: load, prob [..., E] -> [...]. k at perfect
    balance. For a model with one sparse layer it is transformers' `aux_loss`; for several,
    `load_balancing_loss`."""
    E = load.shape[-1]
    return E * k * jnp.sum(load * prob, axis=-1)


def load_balancing_loss(load: jax.Array, prob: jax.Array, k: int) -> jax.Array:
    """transformers' `aux_loss` (`load_balancing_loss_func`) over the sparse layers: load, prob
    [Ls, E] -> scalar E * sum_e mean_l(f_le) mean_l(P_le): the product of the layer means (not the
    mean of the per-layer `aux_loss`)."""
    return aux_loss(jnp.mean(load, axis=0), jnp.mean(prob, axis=0), k)


def route(logits: jax.Array, k: int, normalize: bool):
    """logits [M, E] -> (probs [M, E] float32, weights [M, k] float32, experts [M, k] int32): the
    softmax, its k largest probabilities (divided by their sum when `normalize`) and their experts."""
    probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1)
    weights, experts = jax.lax.top_k(probs, k)
    if normalize:
        weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return probs, weights, experts.astype(jnp.int32)


def sort_by_expert(experts: jax.Array, num_experts: int):
    """experts [M, k] -> (order [M * k]: the flattened (token, slot) pairs sorted by expert, stable,
    so that each expert's pairs are one contiguous run; group_sizes [E] int32: the runs' lengths)."""
    flat = experts.reshape(-1)
    order = jnp.argsort(flat, stable=True).astype(jnp.int32)
    group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    return order, group_sizes


class Mixture(NamedTuple):
    """What `mixture` returns: y [M, D] the tokens' outputs; probs [M, E] float32 the router's
    softmax; experts [M, k] int32 the experts each token was routed to."""

    y: jax.Array
    probs: jax.Array
    experts: jax.Array


def router_logits(rows: jax.Array, kernel: jax.Array) -> jax.Array:
    """rows [M, D], kernel [D, E] -> logits [M, E] in rows' dtype (as transformers: the softmax
    comes later, in float32)."""
    return jnp.einsum("MD,DE->ME", rows, kernel.astype(rows.dtype))


def combine(out: jax.Array, order: jax.Array, weights: jax.Array) -> jax.Array:
    """out [M * k, D]: the (token, slot) pairs' outputs in `sort_by_expert` order; order [M * k];
    weights [M, k] -> [M, D]: each token's k outputs weighted (in out's dtype) and summed."""
    M, k = weights.shape
    inverse = jnp.zeros_like(order).at[order].set(jnp.arange(order.shape[0], dtype=order.dtype))
    out = out[inverse].reshape(M, k, out.shape[-1]) * weights.astype(out.dtype)[:, :, None]
    return jnp.sum(out, axis=1)


def mixture(rows: jax.Array, logits: jax.Array, kernels: Any, apply: Callable,
            config: Qwen3MoeConfig, mesh: Optional[Mesh] = None) -> Mixture:
    """The sparse MLP of rows [M, D] given their router logits [M, E]: `route`, the M * k
    (token, expert) pairs sorted by expert (`sort_by_expert`), `apply(kernels, pair_rows [P, D],
    group_sizes [E']) -> [P, D]` over them (kernels: a tree of [E', ...] expert stacks, E' = E
    here), `combine`. With a `mesh` whose "fsdp" axis splits the experts (`expert_shards` > 1),
    the pairs run where their experts are (`expert_parallel`); the result is the same. The one
    routing of the training forward (`SparseMoeBlock`) and the decode path (`qwen3.inference`)."""
    k = config.num_experts_per_tok
    probs, weights, chosen = route(logits, k, config.norm_topk_prob)
    if expert_shards(config.num_experts, mesh) > 1:
        y = expert_parallel(rows, weights, chosen, kernels, apply, config.num_experts, mesh)
    else:
        order, group_sizes = sort_by_expert(chosen, config.num_experts)
        y = combine(apply(kernels, rows[order // k], group_sizes), order, weights)
    return Mixture(y=y, probs=probs, experts=chosen)


# --------------------------------------------------------------------------------------------
# Expert parallelism
# --------------------------------------------------------------------------------------------


def expert_shards(num_experts: int, mesh: Optional[Mesh]) -> int:
    """F, the devices each sparse layer's experts are split over: the mesh's "fsdp" size when it
    divides E (each device holds E / F experts), else 1 (experts replicated)."""
    f = parallel.axis_size(mesh, parallel.FSDP)
    return f if f > 1 and num_experts % f == 0 else 1


def _native_ragged(mesh: Mesh) -> bool:
    """Whether the mesh's backend has XLA's ragged all-to-all (TPU, GPU; not XLA:CPU)."""
    return mesh.devices.flat[0].platform != "cpu"


def _exchange(x, out, in_off, send, out_off, recv, cap: int, native: bool):
    """`jax.lax.ragged_all_to_all` over "fsdp" (inside `shard_map`): x [n, D] rows
    [in_off[j], in_off[j] + send[j]) go to device j, at its rows [out_off[j], ...) of out [n', D];
    recv [F] the rows each device sends here. native=False (XLA:CPU): the same result from a
    dense `all_to_all` of [F, cap, D] chunks (cap >= every send and recv size)."""
    if native:
        return jax.lax.ragged_all_to_all(x, out, in_off, send, out_off, recv,
                                         axis_name=parallel.FSDP)
    r = jnp.arange(cap, dtype=jnp.int32)
    take = jnp.clip(in_off[:, None] + r, 0, x.shape[0] - 1)  # [F, cap]
    chunks = jnp.where((r < send[:, None])[..., None], x[take], jnp.zeros((), x.dtype))
    got = jax.lax.all_to_all(chunks, parallel.FSDP, 0, 0, tiled=True)  # [F sources, cap, D]
    at = jax.lax.all_to_all(out_off, parallel.FSDP, 0, 0, tiled=True)  # [F]: where each lands
    dest = jnp.where(r < recv[:, None], at[:, None] + r, out.shape[0])  # out of range: dropped
    return out.at[dest.reshape(-1)].set(got.reshape(-1, x.shape[-1]), mode="drop")


def _exclusive_cumsum(x, axis: int):
    return jnp.cumsum(x, axis=axis) - x


def _dispatch(rows, weights, chosen, kernels, *, apply: Callable, num_experts: int,
              shards: int, native: bool):
    """One device's part of `expert_parallel` (inside `shard_map`): its rows [m, D], weights and
    chosen [m, k], its experts' kernels [E / F, ...] -> its rows' outputs [m, D]."""
    m, D = rows.shape
    k = chosen.shape[1]
    F, El = shards, num_experts // shards
    me = jax.lax.axis_index(parallel.FSDP)
    order, group_sizes = sort_by_expert(chosen, num_experts)
    pairs = rows[order // k]  # [m k, D] sorted by expert, so by destination device
    counts = jax.lax.all_gather(group_sizes, parallel.FSDP).reshape(F, F, El)  # [src, dst, El]
    totals = jnp.sum(counts, axis=-1)  # [src, dst] pairs
    starts = _exclusive_cumsum(totals, 1)  # [src, dst]: a destination's run in src's pairs
    lands = _exclusive_cumsum(totals, 0)  # [src, dst]: where src's run lands at dst
    cap = m * min(k, El)  # most pairs one device sends another (a token's k experts differ)
    received = _exchange(pairs, jnp.zeros((F * cap, D), rows.dtype), starts[me], totals[me],
                         lands[me], totals[:, me], cap, native)  # [F cap, D], source-major
    # each source's run is sorted by expert: the local expert of every received row
    mine = counts[:, me, :]  # [src, El]
    run = jnp.searchsorted(jnp.cumsum(mine.reshape(-1)), jnp.arange(F * cap), side="right")
    local = jnp.where(run < F * El, run % El, El).astype(jnp.int32)  # El: an unused row
    perm = jnp.argsort(local, stable=True).astype(jnp.int32)
    out = apply(kernels, received[perm], jnp.sum(mine, axis=0))  # [F cap, D] by local expert
    out = jnp.zeros_like(out).at[perm].set(out)  # back to the received order
    back = _exchange(out, jnp.zeros((m * k, D), out.dtype), lands[:, me], totals[:, me],
                     starts[:, me], totals[me], cap, native)  # [m k, D] in `order`
    return combine(back, order, weights)


def expert_parallel(rows: jax.Array, weights: jax.Array, chosen: jax.Array, kernels: Any,
                    apply: Callable, num_experts: int, mesh: Mesh) -> jax.Array:
    """The experts' weighted outputs [M, D] of rows [M, D] routed to `chosen` [M, k] with
    `weights` [M, k], each pair run on the device holding its expert (see the module doc):
    `shard_map` over the mesh, rows split over ("data", "fsdp") (padded to a multiple of their
    product; the padding's outputs are dropped), the kernels' [E, ...] stacks over "fsdp",
    replicated over "data" and "tensor". Equals the single-device `mixture` exactly up to float
    rounding (each pair's row meets its expert's kernels in one `apply` either way)."""
    F = expert_shards(num_experts, mesh)
    M, k = chosen.shape
    R = parallel.axis_size(mesh, parallel.DATA) * F
    pad = -M % R
    if pad:
        rows = jnp.pad(rows, ((0, pad), (0, 0)))
        weights = jnp.pad(weights, ((0, pad), (0, 0)))
        chosen = jnp.concatenate(
            [chosen, jnp.broadcast_to(jnp.arange(k, dtype=chosen.dtype), (pad, k))])
    split = P((parallel.DATA, parallel.FSDP))
    run = jax.shard_map(
        functools.partial(_dispatch, apply=apply, num_experts=num_experts, shards=F,
                          native=_native_ragged(mesh)),
        mesh=mesh, in_specs=(split, split, split, P(parallel.FSDP)), out_specs=split)
    return run(rows, weights, chosen, kernels)[:M]


def check_lora(lora: Optional[Any], lora_dropout: float = 0.0) -> None:
    """ValueError when an adapter tree of a mixture-of-experts model adapts the experts or the
    router and lora_dropout > 0: their adapters take no input dropout (see the module doc)."""
    mlp = (lora or {}).get("layers", {}).get("mlp", {})
    adapted = [name for name in SPARSE_MLP if name in mlp]
    if adapted and lora_dropout > 0.0:
        raise ValueError(f"lora_dropout={lora_dropout}: the adapters on the {' and '.join(adapted)} "
                         "of a mixture-of-experts model take no dropout (as PEFT's on "
                         "transformers' fused experts); use lora dropout 0")


def router_stats(probs: jax.Array, experts: jax.Array, token_mask: Optional[jax.Array]) -> RouterStats:
    """probs [M, E], experts [M, k], token_mask [M] (None: every row a token) -> RouterStats [E]."""
    M, E = probs.shape
    k = experts.shape[-1]
    m = jnp.ones((M,), jnp.float32) if token_mask is None else token_mask.astype(jnp.float32)
    n = jnp.maximum(jnp.sum(m), 1.0)
    counts = jnp.bincount(experts.reshape(-1), weights=jnp.repeat(m, k), length=E)
    return RouterStats(load=jax.lax.stop_gradient(counts / (n * k)),
                       prob=jnp.sum(probs * m[:, None], axis=0) / n)


def _lora_dtype(x: jax.Array, lora_dtype: Any):
    return x.dtype if lora_dtype is None else jnp.dtype(lora_dtype)


class Router(nn.Module):
    """x [M, D] -> logits [M, E] in x's dtype (as transformers: softmax later, in float32), plus
    lora_scale (x A) B when the 'lora' collection holds lora_a [D, R], lora_b [R, E] (matmuls in
    `lora_dtype`, None: x's, as `LoraLinear`)."""

    num_experts: int
    lora_scale: float = 1.0
    lora_dtype: Any = None

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.normal(0.02), (x.shape[-1], self.num_experts),
                            jnp.float32)
        logits = router_logits(x, kernel)
        if self.has_variable("lora", "lora_a"):
            dtype = _lora_dtype(x, self.lora_dtype)
            a = self.get_variable("lora", "lora_a").astype(dtype)
            b = self.get_variable("lora", "lora_b").astype(dtype)
            delta = jnp.einsum("MR,RE->ME", jnp.einsum("MD,DR->MR", x.astype(dtype), a), b)
            logits = logits + (self.lora_scale * delta).astype(logits.dtype)
        return logits


class GroupedKernel(nn.Module):
    """One expert projection: {'kernel' [E, in, out]}, with 'lora_a' [E, in, R] and 'lora_b'
    [E, R, out] when the 'lora' collection holds an adapter for it (see `grouped_project`)."""

    shape: Tuple[int, int, int]

    @nn.compact
    def __call__(self):
        w = {"kernel": self.param("kernel", nn.initializers.normal(0.02), self.shape, jnp.float32)}
        if self.has_variable("lora", "lora_a"):
            w.update(lora_a=self.get_variable("lora", "lora_a"),
                     lora_b=self.get_variable("lora", "lora_b"))
        return w


def grouped_project(rows: jax.Array, w: Any, group_sizes: jax.Array, lora_scale: float = 1.0,
                    lora_dtype: Any = None) -> jax.Array:
    """Pair rows [P, in] sorted by expert through their experts' projection w ({'kernel'
    [E', in, out]} and optionally {'lora_a' [E', in, R], 'lora_b' [E', R, out]}), group_sizes
    [E'] -> [P, out] in rows' dtype: x W_e + lora_scale (x A_e) B_e for each row's expert e, as
    `jax.lax.ragged_dot`s over the routed rows only (the adapter's in `lora_dtype`; None: rows')."""
    y = jax.lax.ragged_dot(rows, w["kernel"].astype(rows.dtype), group_sizes)
    if "lora_a" in w:
        dtype = _lora_dtype(rows, lora_dtype)
        xa = jax.lax.ragged_dot(rows.astype(dtype), w["lora_a"].astype(dtype), group_sizes)
        delta = jax.lax.ragged_dot(xa, w["lora_b"].astype(dtype), group_sizes)  # [P, out]
        y = y + (lora_scale * delta).astype(y.dtype)
    return y


def swiglu(kernels: Any, rows: jax.Array, group_sizes: jax.Array, lora_scale: float = 1.0,
           lora_dtype: Any = None) -> jax.Array:
    """The experts' SwiGLU over pair rows [P, D] sorted by expert: kernels {'gate_proj',
    'up_proj' ({'kernel' [E', D, I]}, adapters), 'down_proj' ([E', I, D])} as `Experts` returns,
    group_sizes [E'] -> [P, D] (`grouped_project` each; rows past sum(group_sizes) give 0)."""
    proj = lambda name, x: grouped_project(x, kernels[name], group_sizes, lora_scale,  # noqa: E731
                                           lora_dtype)
    h = jax.nn.silu(proj("gate_proj", rows)) * proj("up_proj", rows)
    return proj("down_proj", h)


class Experts(nn.Module):
    """E SwiGLU MLPs of width I: their projections {'gate_proj', 'up_proj' ([E, D, I]),
    'down_proj' ([E, I, D])}, each a `GroupedKernel` (kernel and optional adapter)."""

    config: Qwen3MoeConfig

    @nn.compact
    def __call__(self):
        c = self.config
        E, D, I = c.num_experts, c.hidden_size, c.moe_intermediate_size
        return {"gate_proj": GroupedKernel((E, D, I), name="gate_proj")(),
                "up_proj": GroupedKernel((E, D, I), name="up_proj")(),
                "down_proj": GroupedKernel((E, I, D), name="down_proj")()}


class SparseMoeBlock(nn.Module):
    """The sparse MLP: (x [B, T, D], token_mask [B, T] or None) -> (y [B, T, D], RouterStats [E]).
    mesh: run the experts expert-parallel over its "fsdp" axis (`mixture`), or None.
    lora_scale, lora_dtype: for the router's and the experts' adapters (when the 'lora'
    collection holds them)."""

    config: Qwen3MoeConfig
    mesh: Optional[Mesh] = None
    lora_scale: float = 1.0
    lora_dtype: Any = None

    @nn.compact
    def __call__(self, x, token_mask=None):
        c = self.config
        B, T, D = x.shape
        rows = x.reshape(B * T, D)
        logits = Router(c.num_experts, self.lora_scale, self.lora_dtype, name="router")(rows)
        apply = functools.partial(swiglu, lora_scale=self.lora_scale, lora_dtype=self.lora_dtype)
        mix = mixture(rows, logits, Experts(c, name="experts")(), apply, c, self.mesh)
        mask = None if token_mask is None else token_mask.reshape(B * T)
        return mix.y.reshape(B, T, D), router_stats(mix.probs, mix.experts, mask)


# --------------------------------------------------------------------------------------------
# Heterogeneous stacks
# --------------------------------------------------------------------------------------------


class Segment(NamedTuple):
    """A maximal run of layers of one kind: layers [start, stop) of the L, the kind's own stack
    (the [Ls] or [Ld] MLP stack) from `offset`."""

    sparse: bool
    start: int
    stop: int
    offset: int


def segments(config: Qwen3MoeConfig) -> Tuple[Segment, ...]:
    """The layers cut into maximal runs of one kind, in layer order."""
    out = []
    seen = {True: 0, False: 0}
    for i, sparse in enumerate(config.sparse_layers):
        if out and out[-1].sparse == sparse:
            out[-1] = out[-1]._replace(stop=i + 1)
        else:
            out.append(Segment(sparse, i, i + 1, seen[sparse]))
        seen[sparse] += 1
    return tuple(out)


def _slice(tree, start: int, stop: int, length: int):
    if start == 0 and stop == length:
        return tree
    return jax.tree_util.tree_map(lambda x: x[start:stop], tree)


def segment_tree(layers: Any, segment: Segment, config: Qwen3MoeConfig) -> dict:
    """The `layers` subtree (params or LoRA) of one segment: attention and norms [L] sliced to
    [start, stop), the segment kind's MLP stack sliced from `offset`, the other kind's left out."""
    L = config.num_hidden_layers
    n = segment.stop - segment.start
    kinds = config.sparse_layers
    total = sum(1 for s in kinds if s == segment.sparse)
    keep = SPARSE_MLP if segment.sparse else DENSE_MLP
    out = {}
    for key, sub in layers.items():
        if key == "mlp":
            mlp = {name: v for name, v in sub.items() if name in keep}
            if mlp:
                out[key] = _slice(mlp, segment.offset, segment.offset + n, total)
        else:
            out[key] = _slice(sub, segment.start, segment.stop, L)
    return out


def join_layers(parts: Iterator[Tuple[Segment, Any]], config: Qwen3MoeConfig) -> dict:
    """The inverse of `segment_tree` over every segment: (segment, its subtree) pairs -> the
    `layers` tree (attention and norms concatenated in layer order, each kind's MLP stack)."""
    shared, mlp = [], {True: [], False: []}
    for segment, tree in parts:
        shared.append({k: v for k, v in tree.items() if k != "mlp"})
        mlp[segment.sparse].append(tree.get("mlp", {}))
    cat = lambda trees: jax.tree_util.tree_map(lambda *xs: jnp.concatenate(xs, axis=0), *trees)  # noqa: E731
    out = cat(shared)
    out["mlp"] = {}
    for kind in (False, True):
        if mlp[kind]:
            out["mlp"].update(cat(mlp[kind]))
    return out
