"""Token log-probabilities and predictive entropies from final hidden states, in chunks.

With Qwen3's 151,936-token vocabulary, [B, T, V] float32 logits for 8 x 1024 tokens are 4.6 GiB,
and the backward pass would keep them (or their softmax) alive. These functions never materialise
them: they scan over chunks of C positions, compute [B, C, V] float32 logits for one chunk,
reduce them to [B, C] values and drop them. The chunk body is under ``jax.checkpoint``, so the
backward pass recomputes each chunk's logits instead of storing them.

Dimension letters as in ``arca_jax.qwen3``: B batch, T time, C chunk, D model width, V vocabulary.
"""

from __future__ import annotations

import functools
from typing import Any, Optional, Tuple

import jax
import jax.numpy as jnp

from arca_jax import qwen3
from arca_jax.batch import Batch

Array = jax.Array


def _head(params, config: qwen3.Qwen3Config) -> Tuple[Array, str]:
    """The output projection and its einsum layout, without transposing a tied embedding."""
    if config.tie_word_embeddings:
        return params["embed_tokens"]["embedding"], "VD"  # [V, D], used as is: no [D, V] copy
    return params["lm_head"]["kernel"], "DV"


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _head_logits(h, w, layout: str, grad_dtype):
    """[B, C, D] x head -> [B, C, V] logits accumulated and returned in float32; the backward
    matmuls take the float32 cotangent rounded to ``grad_dtype`` (bf16 operands on tensor cores,
    as the forward's, instead of a float32 x bf16 matmul that XLA runs in float32/TF32)."""
    return jnp.einsum(f"BCD,{layout}->BCV", h, w.astype(h.dtype),
                      preferred_element_type=jnp.float32)


def _head_logits_fwd(h, w, layout, grad_dtype):
    return _head_logits(h, w, layout, grad_dtype), (h, w)


def _head_logits_bwd(layout, grad_dtype, res, g):
    h, w = res
    g = g.astype(grad_dtype)
    dh = jnp.einsum(f"BCV,{layout}->BCD", g, w.astype(grad_dtype),
                    preferred_element_type=jnp.float32)
    dw = jnp.einsum(f"BCD,BCV->{layout}", h.astype(grad_dtype), g,
                    preferred_element_type=jnp.float32)  # dead code unless the head trains
    return dh.astype(h.dtype), dw.astype(w.dtype)


_head_logits.defvjp(_head_logits_fwd, _head_logits_bwd)


