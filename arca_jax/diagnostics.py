"""Concentration diagnostics of token weights: the Gini coefficient and EffN/T (the effective
token ratio) per row and as batch means.

Dimension letters: B batch (any number of leading axes, including none), T time (tokens, last
axis); weights and mask share the shape [B, T], a token is valid where ``mask != 0``. Every
function is pure, has no host round trips and works under ``jax.jit``, ``jax.vmap``,
``jax.pmap`` and with sharded inputs. Weights are upcast to float32; invalid positions are never
read. The weights measured are usually ``credit.token_weights``' (rows summing to 1), but any
non-negative weights work: both measures are scale-invariant per row.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import struct

from arca_jax.credit import divide_by_row

Array = jax.Array


class _KeyAccess:
    """Mapping-style read access (``r["gini"]``, ``dict(r)``) for the result dataclasses."""

    def keys(self) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(self))  # type: ignore[arg-type]

    def __getitem__(self, key: str) -> Array:
        if key not in self.keys():
            raise KeyError(f"{key!r}; available: {', '.join(self.keys())}")
        return getattr(self, key)

    def __iter__(self):
        return iter(self.keys())

    def items(self):
        return tuple((k, getattr(self, k)) for k in self.keys())


@struct.dataclass
class Concentration(_KeyAccess):
    """Batch means of the concentration diagnostics (a frozen pytree; ``c["gini"]`` also works).

    gini: [] float32, mean Gini coefficient over the rows with >= 2 valid tokens (and positive
        total weight); 0 when no row qualifies.
    effective_token_ratio: [] float32, mean EffN/T over the rows with >= 1 valid token (and
        positive total weight); 1 when no row qualifies.
    gini_rows: [] int32, number of rows that entered ``gini``.
    effective_token_ratio_rows: [] int32, number of rows that entered ``effective_token_ratio``.

    The empty-batch values (0, 1) are those of uniform weights, so a batch without measurable rows
    reads as "no concentration" rather than as NaN; the counts tell the two cases apart and let
    callers combine means across micro-batches exactly (weight each mean by its count).
    """

    gini: Array
    effective_token_ratio: Array
    gini_rows: Array
    effective_token_ratio_rows: Array


@struct.dataclass
class RowConcentration(_KeyAccess):
    """Per-row concentration diagnostics (a frozen pytree; ``r["gini"]`` also works).

    gini: [B] float32, Gini coefficient of the row's weights over its valid tokens; 0 where
        ``gini_valid`` is False.
    effective_token_ratio: [B] float32, EffN/T of the row; 0 where ``effective_token_ratio_valid``
        is False.
    gini_valid: [B] bool, row has >= 2 valid tokens and positive total weight.
    effective_token_ratio_valid: [B] bool, row has >= 1 valid token and positive total weight.
    """

    gini: Array
    effective_token_ratio: Array
    gini_valid: Array
    effective_token_ratio_valid: Array




def concentration_per_row(weights: Array, mask: Array) -> RowConcentration:
    """Gini coefficient and EffN/T of each row's weights over its valid tokens.

    weights: [B, T] non-negative weights (any float dtype, upcast to float32); invalid positions are
        never read.
    mask: [B, T], nonzero = valid.
    Returns: ``RowConcentration`` of [B] arrays (see there).

    With n valid tokens, S = sum_i w_i and w_(1) <= ... <= w_(n) the valid weights sorted ascending
    (invalid positions are sorted to the end as +inf and never enter the sum):
        G = sum_i (2i - n - 1) w_(i) / (n S)                      (rows with n >= 2)
        EffN/T = S^2 / (n sum_i w_i^2)                            (rows with n >= 1)
    T in EffN/T is the row's number of valid tokens n, so uniform weights give G = 0, EffN/T = 1
    and all weight on one of n tokens gives G = (n-1)/n, EffN/T = 1/n. For weights summing to 1 (as
    ``credit.token_weights`` returns) EffN/T is the paper's 1 / (T sum w^2); the S^2 factor makes it
    scale-invariant for unnormalised inputs. Rows whose valid weights sum to 0 have no defined
    concentration and are marked invalid; NaN weights at valid positions give NaN for that row.
    """
    valid = jnp.asarray(mask) != 0
    w = jnp.asarray(weights).astype(jnp.float32)
    if w.shape != valid.shape:
        raise ValueError(f"weights has shape {w.shape}, mask has shape {valid.shape}")
    w = jnp.where(valid, w, 0.0)
    n = jnp.sum(valid, axis=-1)  # [B]
    nf = n.astype(jnp.float32)
    total = jnp.sum(w, axis=-1)  # [B]
    positive = ~(total <= 0)  # NaN weights stay eligible so that the NaN shows in the logs

    # Rescale each row to sum 1 first (no-op up to rounding for token_weights' output), so that
    # neither S^2 nor n S can overflow for unnormalised inputs.
    u = divide_by_row(w, jnp.where(positive, total, 1.0)[..., None])  # [B, T]

    gini_valid = (n >= 2) & positive
    srt = jnp.sort(jnp.where(valid, u, jnp.inf), axis=-1)  # valid weights first, ascending
    rank = jnp.arange(1, w.shape[-1] + 1, dtype=jnp.float32)  # [T], i = 1..T
    in_row = rank <= nf[..., None]
    coef = 2.0 * rank - nf[..., None] - 1.0
    num = jnp.sum(jnp.where(in_row, coef * jnp.where(in_row, srt, 0.0), 0.0), axis=-1)
    has_nan = jnp.any(valid & jnp.isnan(w), axis=-1)  # explicit: sort/sum NaN order varies
    # clamp: float rounding can give -1e-9 for exactly uniform weights (G is in [0, 1))
    gini = jnp.where(gini_valid, jnp.maximum(num / jnp.maximum(nf, 1.0), 0.0), 0.0)
    gini = jnp.where(gini_valid & has_nan, jnp.nan, gini)

    eff_valid = (n >= 1) & positive
    eff_den = nf * jnp.sum(u * u, axis=-1)  # n sum u^2 >= 1 for a valid row
    eff = jnp.where(eff_valid, 1.0 / jnp.where(eff_valid, eff_den, 1.0), 0.0)
    eff = jnp.where(eff_valid & has_nan, jnp.nan, eff)
    return RowConcentration(gini=gini, effective_token_ratio=eff, gini_valid=gini_valid,
                            effective_token_ratio_valid=eff_valid)


def concentration(weights: Array, mask: Array) -> Concentration:
    """Batch means of the per-row Gini and EffN/T (see ``concentration_per_row``).

    weights, mask: [B, T]. Returns ``Concentration`` of scalars: ``c["gini"]`` averages the rows
    with >= 2 valid tokens, ``c["effective_token_ratio"]`` the rows with >= 1 valid token (rows
    with zero total weight are excluded from both); ineligible rows are skipped, not counted as 0.
    With no eligible row the mean is 0 for gini and 1 for effective_token_ratio (the uniform
    values), and the matching ``*_rows`` count is 0. Under pmap/shard_map the mean is per shard;
    combine shards with the counts. With jit over sharded inputs it is the global batch mean.
    """
    rows = concentration_per_row(weights, mask)
    g_cnt = jnp.sum(rows.gini_valid, dtype=jnp.int32)
    e_cnt = jnp.sum(rows.effective_token_ratio_valid, dtype=jnp.int32)
    g_mean = jnp.sum(rows.gini) / jnp.maximum(g_cnt, 1).astype(jnp.float32)
    e_sum = jnp.sum(rows.effective_token_ratio)
    e_mean = jnp.where(e_cnt > 0, e_sum / jnp.maximum(e_cnt, 1).astype(jnp.float32), 1.0)
    return Concentration(gini=g_mean, effective_token_ratio=e_mean, gini_rows=g_cnt,
                         effective_token_ratio_rows=e_cnt)
