"""The training batch: the one layout the sampler produces and the GRPO step consumes.

    batch = sampling.build_batch(prompt_ids, prompt_mask, out, advantages=adv)   # [B, T]
    state, metrics = train_step(state, params, batch)

Prompt and completion are one sequence of T = P + N tokens (prompts left-padded, completions
right-padded). Dimension letters as in ``arca_jax.qwen3``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional, Union

import jax
from flax import struct

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
