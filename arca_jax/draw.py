"""Choosing one token per row from logits [B, V]: greedy, or a draw from softmax(logits /
temperature), optionally truncated to the top-k tokens, then the top-p nucleus, then the tokens of
at least min_p times the largest probability (transformers' warpers, in their order), by inverse-CDF
search with one uniform number per row (no noise over the vocabulary). `choose_tokens` returns
the tokens with their log-probabilities under the full untempered distribution and under the
distribution actually sampled. Pure functions of arrays; `sampling` calls them in every prefill
and decode step.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple, Optional

import jax
import jax.numpy as jnp

from arca_jax.qwen3.inference import SOFTMAX_BLOCK

if TYPE_CHECKING:
    from arca_jax.qwen3 import SoftmaxStats
    from arca_jax.sampling import SamplingConfig

# Inverse-CDF sampling searches the vocabulary in blocks of this many tokens: block sums first,
# then one block (two short cumulative sums instead of one over V). The model's softmax
# statistics (`qwen3.SoftmaxStats`) come in the same blocks.
CDF_BLOCK = SOFTMAX_BLOCK


def _inclusive_cumsum(x: jax.Array) -> jax.Array:
    """Cumulative sum over the last axis of a short [..., M] array as one matmul with a triangular
    0/1 matrix (one operation; `jnp.cumsum` lowers to several on CPU). Exact float32 products."""
    m = x.shape[-1]
    upper = jnp.triu(jnp.ones((m, m), x.dtype))  # upper[i, j] = 1 for i <= j
    return jnp.einsum("...i,ij->...j", x, upper, precision=jax.lax.Precision.HIGHEST)


class Draw(NamedTuple):
    """index [B] int32 drawn; total [B] float32, the sum of exp(log_weights) over the row."""

    index: jax.Array
    total: jax.Array


def inverse_cdf(log_weights: jax.Array, u: jax.Array, block: int = CDF_BLOCK,
                block_sums: Optional[jax.Array] = None) -> Draw:
    """Index drawn with probability exp(log_weights) / sum(exp(log_weights)), one uniform u per row.

    Finds the first index whose cumulative weight reaches u * total: first among block sums, then
    inside the chosen block. The work is one fused exp-and-sum pass over [B, V] plus two short
    cumulative sums ([B, V / block] and [B, block]); the weights are never written out. Never
    returns an index of zero weight.

    Args:
      log_weights: [B, V] float32, at most ~80 (e.g. logits minus their max); -inf for weight 0.
      u: [B] float32 in (0, 1].
      block_sums: [B, ceil(V / block)], the sums of exp(log_weights) per block when known (the
        model's `SoftmaxStats`): the pass over [B, V] is skipped.

    Returns:
      Draw(index [B] int32, total [B] float32).
    """
    B, V = log_weights.shape
    C = -(-V // block)  # number of blocks
    if C * block != V:
        log_weights = jnp.pad(log_weights, ((0, 0), (0, C * block - V)), constant_values=-jnp.inf)
    blocks = log_weights.reshape(B, C, block)
    if block_sums is None:
        block_sums = jnp.sum(jnp.exp(blocks), axis=-1)  # [B, C]
    c, rest, total = _chosen_block(block_sums, u)
    j = _index_in_block(jnp.take_along_axis(blocks, c[:, None, None], 1)[:, 0], rest)
    return Draw(index=(c * block + j).astype(jnp.int32), total=total)


def _chosen_block(block_sums: jax.Array, u: jax.Array) -> tuple:
    """`inverse_cdf`'s first search, among the block sums [B, C]: (the chosen block [B] int32,
    the weight still to cover inside it [B], the row's total [B])."""
    C = block_sums.shape[1]
    block_cdf = _inclusive_cumsum(block_sums)
    total = block_cdf[:, -1]
    target = u * total  # (0, total]
    c = jnp.minimum(jnp.sum(block_cdf < target[:, None], axis=-1), C - 1)  # [B] chosen block
    before = jnp.where(c > 0, jnp.take_along_axis(block_cdf, jnp.maximum(c - 1, 0)[:, None], 1)[:, 0], 0.0)
    return c, target - before, total


def _index_in_block(block_log_weights: jax.Array, rest: jax.Array) -> jax.Array:
    """`inverse_cdf`'s second search, inside the chosen block [B, block]: the first index whose
    cumulative weight reaches `rest` [B] ([B] int32)."""
    inner_cdf = _inclusive_cumsum(jnp.exp(block_log_weights))
    # the residual lies in (0, block mass]; clamp it there against rounding between the two sums
    rest = jnp.clip(rest, jnp.finfo(jnp.float32).tiny, inner_cdf[:, -1])
    return jnp.sum(inner_cdf < rest[:, None], axis=-1)


def _nucleus(w: jax.Array, top_p: float) -> jax.Array:
    """The top-p nucleus of weights w [B, V] float32 in [0, 1] (one of them 1), without sorting
    the vocabulary: kept [B, V] bool.

    The nucleus is the shortest prefix of the tokens ordered by decreasing weight (ties in index
    order) whose mass reaches top_p * total: a token is kept when the mass strictly before it is
    below that. Its lightest weight v is the largest one whose tokens of weight >= v together
    reach top_p * total (`_largest_key`: one fused compare-and-sum over w per bit of v); the
    nucleus is every heavier token and, in index order, the tokens of weight v while the mass
    before them stays below.

    Subnormal weights (< 2^-126 of the largest) count as 0: below the float32 sums' resolution
    (a total >= 1), they were never drawable, and without them every candidate v is a normal
    float, so plain float compares order the weights (as their bits do) whatever a backend does
    with subnormals.
    """
    w = jnp.where(w >= jnp.finfo(jnp.float32).tiny, w, 0.0)
    target = top_p * jnp.sum(w, axis=-1)  # [B]

    def at_least(bits):  # [B] uint32 -> [B, V], w >= the float of those bits
        return w >= jax.lax.bitcast_convert_type(bits, jnp.float32)[:, None]

    # a weight in [0, 1] has bits 31 and 30 clear (1.0 is 0x3F800000)
    t = _largest_key(at_least, w, target, top_bit=29)
    v = jax.lax.bitcast_convert_type(t, jnp.float32)  # [B], >= 2^-126
    above, tie = w > v[:, None], w == v[:, None]
    before = jnp.sum(jnp.where(above, w, 0.0), axis=-1, keepdims=True)  # [B, 1]
    rank = _running_count(tie)  # 1, 2, ... along the ties of v in index order
    # the first tie is kept by construction; the guard keeps it against a rounding difference
    return above | (tie & ((before + (rank - 1) * v[:, None] < target[:, None]) | (rank == 1)))


def _truncated_inverse_cdf(scaled: jax.Array, u: jax.Array, top_p: float,
                           min_p: float) -> Draw:
    """Draws from softmax(scaled) (scaled [B, V] float32 <= 0: the logits minus their max, over
    the temperature) truncated to its top-p nucleus (`_nucleus`; top_p = 1: every token), then
    to the weights exp(scaled) >= min_p (0: off), with uniforms u [B] in (0, 1]: `inverse_cdf`
    over the kept tokens in index order, the same distribution as a search in decreasing order
    (not the same token for a given u). For top-p 0.95 on a 2-core AMD EPYC (Zen 4,
    `bench_draw.py`, [32, 151936]): 79 ms per draw, against 1.26 s by sorting the vocabulary.
    Returns Draw(index [B] int32, total [B] = the kept mass)."""
    w = jnp.exp(scaled)
    kept = _nucleus(w, top_p) if top_p < 1.0 else jnp.ones(w.shape, bool)
    if min_p > 0.0:
        kept = kept & (w >= min_p)
    return inverse_cdf(jnp.where(kept, scaled, -jnp.inf), u)


def _truncated_draw(sorted_w: jax.Array, u: jax.Array, top_p: float, min_p: float) -> Draw:
    """Position drawn among weights [B, M] sorted in decreasing order (the first 1), truncated to
    the top-p nucleus (top_p = 1: all positions with weight > 0), then to the weights >= min_p
    (0: off); Draw(index, total = the kept mass)."""
    cdf = jnp.cumsum(sorted_w, axis=-1)
    keep = (cdf - sorted_w) < top_p * cdf[:, -1:]
    if top_p >= 1.0:
        keep = sorted_w > 0
    if min_p > 0.0:
        keep = keep & (sorted_w >= min_p)
    mass = jnp.max(jnp.where(keep, cdf, 0.0), axis=-1)
    j = jnp.sum(cdf < (u * mass)[:, None], axis=-1)
    j = jnp.minimum(j, jnp.sum(keep, axis=-1) - 1)  # rounding guard: stay inside the kept set
    return Draw(index=j.astype(jnp.int32), total=mass)


def _order_keys(x: jax.Array) -> jax.Array:
    """uint32 keys of float32 x in the same order as x (-0.0 the same key as +0.0, as the two
    compare; NaN not ordered)."""
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    sign = jnp.uint32(0x80000000)
    return jnp.where(bits > sign, ~bits, bits | sign)  # bits == sign: -0.0


def _signed(key: jax.Array) -> jax.Array:
    """uint32 order keys as int32 in the same order (a signed compare is one vector instruction
    on x86, and float compares of the keys' values would meet flushed subnormals)."""
    return jax.lax.bitcast_convert_type(key ^ jnp.uint32(0x80000000), jnp.int32)


def _running_count(mask: jax.Array, block: int = CDF_BLOCK) -> jax.Array:
    """Inclusive running count of mask [B, V] bool along V, int32: within blocks of `block`, then
    the blocks' totals (two short triangular matmuls, `_inclusive_cumsum`: on CPU `jnp.cumsum`
    over a row of V takes several times longer). Exact: float32 counts below 2^24."""
    B, V = mask.shape
    C = -(-V // block)
    a = jnp.pad(mask.astype(jnp.float32), ((0, 0), (0, C * block - V))).reshape(B, C, block)
    inner = _inclusive_cumsum(a)  # [B, C, block]
    before = _inclusive_cumsum(inner[..., -1]) - inner[..., -1]  # [B, C] exclusive
    return (inner + before[..., None]).reshape(B, C * block)[:, :V].astype(jnp.int32)


def _largest_key(at_least, weights, target: jax.Array, top_bit: int = 31) -> jax.Array:
    """The largest order key t [B] uint32 whose entries of key >= t weigh at least target [B] in
    all: sum(weights where at_least(t)) >= target, with `at_least(t)` [B, V] bool the entries of
    key >= t [B] and `weights` [B, V] >= 0 or a scalar (1.0: a count). Built from bit `top_bit`
    down (the bits above it 0): one fused compare-and-sum over [B, V] per bit. The sum only grows
    as t falls (float rounding is monotone), so each bit kept stays in the answer."""
    t = jnp.zeros(target.shape, jnp.uint32)
    for bit in range(top_bit, -1, -1):
        cand = t | jnp.uint32(1 << bit)
        mass = jnp.sum(jnp.where(at_least(cand), weights, 0.0), axis=-1)
        t = jnp.where(mass >= target, cand, t)
    return t


def threshold_top_k(x: jax.Array, m: int) -> tuple:
    """`jax.lax.top_k(x, m)` of x [B, V] float32 without sorting the vocabulary: (values [B, m]
    decreasing, ids [B, m] int32), ties in index order, as `lax.top_k` (-0.0 and +0.0 count as
    one value, +0.0, where `lax.top_k` puts +0.0 first).

    The m-th largest value's order key is built from its top bit down, each bit kept when at
    least m entries reach it (32 fused counting passes over [B, V]); the entries above it, then
    the first of those equal to it, are gathered by two running counts and sorted (m of them).
    XLA:CPU's `top_k` sorts each row: for the 100 candidates of a top-k 50 draw from [128, 8192]
    logits, 259 ms against 15.5 ms by this search on a 2-core AMD EPYC (`bench_draw.py`).
    """
    B, V = x.shape
    key = _order_keys(x)
    signed = _signed(key)
    t = _largest_key(lambda c: signed >= _signed(c)[:, None], 1.0,
                     jnp.full((B,), m, jnp.float32))
    above, equal = key > t[:, None], key == t[:, None]
    n_above = jnp.sum(above, axis=-1, keepdims=True)  # < m: t is the m-th largest
    slot = jnp.where(above, _running_count(above) - 1,
                     jnp.where(equal, n_above + _running_count(equal) - 1, m))  # m: left out
    rows = jnp.broadcast_to(jnp.arange(B)[:, None], (B, V))
    ids = jnp.zeros((B, m), jnp.int32).at[rows, slot].set(
        jnp.broadcast_to(jnp.arange(V, dtype=jnp.int32), (B, V)), mode="drop")
    vals = jnp.take_along_axis(x, ids, axis=-1)
    neg, ids = jax.lax.sort((-vals, ids), dimension=1, num_keys=1, is_stable=True)
    return -neg, ids


def top_candidates(x: jax.Array, m: int) -> tuple:
    """The m largest entries of x [B, V] float32 per row, (values [B, m] decreasing, ids [B, m]),
    ties in index order: `threshold_top_k` on CPU, `jax.lax.top_k` elsewhere (XLA:GPU has
    dedicated top-k kernels)."""
    if jax.default_backend() == "cpu":
        return threshold_top_k(x, m)
    return jax.lax.top_k(x, m)


def _top_k_draw(scaled: jax.Array, u: jax.Array, top_k: int, top_p: float,
                min_p: float) -> Draw:
    """Draw from softmax(scaled [B, V]) truncated to the top-k tokens (ties with the k-th kept,
    up to 2k candidates), then to the top-p nucleus of those, then to min_p. Works on [B, 2k]
    candidates only (no sort over the vocabulary). Draw(index [B] token ids, total [B] = kept
    mass, relative to the largest weight)."""
    V = scaled.shape[-1]
    k = min(top_k, V)
    return _candidates_draw(*top_candidates(scaled, min(2 * k, V)), u, k, top_p, min_p)


def _candidates_draw(vals: jax.Array, ids: jax.Array, u: jax.Array, k: int,
                     top_p: float, min_p: float) -> Draw:
    """`_top_k_draw` from its candidates: the 2k largest scaled logits [B, 2k] in decreasing
    order (ties in index order) and their token ids."""
    w = jnp.exp(vals - vals[:, :1])
    w = jnp.where(vals >= vals[:, k - 1:k], w, 0.0)  # the k-th value's ties stay
    j, mass = _truncated_draw(w, u, top_p, min_p)
    return Draw(index=jnp.take_along_axis(ids, j[:, None], 1)[:, 0], total=mass)


def vocabulary_split(vocab: int, settings: SamplingConfig, mesh) -> bool:
    """Whether `choose_tokens(mesh=...)` draws on each "tensor" shard of the vocabulary
    (`_choose_on_shards`) rather than on whole rows of logits: tensor > 1 divides V (the head is
    vocabulary-parallel, `parallel.inference_partition_spec`), and the draw is greedy, top-k, or
    a plain draw (min-p at most) whose shards hold whole blocks of `CDF_BLOCK` tokens (the
    blocks of the whole row's search, so that the same token comes out; Qwen3's 151,936 =
    128 x 1,187 tokens split into whole blocks over no tensor size, so its plain draws keep whole
    rows). A top-p nucleus without top-k (`_nucleus`, a search over the whole row's weights)
    keeps whole rows."""
    from arca_jax import parallel

    t = parallel.axis_size(mesh, parallel.TENSOR)
    if t <= 1 or vocab % t:
        return False
    if settings.greedy or settings.top_k > 0:
        return True
    return settings.top_p >= 1.0 and (vocab // t) % CDF_BLOCK == 0


def _choose_on_shards(logits: jax.Array, u: jax.Array, settings: SamplingConfig, mesh,
                      rows) -> Choice:
    """`choose_tokens` with the vocabulary split over the mesh's "tensor" axis (`jax.shard_map`):
    each device reduces its own [b, V / t] logits and the devices exchange per-row results, so
    no device gathers [B, V] (the decode step's largest collective on a tensor mesh otherwise).

    - greedy: the first maximal logit, a min over the shards' first maxima;
    - top-k: each shard's 2k largest scaled logits (ties in index order), all-gathered as
      [b, t x 2k] and merged in (value, token id) order: the whole vocabulary's 2k largest, the
      candidates of `_top_k_draw`;
    - plain draws: each shard's `CDF_BLOCK` block sums all-gathered [b, V / CDF_BLOCK] (the
      blocks `inverse_cdf` builds), the block chosen on every device, the token within it on the
      shard that holds it.

    The same tokens as `choose_tokens` on whole rows (the same candidates or block sums, then
    the same arithmetic); the log-probabilities' normaliser sums the shards' partial sums, so
    they agree to float rounding. rows: the mesh axes the rows are split over (None: none)."""
    from jax.sharding import PartitionSpec as P

    from arca_jax import parallel

    T = parallel.TENSOR
    B, V = logits.shape
    t = parallel.axis_size(mesh, T)
    Vt = V // t
    temp = settings.temperature

    def body(x, u):
        offset = jax.lax.axis_index(T) * Vt
        m = jax.lax.pmax(jnp.max(x, axis=-1, keepdims=True), T)
        shifted = x - m  # [b, Vt] <= 0
        sampled_total = total = None
        if settings.greedy:
            iota = jax.lax.broadcasted_iota(jnp.int32, x.shape, 1) + offset
            tokens = jax.lax.pmin(jnp.min(jnp.where(shifted == 0.0, iota, V), axis=-1), T)
        elif settings.top_k > 0:
            k = min(settings.top_k, V)
            c = min(2 * k, V)
            vals, ids = top_candidates(shifted / temp, min(c, Vt))
            vals = jax.lax.all_gather(vals, T, axis=1, tiled=True)  # [b, t x c']
            ids = jax.lax.all_gather(ids + offset, T, axis=1, tiled=True)
            neg, ids = jax.lax.sort((-vals, ids), dimension=1, num_keys=2)
            tokens, sampled_total = _candidates_draw(-neg[:, :c], ids[:, :c], u, k,
                                                     settings.top_p, settings.min_p)
        else:  # inverse CDF over the blocks of the whole row (`inverse_cdf`)
            lw = shifted if temp == 1.0 else shifted / temp
            if settings.min_p > 0.0:  # as `_truncated_inverse_cdf`: elementwise, shard by shard
                lw = jnp.where(jnp.exp(lw) >= settings.min_p, lw, -jnp.inf)
            blocks = lw.reshape(lw.shape[0], Vt // CDF_BLOCK, CDF_BLOCK)
            sums = jax.lax.all_gather(jnp.sum(jnp.exp(blocks), axis=-1), T, axis=1, tiled=True)
            cb, rest, sampled_total = _chosen_block(sums, u)  # the whole row's [b, C] sums
            mine = cb // (Vt // CDF_BLOCK) == jax.lax.axis_index(T)
            local = jnp.take_along_axis(blocks, (cb % (Vt // CDF_BLOCK))[:, None, None], 1)[:, 0]
            j = jax.lax.psum(jnp.where(mine, _index_in_block(local, rest), 0), T)
            tokens = (cb * CDF_BLOCK + j).astype(jnp.int32)
            if temp == 1.0 and settings.min_p == 0.0:
                total = sampled_total
        if total is None:  # the untempered normaliser
            total = jax.lax.psum(jnp.sum(jnp.exp(shifted), axis=-1), T)
        here = (tokens >= offset) & (tokens < offset + Vt)
        picked = jax.lax.psum(jnp.where(here, jnp.take_along_axis(
            shifted, jnp.clip(tokens - offset, 0, Vt - 1)[:, None], 1)[:, 0], 0.0), T)
        return _choice(tokens.astype(jnp.int32), picked, total, sampled_total, temp)

    return jax.shard_map(body, mesh=mesh, in_specs=(P(rows, T), P(rows)),
                         out_specs=Choice(P(rows), P(rows), P(rows)), check_vma=False)(logits, u)


class Choice(NamedTuple):
    """tokens [B] int32; logps [B]: log-probability under softmax(logits) (temperature 1, full
    vocabulary); sampled_logps [B]: under the distribution actually sampled (0 when greedy)."""

    tokens: jax.Array
    logps: jax.Array
    sampled_logps: jax.Array


def choose_tokens(logits: jax.Array, u: jax.Array, settings: SamplingConfig,
                  softmax: Optional[SoftmaxStats] = None, mesh=None, rows=None) -> Choice:
    """One token per row from logits [B, V] float32, with its log-probabilities.

    u: [B] float32 uniforms in (0, 1], one per row (unused when greedy).
    Greedy: the first maximal logit (as argmax). Otherwise softmax(logits / temperature),
    optionally truncated to the top-k tokens, then the top-p nucleus, then min_p, renormalised,
    by inverse CDF (`inverse_cdf`, `_top_k_draw`, `_truncated_inverse_cdf`).
    softmax: the logits' `qwen3.SoftmaxStats` when the model computed them: their max, and at
    temperature 1 without truncation their block sums, replace the passes over [B, V].
    mesh, rows: with the logits' vocabulary split over the mesh's "tensor" axis and their rows
    over the mesh axes `rows`, each device draws on its own shard (`vocabulary_split`,
    `_choose_on_shards`): the same tokens, no [B, V] gathered.
    """
    if (mesh is not None and softmax is None
            and vocabulary_split(logits.shape[-1], settings, mesh)):
        return _choose_on_shards(logits, u, settings, mesh, rows)
    V = logits.shape[-1]
    sums = None
    if softmax is not None:
        m = softmax.max[:, None]
        if softmax.block == CDF_BLOCK:
            sums = softmax.block_sums
    else:
        m = jnp.max(logits, axis=-1, keepdims=True)
    shifted = logits - m  # <= 0
    total = None  # sum(exp(shifted)) when the draw computes it anyway
    t = settings.temperature
    if settings.greedy:
        # one fused compare-and-min instead of argmax's (value, index) reduction
        iota = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 1)
        tokens = jnp.min(jnp.where(shifted == 0.0, iota, V), axis=-1)
        sampled_total = None
    elif settings.top_k > 0:
        tokens, sampled_total = _top_k_draw(shifted / t, u, settings.top_k, settings.top_p,
                                            settings.min_p)
    elif settings.top_p < 1.0 or settings.min_p > 0.0:
        tokens, sampled_total = _truncated_inverse_cdf(shifted / t, u, settings.top_p,
                                                       settings.min_p)
    elif t == 1.0:
        tokens, total = inverse_cdf(shifted, u, block_sums=sums)
        sampled_total = total
    else:
        tokens, sampled_total = inverse_cdf(shifted / t, u)
    if total is None:  # the untempered normaliser
        total = (jnp.sum(jnp.exp(shifted), axis=-1) if sums is None
                 else jnp.sum(sums, axis=-1))
    picked = jnp.take_along_axis(shifted, tokens[:, None], 1)[:, 0]  # <= 0
    return _choice(tokens, picked, total, sampled_total, t)


def _choice(tokens: jax.Array, picked: jax.Array, total: jax.Array,
            sampled_total: Optional[jax.Array], t: float) -> Choice:
    """The `Choice` of `tokens` [B] from their shifted logits `picked` [B] (<= 0), the
    untempered normaliser `total` and the sampled distribution's `sampled_total` (None: greedy,
    sampled log-probs 0)."""
    logps = picked - jnp.log(total)
    if sampled_total is None:
        sampled = jnp.zeros_like(logps)
    else:  # every draw's weights are exp(shifted / t) (top-k: relative to its max, also 0 here)
        sampled = picked / t - jnp.log(sampled_total)
    return Choice(tokens, logps, sampled)
