"""Device layouts: a ("data", "fsdp", "tensor") mesh with named shardings, pmap helpers, and the
rows of a batch across the processes of a multi-host run (`RowLayout`).

Mesh layout (``make_train_step(mode="mesh")``, ``sampling.generate(mesh=...)``):
- "tensor" (Megatron-style tensor parallelism): q/k/v and gate/up kernels [L, I, O] are split by
  output (heads, intermediate units), o and down by input, so each device computes its heads and
  its slice of the MLP and one all-reduce per block joins them. k/v are split only when the
  number of kv heads K is a multiple of the tensor size; with K < tensor they are replicated (the
  sampler then keeps one copy of each kv head per device that needs it, `kv_layout`). The
  embedding [V, D] and the head [D, V] are split over V (vocabulary-parallel: the chunked
  log-probs reduce over V with all-reduces of [B, C] values, no device holds [B, T, V]).
  The adapters follow their base layer: a column-parallel layer's B [L, R, O] is split by O, a
  row-parallel layer's A [L, I, R] by I, and the other factor is replicated, so x A B needs no
  gather of an adapter (row-parallel layers all-reduce the small [B, T, R] product x A).
- "fsdp": each large base leaf is also sharded over "fsdp" along a dimension tensor does not
  use (embedding [V, D] and head [D, V]: V, then D; layer kernels [L, I, O]: I, then O); a
  dimension not divisible by the axis size is skipped (the leaf is then replicated over that
  axis). XLA all-gathers each layer's kernels over "fsdp" where they are used (ZeRO-3 for the
  frozen base).
- experts (mixture-of-experts models): the stacked expert kernels [Ls, E, in, out] (training
  tree) and [E, in, out] (the sampler's `SparseMlp`) are split on E over "fsdp" when E is a
  multiple of its size (expert parallelism: each device holds E / fsdp experts and computes
  them, the tokens travel to them, `qwen3.moe.expert_parallel`), replicated over "data" and
  "tensor"; otherwise replicated (each device runs every expert on its own rows). The router
  [D, E] is a layer kernel as above, not split over "tensor".
- batch: the leading B axis over ("data", "fsdp") together (each such device holds different
  rows, the same rows on every device of one tensor group); over "data" alone when B is not
  divisible by data x fsdp; replicated when not even that.
- train state (LoRA, optimiser moments, counters) and the step's gradient, ZeRO-style: every
  factor is split over "tensor" as the adapters above and over "fsdp" along its wide dimension
  (A's I, B's O; jointly with "tensor" where tensor splits it; else the rank R; else replicated
  over "fsdp", `lora_partition_spec`), replicated over "data"; counters and the PRNG key
  replicated (`state_shardings`). A mixture of experts' expert adapters [Ls, E, ., .] follow
  their expert kernels instead: split on E over "fsdp" when divisible, in both layouts (the
  forward finds each expert's factors where the expert is). Each device owns 1 / fsdp of every
  factor and of its Adam moments. The step all-gathers the factors over "fsdp" for the forward (one whole adapter per
  device while the step runs), constrains the gradient to the owned layout (XLA reduces the
  devices' contributions onto each slice: a reduce-scatter, or on XLA:CPU, which computes each
  layer's adapter gradient from activations it gathers over "fsdp" for the base layers, just the
  slice) and applies the update to the owned slice. Per-device bytes: `train_state_bytes`
  (fsdp=False: the layout replicated over "fsdp", for comparison).

Device order (`make_mesh`): on TPU the mesh follows the physical topology
(`jax.experimental.mesh_utils`), with "tensor" on the innermost, fastest links; over several
slices the mesh is hybrid, "data" spanning the slices (data-centre network) and "fsdp" and
"tensor" within each slice (ICI). Elsewhere devices are taken process-major (each process's devices
form consecutive mesh positions).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA, FSDP, TENSOR = "data", "fsdp", "tensor"
AXES = (DATA, FSDP, TENSOR)

# Projections split by output (column-parallel) and by input (row-parallel) over "tensor".
COLUMN_PARALLEL = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROW_PARALLEL = ("o_proj", "down_proj")
KV_PROJS = ("k_proj", "v_proj")


def make_mesh(data: int = 1, fsdp: Optional[int] = None, tensor: int = 1,
              devices: Optional[Sequence[Any]] = None) -> Mesh:
    """A Mesh with axes ("data", "fsdp", "tensor") of shape (data, fsdp, tensor).

    fsdp defaults to the remaining devices (len(devices) // (data * tensor)). The first
    data x fsdp x tensor devices are used, ordered as the module doc says (physical topology on
    TPU, hybrid over several slices, process-major elsewhere).
    """
    devices = list(jax.devices() if devices is None else devices)
    _check_sizes(data=data, tensor=tensor)
    if fsdp is None:
        fsdp = len(devices) // (data * tensor)
    n = data * fsdp * tensor
    if fsdp < 1 or n > len(devices):
        raise ValueError(f"mesh (data {data}, fsdp {fsdp}, tensor {tensor}) needs {n} devices, "
                         f"have {len(devices)}")
    return Mesh(_device_grid(devices[:n], (data, fsdp, tensor)), AXES)


def reshape_mesh(mesh: Mesh, fsdp: int = 1, tensor: int = 1) -> Mesh:
    """`mesh`'s devices, in the same order, as a mesh of shape (data, fsdp, tensor) with data the
    rest (``mesh.size // (fsdp * tensor)``): e.g. the rollout mesh (`rollout.mesh_tensor`) of a
    train mesh.

    The order is kept so that one jitted program can take arrays laid out on `mesh` and place
    its results on the new mesh (jit needs every sharding on the same device order: the sampler's
    weight preparation reads the train layout's base weights and writes the rollout layout's);
    consecutive devices, which `make_mesh` puts on neighbouring chips on TPU and in one process
    elsewhere, form the new "tensor" groups. ValueError unless fsdp x tensor divides the devices.
    """
    _check_sizes(fsdp=fsdp, tensor=tensor)
    n = int(mesh.devices.size)
    if n % (fsdp * tensor):
        raise ValueError(f"fsdp {fsdp} x tensor {tensor} does not divide the mesh's {n} devices")
    return Mesh(mesh.devices.reshape(n // (fsdp * tensor), fsdp, tensor), AXES)


def _check_sizes(**sizes) -> None:
    """ValueError unless every named mesh axis size is a positive int (not a bool)."""
    for name, v in sizes.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"mesh {name} must be a positive int, got {v!r}")


def _device_grid(devices: list, shape) -> np.ndarray:
    """The devices arranged as a [data, fsdp, tensor] array (see the module doc)."""
    from jax.experimental import mesh_utils

    slices = sorted({getattr(d, "slice_index", 0) or 0 for d in devices})
    if devices[0].platform == "tpu" and len(slices) > 1:
        if shape[0] % len(slices):
            raise ValueError(f"mesh data={shape[0]} must be a multiple of the {len(slices)} "
                             "slices (data spans the slices)")
        return mesh_utils.create_hybrid_device_mesh(
            (shape[0] // len(slices),) + tuple(shape[1:]), (len(slices), 1, 1), devices,
            allow_split_physical_axes=True)
    if devices[0].platform == "tpu":
        return mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    ordered = sorted(devices, key=lambda d: (d.process_index, d.id))
    return np.asarray(ordered, dtype=object).reshape(shape)


def axis_size(mesh: Optional[Mesh], axis: str) -> int:
    """The size of `axis` in `mesh` (1 when the mesh is None or lacks the axis)."""
    return 1 if mesh is None else int(dict(mesh.shape).get(axis, 1))


def row_devices(mesh: Optional[Mesh]) -> int:
    """Devices that hold different rows of a batch: data x fsdp (a tensor group shares its
    rows); 1 without a mesh."""
    return axis_size(mesh, DATA) * axis_size(mesh, FSDP)


def check_tensor(config, tensor: int) -> None:
    """Raises ValueError unless `tensor` splits the model's heads and MLP evenly: N and the
    intermediate width divisible by it, and K divisible by it or it a multiple of K."""
    if tensor == 1:
        return
    N, K = config.num_attention_heads, config.num_key_value_heads
    F = config.intermediate_size
    problems = []
    if N % tensor:
        problems.append(f"num_attention_heads {N}")
    if F % tensor:
        problems.append(f"intermediate_size {F}")
    if K % tensor and tensor % K:
        problems.append(f"num_key_value_heads {K} (neither divides the other)")
    if problems:
        raise ValueError(f"tensor={tensor} does not split " + ", ".join(problems))


def kv_split(num_kv_heads: Optional[int], tensor: int) -> bool:
    """Whether k/v projections (and the KV cache) are split over "tensor": K % tensor == 0
    (unknown K: assumed so)."""
    return tensor == 1 or num_kv_heads is None or num_kv_heads % tensor == 0


def _path_keys(path) -> list:
    return [getattr(k, "key", getattr(k, "name", str(k))) for k in path]


def _spec(ndim: int, **dims) -> P:
    if all(d is None for d in dims.values()):
        return P()
    spec = [None] * ndim
    for axis, dim in dims.items():
        if dim is not None:
            spec[dim] = {"data": DATA, "fsdp": FSDP, "tensor": TENSOR}[axis]
    return P(*spec)


def param_partition_spec(path_keys: Sequence[str], shape: Sequence[int], fsdp_size: int,
                         tensor_size: int = 1, kv_heads: Optional[int] = None) -> P:
    """PartitionSpec of one base-parameter leaf (see the module doc). kv_heads: K, to decide
    whether k/v kernels split over "tensor" (`kv_split`)."""
    last = path_keys[-1] if path_keys else ""
    proj = path_keys[-2] if len(path_keys) >= 2 else ""
    if last == "kernel" and "experts" in path_keys and len(shape) == 4:  # [Ls, E, in, out]
        return expert_spec(shape, 1, fsdp_size)
    if last == "embedding" and len(shape) == 2:
        layout, tensor_letter = "VD", "V"
    elif last == "kernel" and "lm_head" in path_keys and len(shape) == 2:
        layout, tensor_letter = "DV", "V"
    elif last == "kernel" and len(shape) == 3:
        layout = "LIO"
        if proj in COLUMN_PARALLEL and (proj not in KV_PROJS or kv_split(kv_heads, tensor_size)):
            tensor_letter = "O"
        elif proj in ROW_PARALLEL:
            tensor_letter = "I"
        else:
            tensor_letter = None
    else:
        return P()
    t_dim = None
    if tensor_size > 1 and tensor_letter is not None:
        d = layout.index(tensor_letter)
        if shape[d] % tensor_size == 0:
            t_dim = d
    f_dim = None
    if fsdp_size > 1:
        for letter in ("V", "D") if layout != "LIO" else ("I", "O"):
            d = layout.index(letter)
            if d != t_dim and shape[d] % fsdp_size == 0:
                f_dim = d
                break
    return _spec(len(shape), tensor=t_dim, fsdp=f_dim)


def expert_spec(shape: Sequence[int], dim: int, fsdp_size: int) -> P:
    """An expert stack's spec: its E dimension `dim` over "fsdp" when divisible, else replicated
    (see the module doc)."""
    if fsdp_size > 1 and shape[dim] % fsdp_size == 0:
        return _spec(len(shape), fsdp=dim)
    return P()


def _kv_heads_of(params) -> Optional[int]:
    """K from a base parameter tree (k_proj's output width over k_norm's head_dim), if present."""
    try:
        attn = params["layers"]["self_attn"]
        return attn["k_proj"]["kernel"].shape[-1] // attn["k_norm"]["scale"].shape[-1]
    except (KeyError, TypeError, IndexError, ZeroDivisionError):
        return None


def param_shardings(params, mesh: Mesh):
    """Tree of NamedShardings for the base parameters (works on arrays or ShapeDtypeStructs)."""
    fsdp, tensor = axis_size(mesh, FSDP), axis_size(mesh, TENSOR)
    kv = _kv_heads_of(params)
    return jax.tree_util.tree_map_with_path(
        lambda p, x: NamedSharding(mesh, param_partition_spec(_path_keys(p), x.shape, fsdp,
                                                              tensor, kv)),
        params)


def lora_partition_spec(path_keys: Sequence[str], shape: Sequence[int], tensor_size: int,
                        kv_heads: Optional[int] = None, fsdp_size: int = 1,
                        experts_size: int = 1) -> P:
    """PartitionSpec of one leaf of an adapter-shaped tree (the adapter, its gradient or an
    optimiser moment; see the module doc).

    "tensor": a column-parallel projection's lora_b [L, R, O] split by O, a row-parallel one's
    lora_a [L, I, R] by I (the other factor stays whole over "tensor").
    "fsdp" (fsdp_size > 1, ZeRO): each factor's wide dimension W (A's I, B's O) is split over
    "fsdp" as well; where "tensor" already splits W, over ("tensor", "fsdp") together,
    tensor-major, so that gathering over "fsdp" gives each device its tensor shard. When W is not
    divisible by that (tensor x fsdp, or fsdp) the rank R is split over "fsdp" instead; when R
    is not divisible either, the leaf is replicated over "fsdp". Leaves that are not [L, ., .]
    lora_a / lora_b arrays are replicated.
    Expert adapters (lora_a / lora_b [Ls, E, ., .] under "experts"): E over "fsdp" as their
    kernels (`expert_spec` with experts_size, the mesh's fsdp size), nothing else split.
    """
    if path_keys and path_keys[-1] in ("lora_a", "lora_b") and "experts" in path_keys \
            and len(shape) == 4:
        return expert_spec(shape, 1, experts_size)
    if len(path_keys) < 2 or len(shape) != 3 or path_keys[-1] not in ("lora_a", "lora_b"):
        return P()
    proj, factor = path_keys[-2], path_keys[-1]
    wide, rank = (1, 2) if factor == "lora_a" else (2, 1)
    split_by_tensor = tensor_size > 1 and shape[wide] % tensor_size == 0 and (
        (factor == "lora_b" and proj in COLUMN_PARALLEL
         and (proj not in KV_PROJS or kv_split(kv_heads, tensor_size)))
        or (factor == "lora_a" and proj in ROW_PARALLEL))
    spec = [None, None, None]
    if split_by_tensor:
        spec[wide] = TENSOR
    if fsdp_size > 1:
        if shape[wide] % (fsdp_size * (tensor_size if split_by_tensor else 1)) == 0:
            spec[wide] = (TENSOR, FSDP) if split_by_tensor else FSDP
        elif shape[rank] % fsdp_size == 0:
            spec[rank] = FSDP
    return P(*spec) if any(spec) else P()


def state_shardings(tree, mesh: Mesh, kv_heads: Optional[int] = None, *, fsdp: bool = True):
    """NamedShardings for a train state, an adapter tree, or anything holding adapter-shaped
    subtrees (optimiser moments, gradients): adapter leaves as `lora_partition_spec`, all else
    (counters, the PRNG key, learning rate) replicated. kv_heads: the model's K
    (`config.num_key_value_heads`). fsdp=False: the adapter leaves replicated over "fsdp" (split
    over "tensor" only; the layout before ZeRO sharding, for comparisons)."""
    tensor = axis_size(mesh, TENSOR)
    fsdp_size = axis_size(mesh, FSDP) if fsdp else 1
    return jax.tree_util.tree_map_with_path(
        lambda p, x: NamedSharding(mesh, lora_partition_spec(_path_keys(p), np.shape(x), tensor,
                                                             kv_heads, fsdp_size,
                                                             axis_size(mesh, FSDP))),
        tree)


def shard_lora(lora, mesh: Mesh, kv_heads: Optional[int] = None):
    """Places an adapter tree (or a train state) on the mesh as `state_shardings`."""
    return jax.device_put(lora, state_shardings(lora, mesh, kv_heads))


@dataclasses.dataclass(frozen=True)
class StateBytes:
    """Bytes one device holds of a train state (`grpo.TrainState`), by part.

    adapter: the LoRA factors. optimizer: the optimiser state (Adam's two moments, counters,
    hyperparameters). gradient: the adapter's gradient inside the step (adapter-shaped, in the
    adapter's dtype; transient, not part of the state). other: step, PRNG key, skipped_steps.
    """

    adapter: int
    optimizer: int
    gradient: int
    other: int

    @property
    def total(self) -> int:
        return self.adapter + self.optimizer + self.gradient + self.other


def train_state_bytes(state, mesh: Mesh, kv_heads: Optional[int] = None, *,
                      fsdp: bool = True) -> StateBytes:
    """Per-device bytes of `state` (a TrainState of arrays or `jax.ShapeDtypeStruct`s, e.g.
    ``jax.eval_shape`` of ``TrainState.create``) laid out as `state_shardings` (fsdp=True, the
    train step's layout) or replicated over "fsdp" (fsdp=False, the layout before ZeRO
    sharding). From shapes and dtypes alone (nothing is placed): each leaf's shard shape under
    its sharding. With the factors' wide dimensions divisible by tensor x fsdp, the adapter,
    optimiser and gradient parts shrink by the fsdp size."""

    def nbytes(tree) -> int:
        shardings = state_shardings(tree, mesh, kv_heads, fsdp=fsdp)
        return sum(int(np.prod(s.shard_shape(tuple(x.shape)))) * np.dtype(x.dtype).itemsize
                   for x, s in zip(jax.tree_util.tree_leaves(tree),
                                   jax.tree_util.tree_leaves(shardings)))

    adapter, optimizer = nbytes(state.lora), nbytes(state.opt_state)
    everything = nbytes(state)
    return StateBytes(adapter=adapter, optimizer=optimizer, gradient=adapter,
                      other=everything - adapter - optimizer)


# Layouts of the sampler's weights (`qwen3.InferenceWeights`), by field: the dimension split
# over "tensor" (fused kernels are laid out shard-major for it by `qwen3.inference_weights`).
_INFERENCE_TENSOR_DIM = {"embed": 0, "lm_head": 1, "qkv": 1, "gate_up": 1, "o": 0, "down": 0,
                         "qk_norm": 0}
# Low-rank pairs: which factor is split, and along which dimension.
_INFERENCE_LOW_RANK = {"qkv_lora": ("b", 1), "gate_up_lora": ("b", 1), "o_lora": ("a", 0),
                       "down_lora": ("a", 0)}


def inference_partition_spec(path_keys: Sequence[str], shape: Sequence[int], fsdp_size: int,
                             tensor_size: int, gathered: bool = False) -> P:
    """PartitionSpec of one leaf of `qwen3.InferenceWeights`: the split over "tensor" of the
    training layout (column-parallel kernels by output, row-parallel by input, vocabulary
    parallel embedding and head, each low-rank pair's factor as its base layer's adapter), and
    "fsdp" on the other dimension of a matrix when divisible (as `param_partition_spec`: the
    sampler then gathers over "fsdp" where a kernel is used, at every decode step), unless
    `gathered` (whole over "fsdp": see `gather_weights`). A `SparseMlp`'s expert stacks
    (gate_up, down [E, ., .]) over "fsdp" on E (`expert_spec`: expert parallel, gathered or
    not); its router and norm replicated."""
    if "sparse_mlp" in path_keys:
        if path_keys[-1] in ("gate_up", "down") and len(shape) == 3:
            return expert_spec(shape, 0, fsdp_size)
        return P()
    field = next((k for k in reversed(path_keys) if isinstance(k, str)
                  and (k in _INFERENCE_TENSOR_DIM or k in _INFERENCE_LOW_RANK)), None)
    t_dim = None
    if field in _INFERENCE_LOW_RANK:
        factor, dim = _INFERENCE_LOW_RANK[field]
        if path_keys[-1] == factor:
            t_dim = dim
    elif field is not None:
        t_dim = _INFERENCE_TENSOR_DIM[field]
    if t_dim is not None and (tensor_size <= 1 or shape[t_dim] % tensor_size):
        t_dim = None
    f_dim = None
    if (fsdp_size > 1 and not gathered and len(shape) == 2 and field in _INFERENCE_TENSOR_DIM
            and field != "qk_norm"):
        for d in (0, 1):
            if d != t_dim and shape[d] % fsdp_size == 0:
                f_dim = d
                break
    return _spec(len(shape), tensor=t_dim, fsdp=f_dim)


def inference_shardings(weights, mesh: Mesh, *, gathered: bool = False):
    """NamedShardings for a `qwen3.InferenceWeights` laid out for the mesh's tensor size; with
    `gathered`, its dense matrices whole over "fsdp" (`inference_partition_spec`)."""
    fsdp, tensor = axis_size(mesh, FSDP), axis_size(mesh, TENSOR)
    return jax.tree_util.tree_map_with_path(
        lambda p, x: NamedSharding(mesh, inference_partition_spec(_path_keys(p), np.shape(x),
                                                                  fsdp, tensor, gathered)),
        weights)


# `gather_weights` None: gather when the gathered weights take at most this share of a device
GATHER_SHARE = 0.25


def tree_bytes(tree) -> int:
    """Bytes of every array in `tree` (arrays or `jax.ShapeDtypeStruct`s), unsharded: e.g. the
    `weight_bytes` of `gather_weights`."""
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
               for x in jax.tree_util.tree_leaves(tree))


def gather_weights(setting: Optional[bool], mesh: Optional[Mesh], weight_bytes: float,
                   device_bytes: Optional[float]) -> bool:
    """Whether the sampler holds its weights whole over "fsdp" (`rollout.gather_weights`).

    Split over "fsdp" (as the base parameters), every decode step combines the kernels' "fsdp"
    parts again; without a tensor axis XLA gathers the kernels themselves (compiled for TPU:
    per step and device, (fsdp - 1) / fsdp of the model over the interconnect).
    Gathered once per `sampling.generate` call (`inference_shardings(gathered=True)`), each
    device holds its "tensor" shard of the whole model for the rollout and the decode steps read
    it in place; it costs weight_bytes / tensor of device memory while the sampler runs.

    setting: True / False, or None: gather when the gathered weights per device
    (weight_bytes / tensor) take at most `GATHER_SHARE` of `device_bytes` (a device's memory;
    None, as on CPU: never). Always False without a mesh or with "fsdp" of 1 (nothing to
    gather)."""
    if mesh is None or axis_size(mesh, FSDP) <= 1:
        return False
    if setting is not None:
        return bool(setting)
    if not device_bytes:
        return False
    return weight_bytes / axis_size(mesh, TENSOR) <= GATHER_SHARE * float(device_bytes)


def cache_shardings(cache, mesh: Mesh):
    """NamedShardings for a `qwen3.KVCache`: rows as the batch (`batch_spec`), the kv heads of
    k, v [B, K', ...] over "tensor", the per-row write index [B] as the rows."""
    rows = row_axes(cache.valid.shape[0], mesh)
    tensor = axis_size(mesh, TENSOR)
    heads = TENSOR if tensor > 1 and cache.k[0].shape[1] % tensor == 0 else None
    kv = NamedSharding(mesh, P(rows, heads))
    return cache.replace(k=tuple(kv for _ in cache.k), v=tuple(kv for _ in cache.v),
                         valid=NamedSharding(mesh, P(rows)), index=NamedSharding(mesh, P(rows)))


def batch_spec(batch_size: int, mesh: Mesh) -> P:
    """Spec of the leading batch axis: ("data", "fsdp"), else "data", else replicated."""
    data, fsdp = axis_size(mesh, DATA), axis_size(mesh, FSDP)
    if batch_size % (data * fsdp) == 0:
        return P((DATA, FSDP))
    if batch_size % data == 0:
        return P(DATA)
    return P()


def leading_axes(spec: P):
    """The mesh axes of a spec's first dimension (None: not split), e.g. for `shard_map`'s
    specs of arrays whose rows follow `spec`."""
    return spec[0] if len(spec) else None


def row_axes(batch_size: int, mesh: Mesh):
    """The mesh axes `batch_spec` splits `batch_size` rows over (None: replicated)."""
    return leading_axes(batch_spec(batch_size, mesh))


def constrain_rows(x: jax.Array, mesh: Optional[Mesh], axis: int = 0) -> jax.Array:
    """``x`` with its row axis (``axis``, B) split as the batch (`batch_spec`) and every other
    axis replicated; unchanged when ``mesh`` is None. Activations of a mesh step pass through it,
    so XLA keeps each device's rows on that device instead of gathering a microbatch's rows onto
    every device (which it does for ARCA's two forwards when left to choose: Qwen3-32B on v5e-64
    then needed 17 GiB of attention scores per chip)."""
    if mesh is None:
        return x
    spec = [None] * x.ndim
    spec[axis] = row_axes(x.shape[axis], mesh)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P(*spec)))


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
    from per-device copies: no n-fold array is ever formed on one device). The axis is named
    "data", as pmap names its outputs' axis after the step's ``axis_name``: the state of the
    first step and the state a step returns have the same sharding, so neither the step nor
    the sampler (fed ``unreplicate(state.lora)``) compiles a second time."""
    devices = list(jax.local_devices() if devices is None else devices)
    sharding = NamedSharding(Mesh(np.asarray(devices), (DATA,)), P(DATA))

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
        """A layout of `rows` rows rounded up to a multiple of the devices that hold different
        rows (data x fsdp; a tensor group shares its rows)."""
        size = row_devices(mesh)
        return cls(mesh, -(-rows // size) * size)

    def to_global(self, full) -> jax.Array:
        """A global [B, ...] array from a host array every process holds in full (each passes
        only its own rows: `jax.make_array_from_process_local_data`); rows beyond the array's
        are filled by repeating its last row (real inputs, dropped afterwards)."""
        full = pad_rows(np.asarray(full), self.batch_size)
        if self.sharding is None:
            return jnp.asarray(full)
        return jax.make_array_from_process_local_data(self.sharding, full[self.local], full.shape)

    def place(self, tree):
        """`tree` ([B, ...] leaves and scalars, e.g. a `sampling.SampleOutput` sampled on
        another mesh over the same devices) on this layout's rows, its scalars replicated: one
        resharding program (`jax.device_put`), across processes too. Without a mesh: on the
        default device."""
        if self.sharding is None:
            return jax.device_put(tree)
        whole = NamedSharding(self.mesh, P())
        return jax.device_put(tree, jax.tree_util.tree_map(
            lambda x: self.sharding if np.ndim(x) else whole, tree))

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
