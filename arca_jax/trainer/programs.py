"""The packed train step: how many lines each batch gets, and its programs prepared ahead.

A packed batch (`arca_jax.packing`) has L lines and jit compiles one train-step program per L,
so L trades padding (empty lines computed for nothing) against programs (each new L traces,
lowers and compiles, or loads from the persistent compilation cache, on its step's critical
path). `StepPrograms.pack` gives a batch that needs n lines (first-fit decreasing) n rounded up
to a quarter of the batch's B T slots (a multiple of B / 4 lines of T slots; with shared
prompts, `packing.plan_shared`, of B / (4 w) lines of w T slots, w = ``line_width``): at most
four programs per run,
the same four for every run of a config
(so a second run finds them in the compilation cache), and each batch's count depends on the
batch alone (a resumed run packs as an uninterrupted one). Finer counts pad less but meet more
programs: reusing counts a run has met and otherwise rounding to sixteenths of the batch (with a
sixteenth of room) compiled new programs mid-run in runs whose programs were cached, because each
run met other counts (`experiments/NOTES_vs_trl.md`, "Line counts and programs").

With ``ahead``, `StepPrograms` also prepares in one background thread the program of the next
count up when a batch fills its count to within half a quarter: `jit(...).lower(...).compile()` on
abstract arguments of that shape fills the caches a call would, so the later call finds its
executable. A step whose program is still being prepared waits for that preparation instead of
compiling the program a second time. The preparation takes CPU time: free where the host idles
while an accelerator runs the step, shared with the step itself on a CPU-only host (the
trainer's default: ahead on GPU and TPU only).

    programs = StepPrograms(train_step, rows=B)
    batch = programs.pack(batch)
    state, metrics = programs(state, params, batch, ahead=step + 1 < steps)
    programs.close()   # cancels what has not started, waits for what has
"""

from __future__ import annotations

import concurrent.futures
from typing import Callable, Dict, Optional

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
    line = lambda s: None if s is None else jax.ShapeDtypeStruct(
        (lines,) + s.shape[1:], s.dtype, weak_type=s.weak_type, sharding=s.sharding)
    return batch_spec.replace(packing=p.replace(src=line(p.src), segments=line(p.segments),
                                                prefix=line(p.prefix)))


class StepPrograms:
    """Packs batches (`pack`) and runs a jitted ``train_step(state, params, batch)`` on them,
    preparing its program for the next line count in a background thread.

    train_step:    the jitted step (`grpo.make_train_step(mode="jit")`).
    rows:          B, the batch's rows.
    share_prompts: the rows of a group share their prompt's slots (`packing.plan_shared`), in
                   lines of ``line_width`` T slots (fewer prompt copies: one per line a group's
                   completions fill), counted in quarters of the batch's B T slots as well
                   (B / (4 line_width) lines).
    line_width:    W / T of shared-prompt lines (`trainer.setup.line_width` picks it).
    store:         an `executables.ExecutableStore`: each line count's program is loaded from
                   it (no tracing) or compiled and written to it; None: the jitted step as is.
                   With a store nothing is prepared ahead (`ahead` is ignored).
    """

    def __init__(self, train_step: Callable, *, rows: int, share_prompts: bool = False,
                 line_width: int = 2, store=None):
        self._step = train_step
        self.store = store
        self.rows = int(rows)
        self.share_prompts = bool(share_prompts)
        if int(line_width) < 1:
            raise ValueError(f"line_width must be >= 1, got {line_width!r}")
        # W / T of a batch that knows its prompts
        self.widen = int(line_width) if self.share_prompts else 1
        self.max_lines = -(-self.rows // self.widen)  # the whole batch's slots
        self.multiple = self._multiple(self.widen)
        self._pool: Optional[concurrent.futures.ThreadPoolExecutor] = None
        self._programs: Dict[int, Optional[concurrent.futures.Future]] = {}  # None: met

    @property
    def prepared(self) -> Dict[int, str]:
        """Line counts -> "met" (a step ran it), "ready" (prepared), "pending", "cancelled"
        (`close` came first) or "failed" (the step compiles it when met)."""
        return {lines: self._status(fut) for lines, fut in sorted(self._programs.items())}

    @staticmethod
    def _status(fut) -> str:
        return ("met" if fut is None else "pending" if not fut.done() else
                "cancelled" if fut.cancelled() else
                "failed" if fut.exception() is not None else "ready")

    def _multiple(self, widen: int) -> int:
        """Lines of widen T slots in a quarter of the batch's B T slots."""
        return max(1, self.rows // (4 * widen))

    def lines_for(self, needed: int, widen: Optional[int] = None) -> int:
        """L for a batch that needs ``needed`` lines of ``widen`` T slots (None: this instance's
        lines): rounded up to a multiple of B / 4 (B / (4 w) in lines of w T)."""
        m = self.multiple if widen is None else self._multiple(widen)
        return -(-max(needed, 1) // m) * m

    def pack(self, batch):
        """``batch`` with ``packing`` set, in `lines_for` its need (`packing.plan` rounds the
        first-fit count up to the same multiple). A batch that does not know its prompt width
        packs unshared, in lines of T."""
        share = self.share_prompts and batch.prompt_width is not None
        widen = self.widen if share else 1
        return packing.pack(batch, multiple=self._multiple(widen), share_prompts=share,
                            width=widen * batch.attention_mask.shape[1])

    def __call__(self, state, params, batch, *, ahead: bool = True):
        """``train_step(state, params, batch)`` on a `pack`-ed batch; with ``ahead``, then queues
        the program of the next count up when this batch fills its count to within half a
        multiple (once each)."""
        lines = batch.packing.lines
        fut = self._programs.get(lines)
        if fut is not None and not fut.cancelled():
            fut.exception()  # wait for it; a failed preparation leaves the call to compile
        widen = batch.packing.src.shape[1] // batch.attention_mask.shape[1]  # W / T
        half = max(1, self._multiple(widen) // 2)
        nxt = self.lines_for(self.filled(batch) + half, widen) if ahead else lines
        queue = (nxt != lines and nxt not in self._programs and self.store is None
                 and nxt <= -(-self.rows // widen))  # at most the whole batch's slots
        spec = jax.tree.map(_spec, (state, params, batch)) if queue else None  # before donation
        if self.store is not None:
            step = self.store.compiled("train_step", self._step, (state, params, batch))
        else:
            step = self._step
        out = step(state, params, batch)
        self._programs[lines] = None
        if queue:
            self._programs[nxt] = self._submit(self._prepare, spec, nxt)
        return out

    @staticmethod
    def filled(batch) -> int:
        """The lines of a packed batch that hold tokens."""
        return int((np.asarray(batch.packing.segments) > 0).any(axis=1).sum())

    @staticmethod
    def occupancy(batch) -> tuple:
        """(slots, tokens) of a packed batch: the L W slots its forwards run on and the real
        tokens among them (a shared prompt counted once per copy)."""
        seg = np.asarray(batch.packing.segments)
        return int(seg.size), int((seg > 0).sum())

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
