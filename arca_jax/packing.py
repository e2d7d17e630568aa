"""Padding-free training forwards: the rows of a batch packed into fewer lines.

A GRPO batch [B, T] carries every row at the full width T = prompt bucket + generation budget,
while a row's real tokens (its prompt and its completion up to EOS) are often half of that. The
train step's forwards (the gradient forward and ARCA's base forward) can run on the real tokens
only: each row's tokens are copied, in order, into a slot range of one of L <= B lines of width T,
several rows per line, attention is causal within each row's segment, and the hidden states are
copied back to the [B, T] layout for the log-probs, the token weights and the loss, which do not
change. Results equal the padded forward's up to float rounding (other shapes, other sums).

    batch = packing.pack(batch)        # host side: the Batch with `packing` set
    state, metrics = train_step(state, params, batch)

Dimension letters as in ``arca_jax.qwen3``; L lines, W = T slots per line.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

Array = jax.Array


@struct.dataclass
class Packing:
    """Where each token of a [B, T] batch sits in L lines of W = T slots.

    src:      [L, W] int32, flat index b * T + t of the batch token in each slot (0 in empty
              slots, whose segment is 0).
    segments: [L, W] int32, b + 1 for a token of row b, 0 for an empty slot.
    dst:      [B, T] int32, flat index l * W + w of each real token's slot, -1 for padding.
    """

    src: Array
    segments: Array
    dst: Array

    @property
    def lines(self) -> int:
        return self.src.shape[0]


def lines_needed(lengths: np.ndarray, width: int) -> np.ndarray:
    """First-fit decreasing: [B] real tokens per row -> [B] line index of each row (rows of
    length 0 get line -1). Every row fits in one line (length <= width)."""
    lengths = np.asarray(lengths, np.int64)
    if lengths.size and lengths.max() > width:
        raise ValueError(f"a row of {lengths.max()} tokens does not fit a line of {width}")
    line_of = np.full(lengths.shape, -1, np.int64)
    free = []  # remaining slots of each open line
    for b in np.argsort(-lengths, kind="stable"):
        n = int(lengths[b])
        if n == 0:
            continue
        for i, f in enumerate(free):
            if f >= n:
                free[i] -= n
                line_of[b] = i
                break
        else:
            free.append(width - n)
            line_of[b] = len(free) - 1
    return line_of


def plan(attention_mask, *, lines: Optional[int] = None, multiple: int = 1,
         width: Optional[int] = None) -> Packing:
    """The packing of a batch with ``attention_mask`` [B, T] (host side, numpy).

    Each row's real tokens (mask 1, in order; padding anywhere is dropped) go into one line of
    ``width`` slots (W, default T; at least T); lines are filled first-fit decreasing. The number
    of lines is the count needed rounded up to a multiple of ``multiple`` (nearby batches share
    one compiled step), and at least ``lines`` when given (``lines=B``: one line count, so one
    compiled step, for every batch).
    """
    mask = np.asarray(attention_mask) != 0
    B, T = mask.shape
    W = T if width is None else int(width)
    if W < T:
        raise ValueError(f"width {W} is narrower than the batch's {T} columns")
    lengths = mask.sum(axis=1)
    line_of = lines_needed(lengths, W)
    L = int(line_of.max(initial=-1)) + 1
    multiple = max(int(multiple), 1)
    L = max(-(-max(L, 1) // multiple) * multiple, int(lines or 0))
    src = np.zeros((L, W), np.int32)
    segments = np.zeros((L, W), np.int32)
    dst = np.full((B, T), -1, np.int32)
    used = np.zeros(L, np.int64)
    for b in np.argsort(line_of, kind="stable"):
        line = line_of[b]
        if line < 0:
            continue
        cols = np.flatnonzero(mask[b])
        start = used[line]
        slots = start + np.arange(cols.size)
        src[line, slots] = b * T + cols
        segments[line, slots] = b + 1
        dst[b, cols] = line * W + slots
        used[line] += cols.size
    return Packing(src=jnp.asarray(src), segments=jnp.asarray(segments), dst=jnp.asarray(dst))


def pack(batch, *, lines: Optional[int] = None, multiple: int = 1, width: Optional[int] = None):
    """``batch`` (a ``Batch``) with ``packing`` set from its attention mask (see ``plan``)."""
    return batch.replace(packing=plan(batch.attention_mask, lines=lines, multiple=multiple,
                                      width=width))


def to_lines(packing: Packing, x: Array) -> Array:
    """[B, T, ...] -> [L, W, ...]: each slot's token value (empty slots: x's first element,
    masked by segment 0)."""
    B, T = x.shape[:2]
    flat = x.reshape((B * T,) + x.shape[2:])
    return jnp.take(flat, packing.src, axis=0)


def from_lines(packing: Packing, y: Array, axis: int = 0) -> Array:
    """[..., L, W, ...] (lines at ``axis``) -> [..., B, T, ...], 0 at padding tokens."""
    L, W = y.shape[axis], y.shape[axis + 1]
    flat = y.reshape(y.shape[:axis] + (L * W,) + y.shape[axis + 2:])
    out = jnp.take(flat, jnp.maximum(packing.dst, 0), axis=axis)  # [..., B, T, ...]
    keep = (packing.dst >= 0).reshape((1,) * axis + packing.dst.shape
                                      + (1,) * (out.ndim - axis - 2))
    return jnp.where(keep, out, jnp.zeros((), out.dtype))
