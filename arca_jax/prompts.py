"""Prompt batches for the sampler: left-padded ids [B, P] and mask [B, P] (1 = real token), their
power-of-two widths (so a run compiles a handful of programs, not one per batch) and GRPO groups.

    prompts = repeat_groups(prompt_ids, prompt_mask, group_size)   # [B, P] -> [B G, P]
    out = sampling.generate(params, prompts.ids, prompts.mask, ...)
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np


class Prompts(NamedTuple):
    """Left-padded prompts: ids [B, P] int32, mask [B, P] int32 (1 = real token)."""

    ids: jax.Array
    mask: jax.Array


def bucket_size(n: int, minimum: int = 1) -> int:
    """The smallest power of two >= max(n, minimum)."""
    n = max(int(n), int(minimum), 1)
    return 1 << (n - 1).bit_length()


def new_token_columns(max_new_tokens: int, multiple: int = 16) -> int:
    """The sampler's generation columns (and cache slots past the prompt) for `max_new_tokens`:
    rounded up to a multiple of `multiple`, not to a power of two as prompt widths are (the loop
    stops at max_new_tokens anyway; every column past it would only lengthen each decode step's
    whole-cache attention: 80 new tokens took a 128-column cache before)."""
    n = max(int(max_new_tokens), 1)
    return -(-n // multiple) * multiple


def pad_prompts(prompt_ids, prompt_mask, width: int, pad_id: int = 0) -> Prompts:
    """Left-pads [B, P] prompts with masked `pad_id` columns to [B, width] (width >= P)."""
    P = prompt_ids.shape[1]
    if width < P:
        raise ValueError(f"cannot pad prompts of width {P} to {width}")
    extra = ((0, 0), (width - P, 0))
    return Prompts(ids=jnp.pad(jnp.asarray(prompt_ids, jnp.int32), extra, constant_values=pad_id),
                   mask=jnp.pad(jnp.asarray(prompt_mask, jnp.int32), extra))


def bucket_prompts(prompt_ids, prompt_mask, *, max_tokens: Optional[int] = None, pad_id: int = 0,
                   minimum: int = 16) -> Prompts:
    """Host-side (numpy in, numpy out; a device array is copied to the host): drops the padding
    columns every row has, then left-pads to the next power of two of at least `minimum`, but
    not beyond max(max_tokens, longest prompt) when `max_tokens` is given (a train step's width
    is prompt + max_new_tokens: one compilation per bucket instead of one per longest prompt).

    Raises ValueError when every prompt is empty or the prompts are not left-padded."""
    ids = np.asarray(prompt_ids)
    mask = np.asarray(prompt_mask)
    longest = int(mask.astype(bool).sum(-1).max(initial=0))
    if longest == 0:
        raise ValueError("every prompt is empty")
    first = ids.shape[1] - longest  # left padding: real tokens end at the last column
    if mask[:, :first].any():
        raise ValueError("prompts must be left-padded (real tokens flush with the last column)")
    width = bucket_size(longest, minimum)
    if max_tokens is not None:
        width = min(width, max(int(max_tokens), longest))
    pad = ((0, 0), (width - longest, 0))
    return Prompts(ids=np.pad(ids[:, first:], pad, constant_values=pad_id),
                   mask=np.pad(mask[:, first:], pad))


def repeat_groups(prompt_ids, prompt_mask, group_size: int) -> Prompts:
    """GRPO groups: each prompt repeated `group_size` times, consecutively ([B, P] -> [B G, P];
    row r of the result is prompt r // group_size)."""
    if group_size <= 0:
        raise ValueError(f"group_size must be positive, got {group_size}")
    return Prompts(ids=jnp.repeat(jnp.asarray(prompt_ids, jnp.int32), group_size, axis=0),
                   mask=jnp.repeat(jnp.asarray(prompt_mask, jnp.int32), group_size, axis=0))
