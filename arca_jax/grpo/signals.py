"""The one salience pipeline: forwards -> per-token signals -> every method's token weights.

The loss (``objective.loss_fn``) and the trainer's per-method logging (samples.jsonl, the
report's heatmap) both go through here, so the token alignment, the masks and the noise floor
are spelled once:

    valid   = completion_valid(batch)                                  [B, T] bool
    h       = policy_hidden(lora, params, batch, ...)                  [B, T, D] (adapter on)
    signals = token_signals(params, batch, valid, h, need=..., ...)    named [B, T] signals
    w       = method_weights(method, signals, valid, grpo_config)      [B, T], rows sum to 1

Every signal is aligned with ``input_ids``: token t is scored by the hidden state at t - 1, and
each signal is 0 where ``valid`` is False. ``credit.required_inputs(method)`` names the signals a
method reads (any registered weighting, the paper's five or a user's); the base forward (adapter
off) runs only when one of them needs it, once for all.
Dimension letters as in ``arca_jax.qwen3``.
"""

from __future__ import annotations

from typing import Dict, FrozenSet, Iterable, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import struct

from arca_jax import credit, qwen3
from arca_jax.batch import Batch, as_batch
from arca_jax.grpo.config import GRPOConfig
from arca_jax.grpo.logprobs import shift_right, token_logprobs

Array = jax.Array

SIGNALS = ("logps", "entropies", "ref_logps", "residual_norms")
# Signals read from the base forward (adapter off).
_BASE_SIGNALS = frozenset({"ref_logps", "residual_norms"})


@struct.dataclass
class Signals:
    """Per-token signals [B, T] float32 aligned with input_ids, 0 where not valid; None when not
    asked for.

    logps: log pi(y_t) under the adapted policy (differentiable when ``h`` is).
    entropies: predictive entropy (nats) of the distribution that scored token t (detached).
    ref_logps: log pi_ref(y_t) with the adapter off (detached).
    residual_norms: ||h_adapted - h_base||_2 at the position scoring token t, with the noise
        floor applied (detached).
    """

    logps: Array
    entropies: Optional[Array] = None
    ref_logps: Optional[Array] = None
    residual_norms: Optional[Array] = None


def completion_valid(batch: Batch) -> Array:
    """[B, T] bool: tokens that count (completion_mask, attention_mask, and t >= 1)."""
    cm = batch.completion_mask != 0
    if batch.attention_mask is not None:
        cm = cm & (batch.attention_mask != 0)
    return cm & (jnp.arange(cm.shape[1]) >= 1)[None, :]


def signals_needed(methods: Iterable[str], *, kl: bool = False) -> FrozenSet[str]:
    """The signals the given weightings (and the KL term, when ``kl``) read. The policy
    log-probs are always computed (the loss needs them)."""
    need = {"logps"}
    for m in methods:
        need.update(credit.required_inputs(m))
    if kl:
        need.add("ref_logps")
    return frozenset(need)


def needs_base_forward(need: Iterable[str]) -> bool:
    return bool(_BASE_SIGNALS & set(need))


def policy_hidden(lora, params, batch: Batch, *, config: qwen3.Qwen3Config, lora_scale: float,
                  grpo_config: GRPOConfig, lora_dropout: float = 0.0,
                  rng: Optional[Array] = None, remat=False) -> Array:
    """Final hidden states [B, T, D] of one forward (``lora=None``: the base model), with the
    objective's execution options (attention implementation, adapter matmul dtype)."""
    g = grpo_config
    return qwen3.forward(params, batch.input_ids, config=config,
                         attention_mask=batch.attention_mask, positions=batch.positions,
                         lora=lora, lora_scale=lora_scale, lora_dropout=lora_dropout, rng=rng,
                         return_logits=False, remat=remat, attention=g.attention,
                         lora_dtype=g.lora_dtype).hidden


def aligned_logprobs(params, h: Array, batch: Batch, valid: Array, *,
                     config: qwen3.Qwen3Config, grpo_config: GRPOConfig,
                     with_entropy: bool):
    """Log-probs and entropies of input_ids [B, T], aligned with them, 0 where not ``valid``.
    Token t is scored by the hidden state at t - 1, so the chunks run over shift_right(h) on the
    token grid: a completion that starts at a multiple of the chunk size fills whole chunks."""
    lp, ent = token_logprobs(params, shift_right(h), batch.input_ids, config=config,
                             chunk_size=grpo_config.logits_chunk, valid=valid,
                             with_entropy=with_entropy, grad_dtype=grpo_config.logits_grad_dtype,
                             logits_dtype=grpo_config.logits_dtype)
    return jnp.where(valid, lp, 0.0), jnp.where(valid, ent, 0.0)


