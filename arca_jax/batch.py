"""The training batch: the one layout the sampler produces and the GRPO step consumes.

    batch = build_batch(prompt_ids, prompt_mask, out, advantages=adv)   # [B, T]
    state, metrics = train_step(state, params, batch)

Prompt and completion are one sequence of T = P + N tokens (prompts left-padded, completions
right-padded). Dimension letters as in ``arca_jax.qwen3``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from arca_jax.qwen3.common import default_positions

if TYPE_CHECKING:
    from arca_jax.sampling import SampleOutput

Array = jax.Array


@struct.dataclass
class Batch:
    """B trajectories of T tokens.

    input_ids:       [B, T] int32 tokens, prompt then completion (pad after EOS).
    attention_mask:  [B, T] int32, 1 for real tokens, 0 for padding.
    completion_mask: [B, T] int32, 1 where input_ids[:, t] is a generated token that counts
                     (EOS included unless the trainer excludes it); its log-probability comes from
                     the logits at t - 1, so column 0 never counts.
    advantages:      [B] float32, one scalar per trajectory (``grpo.advantages``).
    positions:       [B, T] int32 rotary positions, or None for cumsum(attention_mask) - 1.
    old_logps:       [B, T] float32 log-probs of the tokens under the policy before this batch's
                     first update (``grpo.policy_logprobs``), or None: then the PPO ratio is 1.
    sample_logps:    [B, T] float32 the sampler's log-probs of the tokens under its plain softmax
                     (temperature 1, full vocabulary), 0 where completion_mask is 0, or None.
    behaviour_logps: [B, T] float32 the log-probs under the distribution the sampler drew from
                     (temperature, top-k, top-p, renormalised), 0 where completion_mask is 0, or
                     None: the behaviour policy of importance corrections.
    packing:         an ``arca_jax.packing.Packing`` of these rows into fewer lines, or None: the
                     train step's forwards then run on the real tokens only (``packing.pack``).
    prompt_width:    P, static: columns [0, P) hold the left-padded prompts and [P, T) the
                     completions (``build_batch`` sets it), or None: unknown. Lets ``packing``
                     share one prompt among the rows that have it.

    Indexable by field name (``batch["input_ids"]``); ``as_batch`` accepts a dict.
    """

    input_ids: Array
    attention_mask: Array
    completion_mask: Array
    advantages: Array
    positions: Optional[Array] = None
    old_logps: Optional[Array] = None
    sample_logps: Optional[Array] = None
    behaviour_logps: Optional[Array] = None
    packing: Any = None
    prompt_width: Optional[int] = struct.field(pytree_node=False, default=None)

    def __getitem__(self, key: str):
        return getattr(self, key)


def as_batch(batch: Union[Batch, Mapping[str, Any]]) -> Batch:
    """A ``Batch`` from a ``Batch`` or a mapping with its field names (unknown keys rejected)."""
    if isinstance(batch, Batch):
        return batch
    names = {f.name for f in dataclasses.fields(Batch)}
    extra = set(batch) - names
    if extra:
        raise ValueError(f"unknown batch keys {sorted(extra)}; expected {sorted(names)}")
    return Batch(**dict(batch))


def build_batch(prompt_ids, prompt_mask, out: "SampleOutput", advantages=None, *,
                mask_tokens: Sequence[int] = ()) -> Batch:
    """Concatenates prompts [B, P] and a `SampleOutput` [B, N] into the training `Batch` [B, P + N].

    advantages: [B] one scalar per row (``grpo.advantages(...).reshape(-1)``); None leaves zeros,
    to be set with ``batch.replace(advantages=...)``. ``sample_logps`` and ``behaviour_logps``
    hold the sampler's two log-probs aligned with input_ids; positions are cumsum(attention_mask) - 1, as sampled.
    mask_tokens: generated tokens with these ids do not count (0 in completion_mask and
    sample_logps) but stay attended to, e.g. ``(eos_id,)`` to keep the EOS token out of the loss.
    """
    B = np.shape(prompt_ids)[0]
    adv = jnp.zeros((B,), jnp.float32) if advantages is None else advantages
    return _build_batch(prompt_ids, prompt_mask, out.tokens, out.mask, out.logps,
                        out.sampled_logps, adv, mask_tokens=tuple(int(t) for t in mask_tokens))


@functools.partial(jax.jit, static_argnames="mask_tokens")
def _build_batch(prompt_ids, prompt_mask, tokens, mask, logps, sampled_logps, advantages, *,
                 mask_tokens: Tuple[int, ...]) -> Batch:
    """`build_batch` as one compiled program (a new process loads it from the compilation cache
    instead of compiling a dozen eager operations)."""
    prompt_ids = jnp.asarray(prompt_ids, jnp.int32)
    prompt_mask = jnp.asarray(prompt_mask, jnp.int32)
    zeros = jnp.zeros_like(prompt_mask)
    attention_mask = jnp.concatenate([prompt_mask, mask], axis=1)
    counted = mask
    for t in mask_tokens:
        counted = jnp.where(tokens == t, 0, counted)
    return Batch(
        input_ids=jnp.concatenate([prompt_ids, tokens], axis=1),
        attention_mask=attention_mask,
        completion_mask=jnp.concatenate([zeros, counted], axis=1),
        advantages=jnp.asarray(advantages, jnp.float32),
        positions=default_positions(attention_mask),
        sample_logps=jnp.concatenate([zeros.astype(jnp.float32),
                                      jnp.where(counted != 0, logps, 0.0)], axis=1),
        behaviour_logps=None if sampled_logps is None else jnp.concatenate(
            [zeros.astype(jnp.float32), jnp.where(counted != 0, sampled_logps, 0.0)], axis=1),
        prompt_width=int(prompt_ids.shape[1]))
