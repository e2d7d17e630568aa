"""The run-directory contract: the files a training run writes and `arca-jax report` / `eval` /
`export` / `sweep` read. JAX-free (the report imports it).

    config.yaml     the resolved run config
    metrics.jsonl   one object per training step
    eval.jsonl      one object per evaluation (step 0 = the base model, before training)
    samples.jsonl   a few completions with their reward and every method's token weights
    summary.json    written once, at the end (``finished: true``)
    checkpoints/    Orbax checkpoints, one directory per step
    tb/             TensorBoard event files
"""

from __future__ import annotations

import os

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
EVAL = "eval.jsonl"
SAMPLES = "samples.jsonl"
SUMMARY = "summary.json"
CHECKPOINTS = "checkpoints"
TENSORBOARD = "tb"
# Logs with one record per step, trimmed back to the checkpoint a run resumes from.
STEP_LOGS = (METRICS, SAMPLES, EVAL)


def path(run_dir: str, name: str) -> str:
    """The path of one of the files above inside `run_dir`."""
    return os.path.join(run_dir, name)


class LogWriteError(RuntimeError):
    """A run-directory log could not be written (a full disk, a lost mount, ...). What was
    written before stays readable (a torn last line or record is dropped on resume), and the
    checkpoints are untouched: free the space and continue with --resume."""

    def __init__(self, path: str, cause: OSError):
        self.path = path
        reason = getattr(cause, "strerror", None) or str(cause)
        super().__init__(f"cannot write {path} ({reason}); the run stopped, its checkpoints are "
                         "intact: free space and continue with --resume")
