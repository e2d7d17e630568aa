"""The packed train step: how many lines each batch gets, and its programs prepared ahead.

A packed batch (`arca_jax.packing`) has L lines and jit compiles one train-step program per L,
so L trades padding (empty lines computed for nothing) against programs (each new L traces,
lowers and compiles, or loads from the persistent compilation cache, on its step's critical
path). `StepPrograms.pack` chooses L for a batch that needs n lines (first-fit decreasing):

- the smallest count c the run already has with n <= c < n + B / 4 (at most a quarter of the
  batch in empty lines, reusing a program);
- else n rounded up to a multiple of g = B / 16, plus g (a new program, with room for batches
  that need up to g more lines; capped at B).

So a run compiles a new program only when its batches need more lines than it has met (or a
quarter of the batch fewer). Against rounding every batch up to quarters of the batch (the rule
before), simulated on needs drawn around the demo benchmark's (mean 94 of 128 lines, sd 6;
`experiments/sim_line_counts.py`): 1.5 programs in 20 steps instead of 2.0 and 2.2 in 300 steps
instead of 2.0, for about the same mean line count (105-106 against 107), and never all 128 lines
for a batch that needs 97; without the extra g, 2.2 and 2.9 programs for 101 lines. The counts met are part of the checkpoint record
(`known`), so a resumed run packs each batch as an uninterrupted one does.

With ``ahead``, `StepPrograms` also prepares in one background thread the program of the count
the rule picks for a batch needing g more lines than this one, when the run does not have
it: `jit(...).lower(...).compile()` on abstract arguments of that shape fills the caches a call
would, so the later call finds its executable. A step whose program is still being prepared
waits for that preparation instead of compiling the program a second time. The preparation
takes CPU time: free where the host idles while an accelerator runs the step, shared with the
step itself on a CPU-only host (the trainer's default: ahead on GPU and TPU only).

    programs = StepPrograms(train_step, rows=B, known=record.get("packed_line_counts", ()))
    batch = programs.pack(batch)
    state, metrics = programs(state, params, batch, ahead=step + 1 < steps)
    record["packed_line_counts"] = programs.known
    programs.close()   # cancels what has not started, waits for what has
"""

from __future__ import annotations

import concurrent.futures
from typing import Callable, Dict, Iterable, List, Optional

import jax
import numpy as np

from arca_jax import packing


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


def needed_lines(attention_mask) -> int:
    """n: the lines of width T a [B, T] batch's real tokens need (first-fit decreasing)."""
    mask = np.asarray(attention_mask) != 0
    return int(packing.lines_needed(mask.sum(axis=1), mask.shape[1]).max(initial=-1)) + 1


class StepPrograms:
    """Packs batches (`pack`) and runs a jitted ``train_step(state, params, batch)`` on them,
    preparing its programs for coming line counts in a background thread.

    train_step: the jitted step (`grpo.make_train_step(mode="jit")`).
    rows:       B, the batch's rows.
    known:      line counts an earlier part of the run met (its checkpoint record).
    """

    def __init__(self, train_step: Callable, *, rows: int, known: Iterable[int] = ()):
        self._step = train_step
        self.rows = int(rows)
        self.granularity = max(1, self.rows // 16)
        self.slack = max(1, self.rows // 4)
        self._known = {int(c) for c in known}
        self._pool: Optional[concurrent.futures.ThreadPoolExecutor] = None
        self._programs: Dict[int, Optional[concurrent.futures.Future]] = {}  # None: met

    @property
    def known(self) -> List[int]:
        """The line counts met, by this process or by the run before it resumed."""
        return sorted(self._known)

    @property
    def prepared(self) -> Dict[int, str]:
        """This process's line counts -> "met" (a step ran it), "ready" (prepared), "pending",
        "cancelled" (`close` came first) or "failed" (the step compiles it when met)."""
        return {lines: self._status(fut) for lines, fut in sorted(self._programs.items())}

    @staticmethod
    def _status(fut) -> str:
        return ("met" if fut is None else "pending" if not fut.done() else
                "cancelled" if fut.cancelled() else
                "failed" if fut.exception() is not None else "ready")

    def lines_for(self, needed: int) -> int:
        """L for a batch that needs ``needed`` lines (the module's rule)."""
        have = self._known | {c for c, f in self._programs.items()
                              if self._status(f) in ("met", "ready", "pending")}
        fits = [c for c in have if needed <= c < needed + self.slack]
        if fits:
            return min(fits)
        g = self.granularity
        return max(needed, min(-(-max(needed, 1) // g) * g + g, self.rows))

    def pack(self, batch):
        """``batch`` with ``packing`` set, in `lines_for` its need."""
        return packing.pack(batch, lines=self.lines_for(needed_lines(batch.attention_mask)))

    def __call__(self, state, params, batch, *, ahead: bool = True):
        """``train_step(state, params, batch)`` on a `pack`-ed batch; with ``ahead``, then queues
        the program a batch needing g more lines would get, if the run does not have it."""
        lines = batch.packing.lines
        fut = self._programs.get(lines)
        if fut is not None and not fut.cancelled():
            fut.exception()  # wait for it; a failed preparation leaves the call to compile
        spec = jax.tree.map(_spec, (state, params, batch)) if ahead else None  # before donation
        out = self._step(state, params, batch)
        self._programs[lines] = None
        self._known.add(lines)
        if ahead:
            n = self.lines_for(self.filled(batch) + self.granularity)
            if n not in self._programs:
                self._programs[n] = self._submit(self._prepare, spec, n)
        return out

    @staticmethod
    def filled(batch) -> int:
        """The lines of a packed batch that hold tokens."""
        return int((np.asarray(batch.packing.segments) > 0).any(axis=1).sum())

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
