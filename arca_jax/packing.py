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

With shared prompts (``pack(batch, share_prompts=True)``, for a batch that knows its prompt
columns, ``Batch.prompt_width``), consecutive rows with the same prompt (a GRPO group) share it:
a line holds one copy of the prompt followed by as many of the group's completions as fit, and
each completion attends to that copy and to itself. The forwards then run each prompt once per
block of completions instead of once per row; every row's hidden states, taken from its block,
equal the padded forward's up to float rounding, and the gradient reaches the shared copy from
every row it serves.

Dimension letters as in ``arca_jax.qwen3``; L lines, W = T slots per line.
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from arca_jax.qwen3.common import default_positions

Array = jax.Array


@struct.dataclass
class Packing:
    """Where each token of a [B, T] batch sits in L lines of W = T slots.

    src:      [L, W] int32, flat index b * T + t of the batch token in each slot (0 in empty
              slots, whose segment is 0).
    segments: [L, W] int32, b + 1 for a token of row b, 0 for an empty slot; with shared
              prompts, B + 1 + k for the tokens of the k-th prompt copy.
    dst:      [B, T] int32, flat index l * W + w of each real token's slot, -1 for padding (with
              shared prompts the rows of one block map their prompt tokens to the same slots).
    prefix:   [L, W] int32 or None: the segment each slot may attend to besides its own (the
              shared prompt copy before a completion), 0 for none; None without shared prompts.
    """

    src: Array
    segments: Array
    dst: Array
    prefix: Optional[Array] = None

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


def _line_width(T: int, width: Optional[int]) -> int:
    """W: ``width`` (default T), at least the batch's T columns."""
    W = T if width is None else int(width)
    if W < T:
        raise ValueError(f"width {W} is narrower than the batch's {T} columns")
    return W


def _line_count(line_of: np.ndarray, lines: Optional[int], multiple: int) -> int:
    """L: the lines ``line_of`` uses (at least 1), rounded up to a multiple of ``multiple``, at
    least ``lines``."""
    multiple = max(int(multiple), 1)
    L = max(int(line_of.max(initial=-1)) + 1, 1)
    return max(-(-L // multiple) * multiple, int(lines or 0))


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
    W = _line_width(T, width)
    line_of = lines_needed(mask.sum(axis=1), W)
    L = _line_count(line_of, lines, multiple)
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


def prompt_groups(input_ids, attention_mask, positions, prompt_width: int) -> np.ndarray:
    """[B] group of each row (host side): consecutive rows whose prompt columns [0, P) hold the
    same real tokens at the same positions share a group id (0, 1, ...); any difference starts
    a new group."""
    P = int(prompt_width)
    mask = np.asarray(attention_mask)[:, :P] != 0
    ids = np.where(mask, np.asarray(input_ids)[:, :P], 0)
    pos = np.where(mask, np.asarray(positions)[:, :P], 0)
    same = ((mask[1:] == mask[:-1]).all(axis=1) & (ids[1:] == ids[:-1]).all(axis=1)
            & (pos[1:] == pos[:-1]).all(axis=1))
    return np.concatenate([[0], np.cumsum(~same)]).astype(np.int64)


def plan_shared(input_ids, attention_mask, positions, prompt_width: int, *,
                lines: Optional[int] = None, multiple: int = 1,
                width: Optional[int] = None) -> Packing:
    """The packing of a batch [B, T] whose consecutive rows with the same prompt (`prompt_groups`
    of its prompt columns [0, P)) share it (host side, numpy).

    Each group's completions (the real tokens of columns P..T) go first-fit decreasing into
    blocks of one prompt copy (the group's real prompt tokens) and as many completions as fit in
    W slots; the blocks go first-fit decreasing into lines. A completion's slots get its row's
    segment (b + 1) and, as ``prefix``, the segment of its block's prompt copy; every row of a
    block maps its prompt tokens to that copy. Line counts round as in ``plan``.
    """
    mask = np.asarray(attention_mask) != 0
    B, T = mask.shape
    P = int(prompt_width)
    W = _line_width(T, width)
    if not 0 <= P <= T:
        raise ValueError(f"prompt_width {P} is outside the batch's {T} columns")
    groups = prompt_groups(input_ids, mask, positions, P)
    blocks = []  # (the group's real prompt columns, the block's rows)
    for g in np.unique(groups):
        rows = np.flatnonzero((groups == g) & mask.any(axis=1))
        if rows.size == 0:
            continue
        prompt = np.flatnonzero(mask[rows[0], :P])
        block_of = lines_needed(mask[rows, P:].sum(axis=1), W - prompt.size)
        block_of[block_of < 0] = 0  # rows without a completion join the group's first block
        for i in range(int(block_of.max()) + 1):
            blocks.append((prompt, rows[block_of == i]))
    sizes = np.array([pr.size + mask[m, P:].sum() for pr, m in blocks], np.int64)
    line_of = lines_needed(sizes, W)
    L = _line_count(line_of, lines, multiple)
    src = np.zeros((L, W), np.int32)
    segments = np.zeros((L, W), np.int32)
    prefix = np.zeros((L, W), np.int32)
    dst = np.full((B, T), -1, np.int32)
    used = np.zeros(L, np.int64)
    for k in np.argsort(line_of, kind="stable"):
        prompt, members = blocks[k]
        line = line_of[k]
        if line < 0:
            continue
        copy = B + 1 + k
        slots = used[line] + np.arange(prompt.size)
        src[line, slots] = members[0] * T + prompt
        segments[line, slots] = copy
        dst[members[:, None], prompt[None, :]] = line * W + slots[None, :]
        used[line] += prompt.size
        for b in members:
            cols = P + np.flatnonzero(mask[b, P:])
            slots = used[line] + np.arange(cols.size)
            src[line, slots] = b * T + cols
            segments[line, slots] = b + 1
            prefix[line, slots] = copy
            dst[b, cols] = line * W + slots
            used[line] += cols.size
    return Packing(src=jnp.asarray(src), segments=jnp.asarray(segments), dst=jnp.asarray(dst),
                   prefix=jnp.asarray(prefix))


def pack(batch, *, lines: Optional[int] = None, multiple: int = 1, width: Optional[int] = None,
         share_prompts: bool = False):
    """``batch`` (a ``Batch``) with ``packing`` set from its attention mask (see ``plan``); with
    ``share_prompts`` and a known ``batch.prompt_width``, consecutive rows with the same prompt
    share it (``plan_shared``)."""
    P = getattr(batch, "prompt_width", None)
    if share_prompts and P is not None:
        positions = batch.positions
        if positions is None:
            positions = default_positions(jnp.asarray(batch.attention_mask))
        return batch.replace(packing=plan_shared(batch.input_ids, batch.attention_mask, positions,
                                                 P, lines=lines, multiple=multiple, width=width))
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