def residual_norms(h: Array, h_base: Array, valid: Array, noise_floor: float) -> Array:
    """ARCA saliences [B, T] aligned with input_ids: ||h - h_base||_2 at the position whose
    logits score each token (t - 1), 0 where not ``valid``. Below ``noise_floor * ||h_base||``
    the two forwards differ only by float rounding (different fusions of the same math), so a
    zero adapter gives exactly 0, hence uniform weights."""
    hb32 = h_base.astype(jnp.float32)
    diff = h.astype(jnp.float32) - hb32
    rn = jnp.sqrt(jnp.sum(diff * diff, axis=-1))  # [B, T] at the scoring position
    floor = noise_floor * jnp.sqrt(jnp.sum(hb32 * hb32, axis=-1))
    rn = jnp.where(rn > floor, rn, 0.0)
    return jnp.where(valid, shift_right(rn), 0.0)


def floored_reference(logps: Array, ref_logps: Array, noise_floor: float) -> Array:
    """Reference log-probs for the divergence salience with the same noise floor: where
    |log pi - log pi_ref| <= noise_floor * max(1, |log pi_ref|) the reference is taken equal to
    log pi (divergence 0)."""
    close = jnp.abs(logps - ref_logps) <= noise_floor * jnp.maximum(1.0, jnp.abs(ref_logps))
    return jnp.where(close, logps, ref_logps)


def token_signals(params, batch: Batch, valid: Array, h: Array, *, config: qwen3.Qwen3Config,
                  grpo_config: GRPOConfig, need: FrozenSet[str]) -> Signals:
    """The signals in ``need`` from the policy's hidden states ``h`` [B, T, D] (and one base
    forward, adapter off, when a base signal is needed). ``logps`` keeps ``h``'s gradient;
    every other signal is detached."""
    g = grpo_config
    logps, entropies = aligned_logprobs(params, h, batch, valid, config=config, grpo_config=g,
                                        with_entropy="entropies" in need)
    ref_logps = residual = None
    if needs_base_forward(need):
        h_base = jax.lax.stop_gradient(policy_hidden(None, params, batch, config=config,
                                                     lora_scale=1.0, grpo_config=g))
        if "ref_logps" in need:
            ref, _ = aligned_logprobs(params, h_base, batch, valid, config=config, grpo_config=g,
                                      with_entropy=False)
            ref_logps = jax.lax.stop_gradient(ref)
        if "residual_norms" in need:
            residual = residual_norms(jax.lax.stop_gradient(h), h_base, valid, g.noise_floor)
    return Signals(logps=logps, entropies=entropies if "entropies" in need else None,
                   ref_logps=ref_logps, residual_norms=residual)


def method_weights(method: str, signals: Signals, valid: Array,
                   grpo_config: GRPOConfig) -> Array:
    """Token weights [B, T] of ``method`` (any ``credit`` mode) from ``signals`` (detached; rows
    with a valid token sum to 1). A method that reads the reference log-probs (divergence, or a
    user's weighting) gets them with the noise floor (``floored_reference``); the KL term reads
    the unfloored ones."""
    g = grpo_config
    logps = jax.lax.stop_gradient(signals.logps)
    ref = signals.ref_logps
    if "ref_logps" in credit.required_inputs(method):
        ref = floored_reference(logps, ref, g.noise_floor)
    return jax.lax.stop_gradient(credit.token_weights(
        method, valid, logps=logps, ref_logps=ref, entropies=signals.entropies,
        residual_norms=signals.residual_norms, eps=g.eps, sharpening=g.sharpening))


def all_method_weights(lora, params, batch, *, config: qwen3.Qwen3Config, lora_scale: float,
                       grpo_config: GRPOConfig,
                       methods: Sequence[str] = credit.MODES) -> Dict[str, Array]:
    """Every method's token weights [B, T] on the same trajectories (the trainer's samples log
    and the report's credit heatmap): one adapted forward (no dropout) and, when a method needs
    it, one base forward, through the same pipeline as the loss. ``methods``: any ``credit``
    modes (registered names or "module:attribute" paths); the result is keyed by them."""
    b = as_batch(batch)
    valid = completion_valid(b)
    h = policy_hidden(lora, params, b, config=config, lora_scale=lora_scale,
                      grpo_config=grpo_config)
    sig = token_signals(params, b, valid, h, config=config, grpo_config=grpo_config,
                        need=signals_needed(methods))
    return {m: method_weights(m, sig, valid, grpo_config) for m in methods}
