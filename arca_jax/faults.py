"""Test-only fault injection: the trainer SIGKILLs itself at named points of a run.

`ARCA_JAX_FAULTS` (unset in normal use) holds comma-separated `point@step` or
`point@step+seconds` items: when the run reaches `point` at `step`, the process sends itself
SIGKILL at once, or after `seconds` from a timer thread (so the kill lands inside the phase that
follows, e.g. during a checkpoint save). Points: "eval" (an evaluation starts), "sampling",
"scoring", "update" (phases of the step that ends at `step`), "samples" (samples.jsonl),
"save" (a checkpoint save starts) and "saved" (Orbax committed the step, its checksum manifest is
not written yet). Used by tests/trainer/test_reliability.py; costs one dictionary look-up per
point otherwise.
"""

from __future__ import annotations

import os
import signal
import threading
from typing import Dict, Optional, Tuple

ENV = "ARCA_JAX_FAULTS"
_plan: Optional[Dict[Tuple[str, int], float]] = None


def _parse(text: str) -> Dict[Tuple[str, int], float]:
    plan = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        name, _, rest = item.partition("@")
        step, _, delay = rest.partition("+")
        plan[(name, int(step))] = float(delay or 0.0)
    return plan


def _kill() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def point(name: str, step: int) -> None:
    """Marks `name` at `step`; kills the process when `ARCA_JAX_FAULTS` asks for it."""
    global _plan
    if _plan is None:
        _plan = _parse(os.environ.get(ENV, ""))
    if not _plan or (name, step) not in _plan:
        return
    delay = _plan[(name, step)]
    if delay <= 0:
        _kill()
    timer = threading.Timer(delay, _kill)
    timer.daemon = True
    timer.start()
