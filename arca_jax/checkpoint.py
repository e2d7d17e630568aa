"""Orbax checkpoints of the training state plus a small JSON record (data position, RNG, ...).

Saves are synchronous and atomic: Orbax writes each step into a temporary directory and renames
it when complete, so a process killed in the middle of a save leaves the previous checkpoint
intact, and `latest_step` never returns a half-written one. A save that fails (a full disk, an
unwritable directory) removes what it had written of its step and raises `CheckpointSaveError`.

Each committed step of a local directory also holds a checksum manifest (`MANIFEST`: the size
and SHA-256 of every file of the step, written by process 0 after the commit), so `restore`
detects a damaged checkpoint (a truncated or altered file) before Orbax reads it, including
damage Orbax itself would not notice (a changed byte in an array). A step without a manifest
(killed between the commit and the manifest, or saved by an older version) is checked by
restoring it. `restore` raises `CheckpointError` naming the step; `set_aside` moves a damaged
step out of the way (into `<directory>.damaged/`, never deleted).

Multi-process runs: every process calls `save` and `restore` with the same arguments (Orbax
writes each array shard from one process, the record from process 0, and commits the step
only when every process has finished); the directory must be one every host sees (a shared
file system; URLs such as gs://... are passed to Orbax as they are, untested here, and get no
manifest). `restore` places the arrays as `like` is placed, so a state
saved from one mesh restores onto another (one process or several, another device count).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
from typing import Any, Dict, Optional, Tuple

import flax.serialization
import jax
import numpy as np
import orbax.checkpoint as ocp

from arca_jax import faults
from arca_jax.errors import ConfigError

MANIFEST = "arca_checksums.json"


class CheckpointError(ConfigError):
    """A checkpoint that cannot be loaded. `damaged`: its files are damaged (a checksum, a size
    or Orbax's reading failed); False: the files are intact but do not fit (another version's
    state structure), so it must not be set aside as damaged."""

    def __init__(self, step: int, directory: str, reason: str, damaged: bool = True):
        self.step, self.directory, self.reason, self.damaged = step, directory, reason, damaged
        what = "is damaged" if damaged else "cannot be loaded"
        super().__init__(f"the checkpoint of step {step} in {directory} {what}: {reason}")


class CheckpointSaveError(RuntimeError):
    """Writing a checkpoint failed (a full disk, no permission, ...): nothing of that step is
    left behind half-written, earlier checkpoints are untouched. `latest`: the newest complete
    checkpoint after the failure (None: there is none)."""

    def __init__(self, step: int, directory: str, cause: BaseException,
                 latest: Optional[int] = None):
        self.step, self.directory, self.latest = step, directory, latest
        text = getattr(cause, "strerror", None) or _one_line(cause)
        kept = (f"the latest complete checkpoint is step {latest}" if latest is not None
                else "no complete checkpoint was written yet")
        super().__init__(f"cannot write the checkpoint of step {step} to {directory}: {text}; "
                         f"{kept} (free space or fix the directory, then continue with --resume)")


def _one_line(e: BaseException) -> str:
    lines = [s.strip() for s in str(e).strip().splitlines() if s.strip()]
    return f"{type(e).__name__}: {lines[0][:300] if lines else ''}"


def _file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _step_files(step_dir: str):
    """Relative paths of every file of a step directory, the manifest excluded, sorted."""
    out = []
    for root, _, files in os.walk(step_dir):
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), step_dir)
            if rel != MANIFEST and not rel.endswith(".tmp"):
                out.append(rel)
    return sorted(out)


class Checkpointer:
    """Keeps the last `keep` checkpoints of (state pytree, JSON-able record) under `directory`."""

    def __init__(self, directory: str, keep: int = 3):
        # local paths absolute; URLs (gs://...) as given
        self.local = "://" not in directory
        self.directory = os.path.abspath(directory) if self.local else directory
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                 enable_async_checkpointing=False),
            item_names=("state", "record"))

    def step_dir(self, step: int) -> str:
        return os.path.join(self.directory, str(step))

    # ---------------------------------------------------------------------------------------
    # Saving
    # ---------------------------------------------------------------------------------------

    def save(self, step: int, state: Any, record: Dict[str, Any]) -> None:
        """Writes `state` (any pytree, e.g. a TrainState dataclass) and `record` at `step`, then
        (process 0, local directories) the step's checksum manifest. On failure raises
        `CheckpointSaveError` after removing what it wrote of this step."""
        faults.point("save", step)
        try:
            self._manager.save(step, args=ocp.args.Composite(
                state=ocp.args.StandardSave(flax.serialization.to_state_dict(state)),
                record=ocp.args.JsonSave(record)), force=True)
            self._manager.wait_until_finished()
        except Exception as e:  # noqa: BLE001 - any failure of the write, reported in one line
            self._discard(step)
            raise CheckpointSaveError(step, self.directory, e, self._latest_or_none()) from e
        faults.point("saved", step)
        if self.local and jax.process_index() == 0:
            try:
                self.write_manifest(step)
            except OSError as e:
                # the step itself is complete and committed (restore checks it by reading it)
                raise CheckpointSaveError(step, self.directory, e, self._latest_or_none()) from e

    def _latest_or_none(self) -> Optional[int]:
        try:
            return self.latest_step()
        except Exception:  # noqa: BLE001
            return None

    def write_manifest(self, step: int) -> None:
        d = self.step_dir(step)
        entries = {rel: {"size": os.path.getsize(os.path.join(d, rel)),
                         "sha256": _file_digest(os.path.join(d, rel))} for rel in _step_files(d)}
        tmp = os.path.join(d, MANIFEST + ".tmp")
        try:
            with open(tmp, "w") as f:
                json.dump({"step": step, "files": entries}, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, os.path.join(d, MANIFEST))
        except OSError:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise

    def _discard(self, step: int) -> None:
        """Removes the partial (uncommitted) directories of `step` left by a failed save; never
        a committed step other than a just-committed `step` Orbax failed after."""
        try:  # let Orbax's writer threads of the failed save end before removing their files
            self._manager.wait_until_finished()
        except Exception:  # noqa: BLE001 - the failure being handled, reported by the caller
            pass
        deadline = time.monotonic() + 60.0
        for t in threading.enumerate():  # Orbax's _SignalingThread writers (arrays, metadata)
            if type(t).__name__ == "_SignalingThread" and t is not threading.current_thread():
                t.join(max(0.0, deadline - time.monotonic()))
        if not self.local or jax.process_index() != 0 or not os.path.isdir(self.directory):
            return
        for name in os.listdir(self.directory):
            if name.startswith(f"{step}.orbax-checkpoint-tmp"):
                shutil.rmtree(os.path.join(self.directory, name), ignore_errors=True)
        try:
            self._manager.reload()
        except Exception:  # noqa: BLE001 - best effort; the step list is re-read on restore
            pass

    # ---------------------------------------------------------------------------------------
    # Reading
    # ---------------------------------------------------------------------------------------

    def latest_step(self) -> Optional[int]:
        return self._manager.latest_step()

    def all_steps(self):
        return sorted(self._manager.all_steps())

    def verify(self, step: int) -> Optional[str]:
        """None when the step's files match its manifest (or it has none); else what is wrong."""
        if not self.local:
            return None
        d = self.step_dir(step)
        path = os.path.join(d, MANIFEST)
        if not os.path.isfile(path):
            return None
        try:
            with open(path) as f:
                files = json.load(f)["files"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            return f"its checksum manifest {MANIFEST} is unreadable ({_one_line(e)})"
        for rel, want in files.items():
            p = os.path.join(d, rel)
            if not os.path.isfile(p):
                return f"file {rel} is missing"
            size = os.path.getsize(p)
            if size != want["size"]:
                return f"file {rel} has {size} bytes, {want['size']} were written"
            if _file_digest(p) != want["sha256"]:
                return f"file {rel} does not match its checksum"
        return None

    def restore(self, like: Any, step: Optional[int] = None) -> Tuple[Any, Dict[str, Any], int]:
        """Restores into the structure (and shardings) of `like`; returns (state, record, step).
        A step that fails its checksums, that Orbax cannot read, or whose state holds NaN/inf
        raises `CheckpointError` naming it."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint under {self.directory}")
        if step not in self.all_steps():
            raise FileNotFoundError(f"no checkpoint for step {step} under {self.directory} "
                                    f"(have {self.all_steps()})")
        problem = self.verify(step)
        if problem is not None:
            raise CheckpointError(step, self.directory, problem)
        has_manifest = self.local and os.path.isfile(os.path.join(self.step_dir(step), MANIFEST))
        target = flax.serialization.to_state_dict(like)
        abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, target)
        try:
            out = self._manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), record=ocp.args.JsonRestore()))
            state = flax.serialization.from_state_dict(like, out["state"])
        except Exception as e:  # noqa: BLE001 - Orbax / tensorstore / structure errors
            # intact files (checksums passed) that do not load: a structure mismatch, not damage
            raise CheckpointError(step, self.directory, _one_line(e),
                                  damaged=not has_manifest) from None
        record = dict(out["record"] or {})
        if record.get("step", step) != step:
            raise CheckpointError(step, self.directory,
                                  f"its record says step {record.get('step')}")
        for leaf in jax.tree_util.tree_leaves(state):
            parts = ([leaf] if getattr(leaf, "is_fully_addressable", True)
                     else [s.data for s in leaf.addressable_shards])
            for part in parts:
                a = np.asarray(part)
                if np.issubdtype(a.dtype, np.floating) and not np.isfinite(a).all():
                    raise CheckpointError(step, self.directory, "its state holds NaN or inf values")
        return state, record, step

    def set_aside(self, step: int) -> str:
        """Moves a (damaged) step out of the checkpoints into `<directory>.damaged/<step>[-n]`
        (process 0; kept, never deleted); returns the new path."""
        dest_root = self.directory.rstrip("/") + ".damaged"
        dest = os.path.join(dest_root, str(step))
        if jax.process_index() == 0:
            os.makedirs(dest_root, exist_ok=True)
            n = 1
            while os.path.exists(dest):
                n += 1
                dest = os.path.join(dest_root, f"{step}-{n}")
            os.replace(self.step_dir(step), dest)
        self._manager.reload()
        return dest

    def reload(self) -> None:
        self._manager.reload()

    def close(self):
        self._manager.close()
