"""Device layouts: a ("data", "fsdp") mesh with named shardings, pmap helpers, and the rows of a
batch across the processes of a multi-host run (`RowLayout`).

Mesh layout (``make_train_step(mode="mesh")``):
- base parameters: each large leaf is sharded over "fsdp" along one dimension, chosen by the
  dimension letters of ``arca_jax.qwen3`` (embedding [V, D]: V, then D; lm_head [D, V]: V, then
  D; layer kernels [L, I, O]: I (the input width), then O); a dimension not divisible by the
  fsdp size is skipped, and a leaf with no divisible candidate (or a norm scale) is replicated.
  XLA all-gathers each layer's kernels where they are used (FSDP / ZeRO-3 for the frozen base).
- batch: the leading B axis over ("data", "fsdp") together (each device holds different rows);
  over "data" alone when B is not divisible by the whole mesh; replicated when not even that.
- train state (LoRA, optimiser moments, counters): replicated. The adapter is small (69.7M
  float32 parameters for Qwen3-1.7B, r = 64) next to the base model.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA, FSDP = "data", "fsdp"

# Dimension letters of each parameter leaf, by its last path key (and parent for lm_head).
_LAYOUTS = {
    "embedding": "VD",
    "lm_head": "DV",
    "kernel": "LIO",  # layers/<block>/<proj>/kernel [L, in, out]
}
# Which letters to shard, in order of preference.
_PREFERENCE = {"VD": "VD", "DV": "VD", "LIO": "IO"}


def make_mesh(data: int = 1, fsdp: Optional[int] = None,
              devices: Optional[Sequence[Any]] = None) -> Mesh:
    """A Mesh with axes ("data", "fsdp") of shape (data, fsdp); fsdp defaults to the remaining
    devices (len(devices) // data)."""
    devices = list(jax.devices() if devices is None else devices)
    if fsdp is None:
        fsdp = len(devices) // data
    if data * fsdp > len(devices) or data < 1 or fsdp < 1:
        raise ValueError(f"mesh ({data}, {fsdp}) needs {data * fsdp} devices, have {len(devices)}")
    return Mesh(np.asarray(devices[: data * fsdp]).reshape(data, fsdp), (DATA, FSDP))


def _path_keys(path) -> list:
    return [getattr(k, "key", getattr(k, "name", str(k))) for k in path]


def param_partition_spec(path_keys: Sequence[str], shape: Sequence[int], fsdp_size: int) -> P:
    """PartitionSpec of one base-parameter leaf (see the module doc)."""
    last = path_keys[-1] if path_keys else ""
    layout = None
    if last == "embedding":
        layout = _LAYOUTS["embedding"]
    elif last == "kernel" and "lm_head" in path_keys:
        layout = _LAYOUTS["lm_head"]
    elif last == "kernel" and len(shape) == 3:
        layout = _LAYOUTS["kernel"]
    if layout is None or len(layout) != len(shape) or fsdp_size <= 1:
        return P()
    for letter in _PREFERENCE[layout]:
        dim = layout.index(letter)
        if shape[dim] % fsdp_size == 0:
            spec = [None] * len(shape)
            spec[dim] = FSDP
            return P(*spec)
    return P()


def param_shardings(params, mesh: Mesh):
    """Tree of NamedShardings for the base parameters (works on arrays or ShapeDtypeStructs)."""
    size = mesh.shape[FSDP]
    return jax.tree_util.tree_map_with_path(
        lambda p, x: NamedSharding(mesh, param_partition_spec(_path_keys(p), x.shape, size)),
        params)


def batch_spec(batch_size: int, mesh: Mesh) -> P:
    """Spec of the leading batch axis: ("data", "fsdp"), else "data", else replicated."""
    if batch_size % (mesh.shape[DATA] * mesh.shape[FSDP]) == 0:
        return P((DATA, FSDP))
    if batch_size % mesh.shape[DATA] == 0:
        return P(DATA)
    return P()


def batch_shardings(batch, mesh: Mesh):
    """NamedShardings for a batch pytree whose leaves share the leading B axis."""
    leaves = [x for x in jax.tree_util.tree_leaves(batch)]
    if not leaves:
        return batch
    spec = batch_spec(leaves[0].shape[0], mesh)
    return jax.tree_util.tree_map(lambda x: NamedSharding(mesh, spec), batch)


def replicated(tree, mesh: Mesh):
    """NamedShardings replicating every leaf of ``tree`` over the mesh."""
    return jax.tree_util.tree_map(lambda x: NamedSharding(mesh, P()), tree)


def shard_params(params, mesh: Mesh):
    """Places the base parameters once, fsdp-sharded (call before the first step)."""
    return jax.device_put(params, param_shardings(params, mesh))


def shard_batch(batch, mesh: Mesh):
    return jax.device_put(batch, batch_shardings(batch, mesh))


def replicate_on_mesh(tree, mesh: Mesh):
    return jax.device_put(tree, replicated(tree, mesh))


# --------------------------------------------------------------------------------------------
# pmap
# --------------------------------------------------------------------------------------------


def replicate(tree, devices: Optional[Sequence[Any]] = None):
    """Copies a tree to every local device with a leading device axis (for pmap; do it once).

    Each leaf becomes an [n, ...] array sharded over its first axis, one copy per device (built
    from per-device copies: no n-fold array is ever formed on one device)."""
    devices = list(jax.local_devices() if devices is None else devices)
    sharding = NamedSharding(Mesh(np.asarray(devices), ("devices",)), P("devices"))

    def rep(x):
        x = jnp.asarray(x) if not isinstance(x, (jax.Array, np.ndarray)) else x
        shards = [jax.device_put(x[None], d) for d in devices]
        return jax.make_array_from_single_device_arrays((len(devices),) + x.shape, sharding,
                                                        shards)
    return jax.tree_util.tree_map(rep, tree)


def unreplicate(tree):
    """The first device's copy of a pmap-replicated tree."""
    return jax.tree_util.tree_map(lambda x: x[0], tree)


def split_batch(batch, n: int):
    """[B, ...] leaves -> [n, B / n, ...] (contiguous rows per device)."""
    def split(x):
        if x.shape[0] % n:
            raise ValueError(f"batch size {x.shape[0]} is not divisible by {n} devices")
        return x.reshape((n, x.shape[0] // n) + x.shape[1:])
    return jax.tree_util.tree_map(split, batch)



# --------------------------------------------------------------------------------------------
# Rows of a batch across processes (multi-host runs)
# --------------------------------------------------------------------------------------------


class RowLayout:
    """Which rows of a [B, ...] batch this process holds and which it owns (scores).

    With a mesh, the batch is sharded like the train step's (``batch_spec``): `local` are the rows
    held by this process's devices (sorted); `owned` the rows this process answers for (each
    row's lowest-numbered holding process; with the batch over the whole mesh a row has one
    holder, so owned == local). Without a mesh (one device, or pmap, which splits batches
    itself) every row is local and owned and the arrays live on the default device. With one
    process both are every row either way.
    """

    def __init__(self, mesh: Optional[Mesh], batch_size: int):
        self.mesh = mesh
        self.batch_size = B = batch_size
        if mesh is None:
            self.sharding = None
            self.owner = np.zeros(B, np.int64)
            self.local = self.owned = np.arange(B)
            return
        self.sharding = NamedSharding(mesh, batch_spec(B, mesh))
        me = jax.process_index()
        self.owner = np.full(B, np.iinfo(np.int32).max, np.int64)
        local = np.zeros(B, bool)
        for dev, index in self.sharding.devices_indices_map((B,)).items():
            rows = np.arange(B)[index[0]]
            self.owner[rows] = np.minimum(self.owner[rows], dev.process_index)
            if dev.process_index == me:
                local[rows] = True
        self.local = np.flatnonzero(local)
        self.owned = np.flatnonzero(self.owner == me)

    @classmethod
    def padded(cls, mesh: Optional[Mesh], rows: int) -> "RowLayout":
        """A layout of `rows` rows rounded up to a multiple of the mesh's device count."""
        size = 1 if mesh is None else mesh.size
        return cls(mesh, -(-rows // size) * size)

    def to_global(self, full) -> jax.Array:
        """A global [B, ...] array from a host array every process holds in full (each passes
        only its own rows: `jax.make_array_from_process_local_data`); rows beyond the array's
        are filled by repeating its last row (real inputs, dropped afterwards)."""
        full = pad_rows(np.asarray(full), self.batch_size)
        if self.sharding is None:
            return jnp.asarray(full)
        return jax.make_array_from_process_local_data(self.sharding, full[self.local], full.shape)

    def host(self, x: jax.Array) -> np.ndarray:
        """A [B, ...] host copy of a global array holding (at least) this process's owned rows
        (other rows 0), from its addressable shards: no communication."""
        if self.sharding is None or x.is_fully_addressable:
            return np.asarray(x)
        x_shape = tuple(x.shape)
        full = np.zeros(x_shape, x.dtype)
        have = np.zeros(x_shape[0], bool)
        for shard in x.addressable_shards:
            full[shard.index] = np.asarray(shard.data)
            have[np.arange(x_shape[0])[shard.index[0]]] = True
        if not have[self.owned].all():
            raise RuntimeError("a rollout array does not hold this process's rows (unexpected "
                               f"sharding {x.sharding})")
        return full

    def combine(self, tree):
        """Per-row host arrays [B, ...] filled at this process's owned rows -> the full arrays on
        every process (one all-gather of the whole tree)."""
        if jax.process_count() == 1:
            return tree
        from arca_jax import distributed
        stacked = distributed.allgather(tree)
        rows = np.arange(self.batch_size)
        return jax.tree_util.tree_map(lambda a: a[self.owner, rows], stacked)

    def gather_rows(self, x: jax.Array, rows: np.ndarray) -> np.ndarray:
        """Rows `rows` of a global [B, ...] array on every process (collective with several)."""
        if not isinstance(x, jax.Array) or x.is_fully_addressable:
            return np.asarray(x)[rows]
        from arca_jax import distributed
        full = self.host(x)
        part = np.where((self.owner[rows] == jax.process_index()).reshape(
            (-1,) + (1,) * (full.ndim - 1)), full[rows], 0)
        stacked = distributed.allgather(part)
        return stacked[self.owner[rows], np.arange(len(rows))]


def pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
    """[n, ...] -> [rows, ...] by repeating the last row (n <= rows)."""
    x = np.asarray(x)
    return x if x.shape[0] == rows else np.concatenate([x, np.repeat(x[-1:], rows - x.shape[0], 0)])
