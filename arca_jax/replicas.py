"""The sampler on several devices at once, each decoding its own share of the rows in its own
loop (`sampling.generate(devices=...)`); on a CPU host, two devices per core.

A decode step of a small model is about a hundred kernels of a few microseconds each, and
XLA:CPU splits few of them over the cores: the demo's decode loop ran 1.18x faster on two cores
than on one (`experiments/NOTES_sampling.md`, "One sampler per core"). Given several CPU devices
(`use_cpu_cores`, which the trainer's commands call before JAX starts), `sample` splits the rows
into one contiguous run of whole prompt groups per device and samples each run in a loop of its
own: one program (`jax.shard_map`, nothing communicated between the devices), each device
stopping when its own rows have ended, the cores working at once. Two loops per core fill the
gaps each leaves between its small kernels (`DEVICES_PER_CORE`).

Each row reads the uniforms of its own column of one draw over all rows
(`sampling.prefill(rows_of=...)`), so the tokens are those of one run on one device with the same
key, and the log-probs too up to float rounding of the batch's matmuls (as with refill). Each
device holds a copy of the sampling weights (a CPU device's memory is the host's) and the cache
of its own slots.
"""

from __future__ import annotations

import os
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from arca_jax import host_memory, qwen3, sampling

AXIS = "replica"
# Slots each device decodes at least when the count is left to `devices` (None): the demo
# model's rollout on a 2-core Xeon, one device against two (`profile_rollout.py --replicas 1,2`):
# 16 slots 50 -> 57 ms (slower), 32 slots 106 -> 74 ms, 128 slots 447 -> 278 ms; a model of
# hidden 256, 16 slots 388 -> 427 ms, 128 slots 2.07 -> 1.68 s (`bench_sampling.py`).
MIN_SLOTS = 16
# CPU devices (and so default sampler replicas) per core: the demo's rollout on a 2-core Xeon, 4
# devices against 2 (`profile_rollout.py --replicas 4,2`, one process, alternating): 128 rows
# 0.318-0.344 s against 0.393-0.406 s in three runs, 64 rows 0.177 against 0.208 s, 256 rows
# 0.540 against 0.603 s; 8 devices for 128 rows 0.477 against 0.422 s (slower).
DEVICES_PER_CORE = 2
NUM_CPU_DEVICES_ENV = "JAX_NUM_CPU_DEVICES"
_DEVICE_COUNT_FLAG = "xla_force_host_platform_device_count"