def token_logprobs(params, hidden: Array, targets: Array, *, config: qwen3.Qwen3Config,
                   chunk_size: int = 128, valid: Optional[Array] = None,
                   with_entropy: bool = True, grad_dtype: Any = None,
                   logits_dtype: Any = "float32") -> Tuple[Array, Array]:
    """log p(targets[b, t] | hidden[b, t]) and the entropy of that distribution, chunked over T.

    params: base parameter tree (only the output projection is read).
    hidden: [B, T, D] final post-norm hidden states (any float dtype; the logits are accumulated
        in float32, as ``qwen3.compute_logits``).
    targets: [B, T] int token ids to score at each position.
    chunk_size: C, positions per chunk (T is padded up to a multiple of C internally).
    valid: optional [B, T] bool; chunks without a single valid position skip the vocabulary
        projection (a ``lax.cond``) and return 0 there. Results at invalid positions are
        meaningless either way; callers mask them.
    with_entropy: also return entropies (else zeros, and the entropy reduction is not computed).
    grad_dtype: dtype of the backward matmuls through the vocabulary projection (the float32
        cotangent of the logits is rounded to it). None: the hidden states' dtype (bf16 under a
        bf16 model: bf16 rounding of the gradient, as the forward's operands; float32 models are
        unchanged). "float32": the cotangent stays float32 (jax's default transpose: a float32 x
        bf16 matmul, which XLA runs in float32/TF32 after converting the head to float32).
    logits_dtype: "float32" (default) or "bfloat16": the float32 logits are rounded to it before
        the log-softmax and the entropy (the precision a bfloat16 model's logits come in).

    Returns: (logps [B, T] float32, differentiable with respect to ``hidden``;
              entropies [B, T] float32 in nats, under ``stop_gradient``).
    """
    B, T, D = hidden.shape
    C = max(1, min(int(chunk_size), T))
    pad = (-T) % C
    if valid is None:
        valid = jnp.ones((B, T), bool)
    valid = valid.astype(bool)
    if pad:
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        targets = jnp.pad(targets, ((0, 0), (0, pad)))
        valid = jnp.pad(valid, ((0, 0), (0, pad)))
    n = (T + pad) // C
    h = hidden.reshape(B, n, C, D).swapaxes(0, 1)  # [n, B, C, D]
    tg = targets.astype(jnp.int32).reshape(B, n, C).swapaxes(0, 1)  # [n, B, C]
    vl = valid.reshape(B, n, C).swapaxes(0, 1)  # [n, B, C]
    w, layout = _head(params, config)
    gd = jnp.dtype(hidden.dtype if grad_dtype is None else grad_dtype)
    round_logits = jnp.dtype(logits_dtype) != jnp.dtype(jnp.float32)
    if round_logits and jnp.dtype(logits_dtype) != jnp.dtype(jnp.bfloat16):
        raise ValueError(f"logits_dtype must be float32 or bfloat16, got {logits_dtype!r}")

    def compute(h_c, t_c):
        if gd == jnp.dtype(jnp.float32):  # jax's own transpose (a float32 cotangent)
            logits = jnp.einsum(f"BCD,{layout}->BCV", h_c, w.astype(h_c.dtype),
                                preferred_element_type=jnp.float32)  # [B, C, V]
        else:
            logits = _head_logits(h_c, w, layout, gd.name)
        if round_logits:
            logits = logits.astype(jnp.bfloat16).astype(jnp.float32)
        lse = jax.nn.logsumexp(logits, axis=-1)  # [B, C]
        vocab = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 2)
        # one-hot select instead of a gather: fuses into the reduction, sharding-friendly over V
        picked = jnp.sum(jnp.where(vocab == t_c[..., None], logits, 0.0), axis=-1)
        logp = picked - lse
        if with_entropy:
            lg = jax.lax.stop_gradient(logits)
            ls = jax.lax.stop_gradient(lse)
            p = jnp.exp(lg - ls[..., None])
            ent = ls - jnp.sum(p * lg, axis=-1)
        else:
            ent = jnp.zeros_like(logp)
        return logp, ent

    def skip(h_c, t_c):
        z = jnp.zeros(t_c.shape, jnp.float32)
        return z, z

    @jax.checkpoint
    def body(h_c, t_c, v_c):
        return jax.lax.cond(jnp.any(v_c), compute, skip, h_c, t_c)

    _, (lp, ent) = jax.lax.scan(lambda c, x: (c, body(*x)), None, (h, tg, vl))
    lp = lp.swapaxes(0, 1).reshape(B, T + pad)[:, :T]
    ent = ent.swapaxes(0, 1).reshape(B, T + pad)[:, :T]
    return lp, jax.lax.stop_gradient(ent)


def shift_right(x: Array, fill=0) -> Array:
    """[B, T] values computed at position t for token t+1 -> aligned with the token they score.

    Output[:, t] = x[:, t - 1] for t >= 1 and ``fill`` at t = 0 (the first token has no
    predecessor, so it is never scored)."""
    first = jnp.full(x.shape[:1] + (1,) + x.shape[2:], fill, x.dtype)
    return jnp.concatenate([first, x[:, :-1]], axis=1)


def next_tokens(input_ids: Array) -> Array:
    """[B, T] ids -> [B, T] targets: position t scores input_ids[:, t + 1]; the last gets 0."""
    return jnp.concatenate([input_ids[:, 1:], jnp.zeros_like(input_ids[:, :1])], axis=1)


def sequence_logps(params: qwen3.Params, batch: Batch, *, config: qwen3.Qwen3Config,
                   lora: Optional[qwen3.Params] = None, lora_scale: float = 1.0) -> jax.Array:
    """Teacher-forced log p(input_ids[:, t] | input_ids[:, :t]) [B, T] float32 (0 at t = 0), from one
    `qwen3.forward` over the whole batch. Materialises [B, T, V] logits: a reference for tests and
    small batches (a training step over a large vocabulary computes this in chunks)."""
    out = qwen3.forward(params, batch.input_ids, config=config, attention_mask=batch.attention_mask,
                        positions=batch.positions, lora=lora, lora_scale=lora_scale)
    logp = jax.nn.log_softmax(out.logits[:, :-1], axis=-1)
    picked = jnp.take_along_axis(logp, batch.input_ids[:, 1:, None], axis=-1)[..., 0]
    return jnp.pad(picked, ((0, 0), (1, 0)))
