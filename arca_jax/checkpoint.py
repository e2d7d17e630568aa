"""Orbax checkpoints of the training state plus a small JSON record (data position, RNG, ...).

Saves are synchronous and atomic: Orbax writes each step into a temporary directory and renames
it when complete, so a process killed in the middle of a save leaves the previous checkpoint
intact, and `latest_step` never returns a half-written one.

Multi-process runs: every process calls `save` and `restore` with the same arguments (Orbax
writes each array shard from one process, the record from process 0, and commits the step
only when every process has finished); the directory must be one every host sees (a shared
file system; URLs such as gs://... are passed to Orbax as they are, untested here). `restore` places the arrays as `like` is placed, so a state
saved from one mesh restores onto another (one process or several, another device count).
"""

from __future__ import annotations

import os
from typing import Any, Dict, Optional, Tuple

import flax.serialization
import jax
import orbax.checkpoint as ocp


class Checkpointer:
    """Keeps the last `keep` checkpoints of (state pytree, JSON-able record) under `directory`."""

    def __init__(self, directory: str, keep: int = 3):
        # local paths absolute; URLs (gs://...) as given
        self.directory = directory if "://" in directory else os.path.abspath(directory)
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                 enable_async_checkpointing=False),
            item_names=("state", "record"))

    def save(self, step: int, state: Any, record: Dict[str, Any]) -> None:
        """Writes `state` (any pytree, e.g. a TrainState dataclass) and `record` at `step`."""
        self._manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(flax.serialization.to_state_dict(state)),
            record=ocp.args.JsonSave(record)), force=True)
        self._manager.wait_until_finished()

    def latest_step(self) -> Optional[int]:
        return self._manager.latest_step()

    def all_steps(self):
        return list(self._manager.all_steps())

    def restore(self, like: Any, step: Optional[int] = None) -> Tuple[Any, Dict[str, Any], int]:
        """Restores into the structure (and shardings) of `like`; returns (state, record, step)."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint under {self.directory}")
        if step not in self.all_steps():
            raise FileNotFoundError(f"no checkpoint for step {step} under {self.directory} "
                                    f"(have {self.all_steps()})")
        target = flax.serialization.to_state_dict(like)
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
        out = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), record=ocp.args.JsonRestore()))
        state = flax.serialization.from_state_dict(like, out["state"])
        return state, dict(out["record"]), step

    def close(self):
        self._manager.close()