def cores() -> int:
    """CPU cores this process may run on (its affinity mask; os.cpu_count() where unknown)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def use_cpu_cores(environ=os.environ) -> Optional[int]:
    """Gives JAX `DEVICES_PER_CORE` CPU devices per core (`jax_num_cpu_devices`, before its
    backends start) when it can run on the CPU only and no CPU device count is set already
    (`JAX_NUM_CPU_DEVICES`, XLA_FLAGS' --xla_force_host_platform_device_count); returns the count
    set, else None. A program calling the library directly may call it before its first JAX
    computation. The devices share one thread pool of the host's cores."""
    if (environ.get(NUM_CPU_DEVICES_ENV) or _DEVICE_COUNT_FLAG in environ.get("XLA_FLAGS", "")
            or host_memory.backends_started() or not host_memory.cpu_only(environ=environ)):
        return None
    n = cores() * DEVICES_PER_CORE
    if n > 1:
        jax.config.update("jax_num_cpu_devices", n)
    return n


def resolve(replicas: Optional[int], platform: Optional[str] = None) -> int:
    """How many devices sample at once (`sampling.generate(devices=...)`): `replicas` as given
    (an int >= 1, at most the default backend's local devices), or for None on CPU (`platform`,
    default JAX's default backend) `DEVICES_PER_CORE` per core, up to the CPU devices JAX has (1
    unless `use_cpu_cores` or a device count gave it more); 1 elsewhere (`devices` also bounds
    it by the slots)."""
    if replicas is None:
        if (platform or jax.default_backend()) != "cpu":
            return 1
        return max(1, min(cores() * DEVICES_PER_CORE, jax.local_device_count()))
    if isinstance(replicas, bool) or not isinstance(replicas, (int, np.integer)) or replicas < 1:
        raise ValueError(f"replicas must be None or an int >= 1, got {replicas!r}")
    if replicas > jax.local_device_count():
        raise ValueError(f"replicas={replicas}: this process has {jax.local_device_count()} "
                         f"{jax.default_backend()} device(s)")
    return int(replicas)


def devices(replicas: Optional[int], rows: Optional[int] = None,
            max_batch: Optional[int] = None) -> Optional[Sequence[jax.Device]]:
    """The devices `resolve(replicas)` samples on, None for one (the arrays' own device). For
    `replicas` None and `rows` given, no more devices than give each `MIN_SLOTS` of the slots
    (`max_batch` of the rows, else all; fewer decode slower split than whole)."""
    n = resolve(replicas)
    if replicas is None and rows is not None:
        slots = min(int(max_batch or rows), int(rows))
        n = max(1, min(n, slots // MIN_SLOTS))
    return None if n == 1 else jax.local_devices()[:n]


def _sample(weights, prompt_ids, prompt_mask, rng, limit, *, config, settings, mesh,
            group_size: int, slots: Optional[int], admit_rows: Optional[int], shrink: int,
            rows: int) -> sampling.SampleOutput:
    """prefill, decode and finish on each device of `mesh` for its [R / n] prompt rows (R padded
    rows, `rows` of them real); the outputs [R, ...] split as the rows, num_steps the longest
    device's, slot_steps their sum."""

    def body(weights, ids, mask, rng, limit):
        first = jax.lax.axis_index(AXIS) * ids.shape[0]
        state = sampling.prefill(weights, ids, mask, config=config, settings=settings, rng=rng,
                                 limit=limit, group_size=group_size, slots=slots,
                                 admit_rows=admit_rows, rows_of=(first, rows))
        state = sampling.decode(weights, state, config=config, settings=settings, shrink=shrink)
        out = sampling.finish(state)
        return out.replace(num_steps=out.num_steps[None], slot_steps=out.slot_steps[None])

    split, same = PartitionSpec(AXIS), PartitionSpec()
    # check_vma off: the loop's carry mixes per-device values with ones the devices share
    # (the loop never communicates, so nothing is lost by not tracking which is which)
    out = jax.shard_map(body, mesh=mesh, in_specs=(same, split, split, same, same),
                        out_specs=split, check_vma=False)(weights, prompt_ids, prompt_mask,
                                                          rng, limit)
    return out.replace(num_steps=jnp.max(out.num_steps), slot_steps=jnp.sum(out.slot_steps))


sample_jit = jax.jit(_sample, static_argnames=("config", "settings", "mesh", "group_size", "slots",
                                                "admit_rows", "shrink", "rows"))


def sample(run: Callable, weights: qwen3.InferenceWeights, prompt_ids: jax.Array,
           prompt_mask: jax.Array, *, rng: jax.Array, limit: jax.Array,
           devices: Sequence[jax.Device], config, settings: sampling.SamplingConfig,
           group_size: int, slots: Optional[int], admit_rows: Optional[int],
           shrink: int) -> sampling.SampleOutput:
    """`sampling.generate`'s prefill, decode and finish for B rows [B, P] over `devices` (n):
    the rows padded to a multiple of n G (the last group repeated), each device taking R / n of
    them with ceil(slots / n) slots rounded up to whole groups (`admit_rows` per device); the
    output [B, N] on devices[0]. `run(name, jitted, args, kwargs, static)` calls or loads the
    program (`generate`'s store)."""
    n, G = len(devices), int(group_size)
    B = prompt_ids.shape[0]
    if B % G:
        raise ValueError(f"group_size {G} must divide the {B} rows")
    R = -(-B // (n * G)) * n * G
    if R > B:  # whole groups per device: the last group again (sampled, then cut off)
        extra = B - G + np.arange(R - B) % G
        take = np.concatenate([np.arange(B), extra])
        prompt_ids, prompt_mask = prompt_ids[take], prompt_mask[take]
    per = R // n
    S = None if slots is None else min(per, -(-int(slots) // (n * G)) * G)
    mesh = Mesh(np.asarray(devices), (AXIS,))
    same, split = NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh, PartitionSpec(AXIS))
    weights, rng, limit = jax.device_put((weights, rng, limit), same)
    prompt_ids, prompt_mask = jax.device_put((prompt_ids, prompt_mask), split)
    name = "replicas-" + "-".join(str(d.id) for d in devices)  # a stored program's devices
    out = run(name, sample_jit, (weights, prompt_ids, prompt_mask, rng, limit), {},
              dict(config=config, settings=settings, mesh=mesh, group_size=G,
                   slots=None if S == per else S, admit_rows=admit_rows, shrink=int(shrink),
                   rows=B))
    out = jax.device_put(out, devices[0])
    if R > B:
        out = jax.tree_util.tree_map(lambda x: x[:B] if x.ndim else x, out)
    return out
