"""The packed train step's programs for line counts a run has not met yet, prepared ahead.

A packed batch (`arca_jax.packing`) has L lines, L a multiple of m = B / 4, so a run meets up to
four train-step programs, one per L. The first time a step's batch needs an L the run has not
met, jit traces, lowers and compiles (or loads from the persistent compilation cache) its program
on that step's critical path. `StepPrograms` runs the step and, in one background thread,
prepares the program of the line count the next batches lean towards: L + m when this batch
filled more than L - m / 2 lines (close to needing the next count), else L - m; once each.
`jit(...).lower(...).compile()` on abstract arguments of that shape fills the caches a call
would, so the later call finds its executable. A step whose program is still being prepared waits
for that preparation instead of compiling the program a second time.

The preparation takes CPU time: free where the host idles while an accelerator runs the step,
shared with the step itself on a CPU-only host. Hence one neighbour, the likely one, at a time.

    programs = StepPrograms(train_step, multiple=B // 4, rows=B)
    state, metrics = programs(state, params, batch, ahead=step + 1 < steps)
    ...
    programs.close()   # cancels what has not started, waits for what has
"""

from __future__ import annotations

import concurrent.futures
from typing import Callable, Dict, Optional

import jax
import numpy as np


def _spec(x):
    """A leaf's abstract value for `lower`: shape, dtype, weak type, and the sharding only of an
    array committed to its devices (an uncommitted one lowers as the call does, unplaced)."""
    if not isinstance(x, jax.Array):
        return x
    committed = getattr(x, "_committed", True)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, weak_type=x.weak_type,
                                sharding=x.sharding if committed else None)


def _with_lines(batch_spec, lines: int):
    """The abstract packed batch with `lines` lines ([L, W] src and segments; dst [B, T] keeps
    its shape)."""
    p = batch_spec.packing
    line = lambda s: jax.ShapeDtypeStruct((lines,) + s.shape[1:], s.dtype, weak_type=s.weak_type,
                                          sharding=s.sharding)
    return batch_spec.replace(packing=p.replace(src=line(p.src), segments=line(p.segments)))


class StepPrograms:
    """Runs a jitted ``train_step(state, params, batch)`` on packed batches and prepares, in a
    background thread, its programs for the neighbouring line counts.

    train_step: the jitted step (`grpo.make_train_step(mode="jit")`).
    multiple:   m, the step between line counts (`packing.pack(multiple=m)`).
    rows:       B, the largest line count (one row per line).
    """

    def __init__(self, train_step: Callable, *, multiple: int, rows: int):
        self._step = train_step
        self.multiple = max(int(multiple), 1)
        self._rows = int(rows)
        self._pool: Optional[concurrent.futures.ThreadPoolExecutor] = None
        self._programs: Dict[int, Optional[concurrent.futures.Future]] = {}  # None: met

    @property
    def prepared(self) -> Dict[int, str]:
        """Line count -> "met" (a step ran it), "ready" (prepared), "pending", "cancelled"
        (`close` came first) or "failed" (the step compiles it when met)."""
        out = {}
        for lines, fut in sorted(self._programs.items()):
            out[lines] = ("met" if fut is None else "pending" if not fut.done() else
                          "cancelled" if fut.cancelled() else
                          "failed" if fut.exception() is not None else "ready")
        return out

    def __call__(self, state, params, batch, *, ahead: bool = True):
        """``train_step(state, params, batch)``; with ``ahead``, then queues the program of the
        line count this batch leans towards, if neither met nor queued yet."""
        lines = batch.packing.lines
        fut = self._programs.get(lines)
        if fut is not None and not fut.cancelled():
            fut.exception()  # wait for it; a failed preparation leaves the call to compile
        spec = jax.tree.map(_spec, (state, params, batch)) if ahead else None  # before donation
        out = self._step(state, params, batch)
        self._programs[lines] = None
        if ahead:
            n = self.leaning(batch)
            if 0 < n <= self._rows and n not in self._programs:
                self._programs[n] = self._submit(self._prepare, spec, n)
        return out

    def leaning(self, batch) -> int:
        """The line count next to the batch's that its fill leans towards: L + m when more than
        L - m / 2 lines hold tokens, else L - m."""
        lines = batch.packing.lines
        filled = int((np.asarray(batch.packing.segments) > 0).any(axis=1).sum())
        up = 2 * filled > 2 * lines - self.multiple
        return lines + self.multiple if up else lines - self.multiple

    def _submit(self, fn, *args) -> concurrent.futures.Future:
        if self._pool is None:
            self._pool = concurrent.futures.ThreadPoolExecutor(
                1, thread_name_prefix="arca-step-programs")
        return self._pool.submit(fn, *args)

    def _prepare(self, spec, lines: int) -> None:
        state, params, batch = spec
        self._step.lower(state, params, _with_lines(batch, lines)).compile()

    def wait(self) -> None:
        """Waits for every queued preparation."""
        concurrent.futures.wait([f for f in self._programs.values() if f is not None])

    def close(self) -> None:
        """Cancels the preparations that have not started and waits for the one running."""
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
