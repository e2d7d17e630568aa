"""Run-directory outputs: JSON-lines logs, TensorBoard events, and the console display.

The files are those of the run-directory contract (`arca_jax.rundir`).
Only process 0 writes (`enabled=False` elsewhere). Lines are flushed as they are written, so a
killed run leaves every complete line readable. A resumed run trims what the killed attempt wrote
after its checkpoint: the JSON-lines logs (`truncate_jsonl`) and the TensorBoard events
(`tfevents.truncate_events`), so no step appears twice in either.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any, Dict, Optional

from arca_jax import rundir, tfevents
from arca_jax.rundir import LogWriteError


def _clean(value: Any) -> Any:
    """JSON-safe: numpy/JAX scalars to Python numbers, NaN/inf to None."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class RunLog:
    def __init__(self, run_dir: str, enabled: bool = True, tensorboard: bool = True,
                 stream=None, interactive: Optional[bool] = None):
        self.run_dir = run_dir
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.interactive = (self.stream.isatty() if interactive is None else interactive)
        self._files: Dict[str, Any] = {}
        self._tb = None
        self._tb_wanted = enabled and tensorboard
        self._bar_open = False

    def _events(self) -> Optional[tfevents.EventFile]:
        """The event file, opened at the first scalar (so that a resumed run trims the events of
        its killed attempt before a new file exists); None when disabled."""
        if self._tb is None and self._tb_wanted:
            self._tb = tfevents.EventFile(rundir.path(self.run_dir, rundir.TENSORBOARD))
        return self._tb

    def _append(self, name: str, record: Dict[str, Any]):
        if not self.enabled:
            return
        path = os.path.join(self.run_dir, name)
        try:
            f = self._files.get(name)
            if f is None:
                f = self._files[name] = open(path, "a")
            f.write(json.dumps(_clean(record)) + "\n")
            f.flush()
        except OSError as e:
            raise LogWriteError(path, e) from e

    def metrics(self, record: Dict[str, Any]):
        self._append(rundir.METRICS, record)
        if self._events() is not None:
            self._events().scalars(record["step"], {
                f"train/{k}": v for k, v in _clean(record).items()
                if k != "step" and isinstance(v, (int, float))})

    def eval(self, record: Dict[str, Any]):
        self._append(rundir.EVAL, record)
        if self._events() is not None:
            self._events().scalars(record["step"], {
                f"eval/{k}": record[k] for k in ("greedy_accuracy", "pass_at_k")
                if record.get(k) is not None})
        self.message(f"eval step {record['step']}: greedy accuracy {record['greedy_accuracy']:.3f}, "
                     f"pass@{record['k']} {record['pass_at_k']:.3f} "
                     f"({record['num_problems']} problems)")

    def sample(self, record: Dict[str, Any]):
        self._append(rundir.SAMPLES, record)

    def summary(self, record: Dict[str, Any]):
        if not self.enabled:
            return
        tmp = os.path.join(self.run_dir, "summary.json.tmp")
        try:
            with open(tmp, "w") as f:
                json.dump(_clean(record), f, indent=2)
            os.replace(tmp, rundir.path(self.run_dir, rundir.SUMMARY))
        except OSError as e:
            raise LogWriteError(rundir.path(self.run_dir, rundir.SUMMARY), e) from e

    def progress(self, step: int, total: int, m: Dict[str, Any]):
        """A live line on a terminal, a plain log line otherwise."""
        if not self.enabled:
            return
        gini = m.get("weight_gini")
        text = (f"step {step}/{total}  reward {m['reward_mean']:.3f}  loss {m['loss']:+.4f}  "
                f"gini {gini if gini is None else format(gini, '.3f')}  "
                f"len {m['completion_length']:.1f}  {m['step_time_s']:.2f}s/step")
        if self.interactive:
            width = 30
            done = int(width * step / max(total, 1))
            self.stream.write(f"\r[{'#' * done}{'.' * (width - done)}] {text}\x1b[K")
            self._bar_open = True
        else:
            self.stream.write(f"{time.strftime('%H:%M:%S')} {text}\n")
        self.stream.flush()

    def message(self, text: str):
        if not self.enabled:
            return
        if self._bar_open:
            self.stream.write("\n")
            self._bar_open = False
        self.stream.write(f"{time.strftime('%H:%M:%S')} {text}\n")
        self.stream.flush()

    def flush(self):
        """Hands every record written so far to the OS (each is flushed as written already;
        this makes the guarantee explicit before a checkpoint: a process killed afterwards has
        logged every step the checkpoint holds)."""
        for f in self._files.values():
            f.flush()
        if self._tb is not None:
            self._tb.flush()

    def close(self):
        if self._bar_open:
            self.stream.write("\n")
            self._bar_open = False
        for f in self._files.values():
            f.close()
        self._files.clear()
        self._tb_wanted = False
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def truncate_jsonl(path: str, last_step: int) -> None:
    """Drops lines with step > last_step (and a partial last line): used when resuming, so the
    log continues exactly where the checkpoint left off."""
    if not os.path.exists(path):
        return
    keep = []
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                break
            if rec.get("step", 0) <= last_step:
                keep.append(line if line.endswith("\n") else line + "\n")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(keep)
    os.replace(tmp, path)
