"""The einsum attention of `qwen3.forward` ("einsum" implementation): masked softmax attention
over [B, K, G, T, S] scores, with a backward that recomputes the probabilities
(`masked_attention`), the same formula left to autodiff (`plain_attention`), and causal query
blocks that skip the scores above the diagonal blocks (`causal_blocks`). Dimension letters as
in `arca_jax.qwen3` (S: key slots)."""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp


# Query blocks of the einsum attention where `attention_blocks` is None and the step runs on CPU:
# the demo's shared-prompt ARCA step (lines of 224 slots) 406 -> 304-324 ms with 4 blocks
# (experiments/NOTES_vs_trl.md, "Freed memory reused, causal query blocks"; 2 blocks compiled
# faster but stepped slower there); GPU and TPU keep one block until measured.
CPU_ATTENTION_BLOCKS = 4


def resolve_attention_blocks(blocks: Optional[int], platform: Optional[str] = None) -> int:
    """The einsum attention's query block count (`causal_blocks`): `blocks` as given (an int >= 1),
    or for None `CPU_ATTENTION_BLOCKS` when `platform` (default: JAX's default backend) is "cpu",
    else 1 (one block: every query against every key, the program as before blocks existed)."""
    if blocks is None:
        return CPU_ATTENTION_BLOCKS if (platform or jax.default_backend()) == "cpu" else 1
    if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 1:
        raise ValueError(f"attention_blocks must be None or an int >= 1, got {blocks!r}")
    return blocks


def causal_blocks(attend, q, k, v, visible, blocks: int):
    """`attend` over `blocks` query blocks, in the model's layout: q [B, T, K, G, H], k and v
    [B, S, K, H], visible [B, T, S] -> [B, T, K, G, H]. q, k and v are moved to the head-major
    layout `attend` takes (q [B, K, G, T, H], k and v [B, K, S, H]) once, before the blocks, so
    that each block's slices feed its dots as they are (sliced from the model's layout, every
    block's k, v and probabilities were copied into its dots' layout: 0.19 of the demo's update
    time on CPU). The query axis is split into consecutive runs of about T / blocks queries,
    block i attending to the keys up to its last query's slot only. A causal mask (`visible`
    never true for a key after its query: `forward`'s always) makes the values those of one call,
    for about (blocks + 1) / (2 blocks) of its score work (the scores above the diagonal blocks
    are not computed). A query that sees nothing averages the keys of its block's range instead
    of all S. One block: `attend` once."""
    T = q.shape[1]
    blocks = max(1, min(blocks, T))
    q = jnp.transpose(q, (0, 2, 3, 1, 4))  # [B, K, G, T, H]
    k, v = (jnp.transpose(x, (0, 2, 1, 3)) for x in (k, v))  # [B, K, S, H]
    ends = [round(T * (i + 1) / blocks) for i in range(blocks)]
    starts = [0] + ends[:-1]
    outs = [attend(q[:, :, :, a:b], k[:, :, :b], v[:, :, :b], visible[:, a:b, :b])
            for a, b in zip(starts, ends)]
    out = outs[0] if blocks == 1 else jnp.concatenate(outs, axis=3)
    return jnp.transpose(out, (0, 3, 1, 2, 4))  # [B, T, K, G, H]


def _masked_scores(q, k, visible):
    """[B, K, G, T, S] float32 scaled scores, float32 min where not visible."""
    H = q.shape[-1]
    s = jnp.einsum("BKGTH,BKSH->BKGTS", q, k, preferred_element_type=jnp.float32) * (H ** -0.5)
    return jnp.where(visible[:, None, None, :, :], s, jnp.finfo(jnp.float32).min)


def plain_attention(q, k, v, visible):
    """`masked_attention`'s values, left to autodiff (the probabilities kept for the backward)."""
    probs = jax.nn.softmax(_masked_scores(q, k, visible), axis=-1)
    return jnp.einsum("BKGTS,BKSH->BKGTH", probs.astype(v.dtype), v)


@jax.custom_vjp
def masked_attention(q, k, v, visible):
    """softmax(q k^T / sqrt(H) where visible) v, head-major: q [B, K, G, T, H], k and v
    [B, K, S, H], visible [B, T, S] bool -> [B, K, G, T, H] in v's dtype (a query that sees
    nothing averages every slot, as the plain softmax of equal scores does).

    The backward recomputes the probabilities from q, k and each row's max and sum of exponentials
    (kept from the forward, [B, K, G, T, 1] float32) instead of keeping them: the [B, K, G, T, S] probabilities
    are not among the residuals (the layer scan stacked them per layer), as in PyTorch's SDPA.
    The gradient equals autodiff's of the plain formula up to float rounding
    (tests/model/test_attention_vjp.py). `forward` uses it without remat only: a rematerialised
    layer's replay computes the probabilities anyway, and recomputing them again cost the paper's
    TPU train step 1% (Qwen3-1.7B on v6e-8, remat on: roofline 0.185 -> 0.187 s)."""
    return _attention_fwd(q, k, v, visible)[0]


def _attention_fwd(q, k, v, visible):
    s = _masked_scores(q, k, visible)
    m = jnp.max(s, -1, keepdims=True)
    e = jnp.exp(s - m)
    l = jnp.sum(e, -1, keepdims=True)
    out = jnp.einsum("BKGTS,BKSH->BKGTH", (e / l).astype(v.dtype), v)
    return out, (q, k, v, visible, m, l)


def _attention_bwd(res, dout):
    q, k, v, visible, m, l = res
    H = q.shape[-1]
    # exp(s - m) / l, not exp(s - log-sum-exp): for a query that sees nothing m is float32 min,
    # and min + log(l) rounds back to min
    p = jnp.exp(_masked_scores(q, k, visible) - m) / l
    # dv and dk with the small operand first: XLA:CPU then transposes it, not the probabilities
    dv = jnp.einsum("BKGTH,BKGTS->BKSH", dout, p.astype(v.dtype))
    dp = jnp.einsum("BKGTH,BKSH->BKGTS", dout, v, preferred_element_type=jnp.float32)
    ds = p * (dp - jnp.sum(p * dp, -1, keepdims=True)) * (H ** -0.5)
    ds = jnp.where(visible[:, None, None, :, :], ds, 0.0).astype(q.dtype)  # masked: constant
    dq = jnp.einsum("BKGTS,BKSH->BKGTH", ds, k)
    dk = jnp.einsum("BKGTH,BKGTS->BKSH", q, ds)
    return dq, dk, dv, None


masked_attention.defvjp(_attention_fwd, _attention_bwd)
